"""The installed ``lit-llm`` script on a user's mistakes: one ``error: ...`` line, status 2, no traceback.

The checkpoints are built by hand (a tiny untrained model with the ``lit_llm`` metadata of a stage), so
these tests take a second, not a training run.
"""

from __future__ import annotations

import sys

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.backbone.generate import generate
from lit_llm.checkpoint import META_KEY
from lit_llm.cli import console_main
from lit_llm.data import tinyworld
from lit_llm.losses import next_token_loss
from lit_llm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``{stage: path}`` of tiny hand-made ``pretrain``, ``sft`` and ``reward`` checkpoints sharing one model."""
    tok = Tokenizer.train(tinyworld.pretrain_text(50), "char")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "tiny", vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_embd=32, n_head=2, n_kv_head=1
    )
    model = Transformer(cfg)
    # a few steps of training, so that greedy text is not one token repeated
    text = tinyworld.pretrain_text(50)
    data = torch.tensor(tok.encode(text if isinstance(text, str) else " ".join(text)))
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    for _ in range(40):
        x = torch.stack([data[j : j + 65] for j in torch.randint(0, len(data) - 65, (8,)).tolist()])
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    work = tmp_path_factory.mktemp("cli_errors")
    out = {}
    for stage in ("pretrain", "sft", "reward"):
        extra = {"value_head.weight": torch.zeros(1, 32), "value_head.bias": torch.zeros(1)}
        ckpt = {
            "state_dict": {**state, **(extra if stage == "reward" else {})},
            META_KEY: {"model_config": cfg.to_dict(), "tokenizer": tok.to_str(), "stage": stage},
        }
        out[stage] = work / f"{stage}.ckpt"
        torch.save(ckpt, out[stage])
    return out


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``console_main`` on ``args``: ``(exit status, stdout, stderr)``; an uncaught exception fails the test."""
    monkeypatch.setattr(sys, "argv", ["lit-llm", *args])
    with pytest.raises(SystemExit) as exc:
        console_main()
    out, err = capsys.readouterr()
    code = exc.value.code
    if isinstance(code, str):  # SystemExit("message"): Python prints it to stderr with status 1
        err, code = err + code + "\n", 1
    return code, out, err


def _one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if "error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


def test_missing_checkpoint_is_one_error_line(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "nope.ckpt")
    for cmd in (["generate", "--prompt", "Alice"], ["chat"]):
        code, _, err = _run(monkeypatch, capsys, *cmd, "--ckpt", missing)
        assert code == 2
        line = _one_error_line(err, "not found", "nope.ckpt")
        assert line.startswith("error: ")


def test_chat_refuses_a_reward_model(monkeypatch, capsys, ckpts):
    code, _, err = _run(monkeypatch, capsys, "chat", "--ckpt", str(ckpts["reward"]))
    assert code == 2
    assert _one_error_line(err, "'reward'", "reward model").startswith("error: ")


def test_generate_chat_refuses_a_pretrained_model(monkeypatch, capsys, ckpts):
    args = ["generate", "--ckpt", str(ckpts["pretrain"]), "--prompt", "Alice", "--chat"]
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    assert _one_error_line(err, "'pretrain'", "chat template").startswith("error: ")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--top_p", "0", "top_p"),
        ("--top_p", "1.5", "top_p"),
        ("--max_new_tokens", "0", "max_new_tokens"),
        ("--temperature", "-1", "temperature"),
        ("--top_k", "-2", "top_k"),
    ],
)
@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_bad_sampling_values_are_one_error_line(monkeypatch, capsys, ckpts, cmd, flag, value, needle):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Hi\n/exit\n"))
    prompt = ["--prompt", "Alice"] if cmd == "generate" else []
    ckpt = ckpts["pretrain"] if cmd == "generate" else ckpts["sft"]
    code, _, err = _run(monkeypatch, capsys, cmd, "--ckpt", str(ckpt), *prompt, flag, value)
    assert code != 0
    _one_error_line(err, needle, value)


def test_cli_greedy_text_equals_generate(monkeypatch, capsys, ckpts):
    from lit_llm.checkpoint import load_for_inference

    prompt = "Alice is in the"
    args = ["generate", "--ckpt", str(ckpts["pretrain"]), "--prompt", prompt, "--max_new_tokens", "12"]
    monkeypatch.setattr(sys, "argv", ["lit-llm", *args])
    console_main()
    out = capsys.readouterr().out
    model, tok, _ = load_for_inference(ckpts["pretrain"])
    new = generate(model, [tok.encode(prompt)], 12, stop_tokens=[tok.end_id, tok.eos_id]).response_lists()[0]
    assert len(set(new)) > 2  # a text worth comparing
    assert out == prompt + tok.decode(new) + "\n"


def test_fsdp1_on_a_cpu_names_the_strategy_that_runs_there(monkeypatch, capsys, tmp_path):
    """Lightning's ``fsdp`` needs CUDA: on a CPU the one error line says to use ``fsdp2`` (or ``ddp``)."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"]
    code, _, err = _run(monkeypatch, capsys, *args, "--trainer.devices", "2")
    assert code == 2
    _one_error_line(err, "requires a GPU accelerator", "--trainer.strategy fsdp2")
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was trained or written
