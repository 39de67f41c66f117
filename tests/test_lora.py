"""LoRA (lit_llm/lora.py) and its use by the stages: exact start from the base, merge / unmerge, gradients
only on adapters, the PEFT round trip, adapter-only checkpoints that name their base, exact resume, the
reference of the RL stages as the policy with its adapters off."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from lightning import Callback

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.checkpoint import load_backbone, load_checkpoint, load_for_inference
from lit_llm.errors import CheckpointError, UserError
from lit_llm.formats.peft import export_peft
from lit_llm.lora import (
    AdaptersOff,
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    base_fingerprint,
    fold_lora,
    lora_layers,
    merge_lora,
    unmerge_lora,
)

from .conftest import ROOT, fit_in

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=97)


def _model(name: str = "tiny", **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig.from_name(name, **{**TINY, **kw} if name == "tiny" else {"vocab_size": 97})
    ).eval()


def _randomise_b(model: torch.nn.Module, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * std)


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------------------ the transform
def test_zero_initialised_b_gives_exactly_the_base_logits():
    model = _model()
    base = model(IDS)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    assert all(bool(m.lora_a.abs().sum() > 0) for m in lora_layers(model).values())  # A is random ...
    assert torch.equal(model(IDS), base)  # ... B is zero: bit for bit the base model


def test_lora_linear_is_the_formula():
    """``y = x W^T + b + (alpha / r) * x A^T B^T`` computed by hand."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=True)
    layer = LoRALinear(linear, rank=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 6)
    want = x @ linear.weight.T + linear.bias + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), want)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # the same parameters, not copies


def test_base_parameter_names_are_unchanged():
    model = _model()
    before = set(model.state_dict())
    names = apply_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    after = set(model.state_dict())
    assert before <= after
    assert after - before == {f"{n}.lora_{s}" for n in names for s in "ab"}
    assert names == [
        "layers.0.attn.q_proj",
        "layers.0.attn.v_proj",
        "layers.1.attn.q_proj",
        "layers.1.attn.v_proj",
    ]


def test_merge_then_unmerge_is_the_identity():
    model = _model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    _randomise_b(model)
    adapted = model(IDS)
    merge_lora(model)
    q = model.layers[0].attn.q_proj
    torch.testing.assert_close(q.weight, original["layers.0.attn.q_proj.weight"] + 2.0 * q.lora_b @ q.lora_a)
    torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)  # merged computes the same
    unmerge_lora(model)
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS), adapted)
    fold_lora(model)  # plain linears again, with the update merged
    assert not lora_layers(model) and type(model.layers[0].attn.q_proj) is torch.nn.Linear
    assert set(model.state_dict()) == set(original)
    torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapter_parameters_receive_gradients():
    model = _model().train()
    apply_lora(model, LoRAConfig(rank=4, targets=ALL, dropout=0.1))
    _randomise_b(model)
    model(IDS).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith((".lora_a", ".lora_b")):
            assert p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0), name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_adapters_off_is_the_base_model_without_a_copy():
    model = _model()
    base = model(IDS)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    _randomise_b(model)
    assert not torch.allclose(model(IDS), base)
    with adapters_disabled(model):
        assert torch.equal(model(IDS), base)
    assert not torch.allclose(model(IDS), base)  # back on after the block
    model.train()
    ref = AdaptersOff(model)
    out = ref(IDS)
    assert torch.equal(out, base) and not out.requires_grad
    assert model.training and all(m.training for m in model.modules())  # modes restored


def test_train_modules_train_in_full_beside_the_adapters():
    model = _model(tie_embeddings=False)
    apply_lora(model, LoRAConfig(rank=2, targets=["q_proj"], train_modules=["embed_tokens", "lm_head"]))
    model(IDS).logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    adapters = {f"layers.{i}.attn.q_proj.lora_{s}" for i in range(2) for s in "ab"}
    assert trained == {"embed_tokens.weight", "lm_head.weight"} | adapters
    with pytest.raises(UserError, match="'head' is no module"):
        apply_lora(_model(), LoRAConfig(train_modules=["head"]))


def test_unknown_target_is_refused_with_the_names_that_exist():
    with pytest.raises(UserError, match=r"'qkv' names no linear layer.*'attn.q_proj'"):
        apply_lora(_model(), LoRAConfig(targets=["qkv"]))
    with pytest.raises(UserError, match="rank"):
        LoRAConfig(rank=0)


def test_moe_targets_shared_expert_and_leaves_routed_experts_and_router_frozen():
    model = _model("llama4-tiny")
    names = apply_lora(model, LoRAConfig(rank=2, targets=["shared_expert.gate_proj", "q_proj"]))
    moe = [i for i in range(model.config.n_layer) if model.config.is_moe_layer(i)]
    assert moe and all(f"layers.{i}.mlp.shared_expert.gate_proj" in names for i in moe)
    assert not any("router" in n or n.endswith("mlp.gate_proj") for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "experts." in n or "router" in n)


def test_fingerprint_names_the_weights_not_their_dtype():
    a, b = _model(), _model()
    assert base_fingerprint(a) == base_fingerprint(b)
    half = _model().to(torch.bfloat16)
    assert base_fingerprint(half) == base_fingerprint(half.float())  # same values in another dtype
    with torch.no_grad():
        b.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert base_fingerprint(a) != base_fingerprint(b)
    apply_lora(a, LoRAConfig(rank=2, targets=ALL))
    _randomise_b(a)
    assert base_fingerprint(a) == base_fingerprint(_model())  # the adapters are not part of the base


# ------------------------------------------------------------------------------------------ PEFT round trip
@pytest.mark.parametrize("name", ["tiny", "llama4-tiny"])
def test_peft_adapter_gives_our_logits_on_the_exported_base(name, tmp_path):
    """``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`` == our model. On
    Llama 4 the exported q/k rows are permuted (RoPE layout): B's rows must follow."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lit_llm.formats.hf import export_hf

    model = _model(name)
    apply_lora(model, LoRAConfig(rank=4, alpha=12, targets=ALL))
    _randomise_b(model, std=0.2)
    ours = model(IDS)
    export_hf(model, None, tmp_path / "base")
    export_peft(model, tmp_path / "adapter", str(tmp_path / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    assert (ours - model.eval()(IDS)).abs().max() == 0
    with adapters_disabled(model):
        assert (
            ours - model(IDS)
        ).abs().max() > 0.1  # the adapters matter, so the match below means something
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- the stages
def _fit_sft(pretrain_ckpt: Path, work: Path, *extra: str, steps: int = 6) -> Path:
    fit_in(
        work,
        "sft/tinyworld-lora.yaml",
        "--model.init_from",
        str(pretrain_ckpt),
        "--model.lora.rank",
        "4",
        "--model.lora.dropout",
        "0.1",
        "--model.lora.train_modules",
        "[]",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.precision",
        "32-true",
        "--data.tinyworld_train",
        "320",
        "--data.tinyworld_val",
        "32",
        "--data.tinyworld_eval",
        "4",
        *extra,
    )
    return work / "checkpoints/sft-lora"


@pytest.fixture(scope="module")
def lora_run(pretrain_ckpt, tmp_path_factory):
    return _fit_sft(pretrain_ckpt, tmp_path_factory.mktemp("sft_lora"))


def test_adapter_checkpoint_is_small_and_names_its_base(lora_run, pretrain_ckpt):
    ckpt = load_checkpoint(lora_run / "last.ckpt")
    info = ckpt["lit_llm"]["lora"]
    assert info["config"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": ALL, "train_modules": []}
    assert info["base"]["path"] == str(Path(pretrain_ckpt).resolve())
    base, _, _ = load_backbone(pretrain_ckpt)
    assert info["base"]["sha256"] == base_fingerprint(base)
    keys = set(ckpt["state_dict"])
    params = {k for k in keys if not k.endswith("inv_freq")}
    assert params and all(k.endswith((".lora_a", ".lora_b")) for k in params), sorted(params)[:5]
    # the adapters moved away from the base (B no longer zero), and nothing else was stored
    assert any(bool(v.abs().sum() > 0) for k, v in ckpt["state_dict"].items() if k.endswith("lora_b"))
    n_adapter = sum(v.numel() for k, v in ckpt["state_dict"].items() if k in params)
    assert n_adapter < sum(p.numel() for p in base.parameters()) / 4
    assert os.path.getsize(lora_run / "last.ckpt") < os.path.getsize(pretrain_ckpt) / 3


def test_inference_loads_base_plus_adapter(lora_run, pretrain_ckpt):
    model, tok, meta = load_for_inference(lora_run / "last.ckpt")
    assert meta["stage"] == "sft" and not lora_layers(model)  # merged into plain linears
    adapted, _, _ = load_backbone(lora_run / "last.ckpt", keep_adapters=True)
    base, _, _ = load_backbone(pretrain_ckpt)
    ids = torch.tensor([tok.encode("Alice is in the garden.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), adapted.eval()(ids), atol=1e-5, rtol=1e-5)
        assert (model(ids) - base.eval()(ids)).abs().max() > 1e-3


def test_train_modules_are_stored_and_loaded(pretrain_ckpt, tmp_path):
    run = _fit_sft(pretrain_ckpt, tmp_path, "--model.lora.train_modules", "[embed_tokens]", steps=3)
    saved = load_checkpoint(run / "last.ckpt")["state_dict"]
    model, _, _ = load_for_inference(run / "last.ckpt")
    base, _, _ = load_backbone(pretrain_ckpt)
    assert torch.equal(model.embed_tokens.weight, saved["model.embed_tokens.weight"])
    assert not torch.equal(model.embed_tokens.weight, base.embed_tokens.weight)
    # the rest of the base is not stored (the output head is the embedding, tied)
    tied = {"model.embed_tokens.weight", "model.lm_head.weight"}
    assert {k for k in saved if k.endswith(".weight")} == tied


def test_adapter_checkpoint_refuses_another_base(lora_run, sft_ckpt, pretrain_ckpt, tmp_path, capsys):
    with pytest.raises(
        CheckpointError, match="other weights.*adapters only fit the model they were trained on"
    ):
        load_backbone(lora_run / "last.ckpt", base=sft_ckpt)
    # the named base moved away: the error says which base it needs and how to pass it
    moved = tmp_path / "last.ckpt"
    ckpt = torch.load(lora_run / "last.ckpt", weights_only=True)
    ckpt["lit_llm"]["lora"]["base"]["path"] = str(tmp_path / "gone.ckpt")
    torch.save(ckpt, moved)
    with pytest.raises(CheckpointError, match=r"gone.ckpt .*not there.*--base PATH"):
        load_backbone(moved)
    # ... and `generate --base` points at it: the same tokens as the adapters on their recorded base
    from lit_llm.cli import main

    prompt = ["generate", "--prompt", "Alice is in the garden.", "--max_new_tokens", "8"]
    main([*prompt, "--ckpt", str(lora_run / "last.ckpt")])
    want = capsys.readouterr().out
    main([*prompt, "--ckpt", str(moved), "--base", str(pretrain_ckpt)])
    assert capsys.readouterr().out == want and want.strip()


def test_resume_refuses_another_base(pretrain_ckpt, sft_ckpt, tmp_path):
    """The base file was overwritten (e.g. pretraining was run again) between a LoRA run and its resume."""
    import shutil

    base = tmp_path / "base.ckpt"
    shutil.copy(pretrain_ckpt, base)
    run = _fit_sft(base, tmp_path / "run", steps=3)
    shutil.copy(sft_ckpt, base)  # same config and tokenizer, other weights
    with pytest.raises(CheckpointError, match="trained on the base .*base.ckpt.* has other weights"):
        _fit_sft(base, tmp_path / "run", "--ckpt_path", str(run / "last.ckpt"), steps=6)


class StopAt(Callback):
    """Stops a run after ``step`` optimizer steps (its schedule still sized for the whole run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_lora_run_resumes_exactly(pretrain_ckpt, lora_run, tmp_path):
    """6 uninterrupted steps (``lora_run``) == a run of 6 steps stopped after 3, then resumed (adapter
    dropout on: the RNG state is restored too)."""
    stop = ["--trainer.callbacks+", "tests.test_lora.StopAt", "--trainer.callbacks.step", "3"]
    half = _fit_sft(pretrain_ckpt, tmp_path / "half", *stop)
    assert load_checkpoint(half / "last.ckpt")["global_step"] == 3
    resumed = _fit_sft(pretrain_ckpt, tmp_path / "half", "--ckpt_path", str(half / "last.ckpt"))
    full, again = load_checkpoint(lora_run / "last.ckpt"), load_checkpoint(resumed / "last.ckpt")
    assert full["global_step"] == again["global_step"] == 6
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][k], v, atol=0, rtol=0, msg=k)
    # ... and the optimizer state of the adapters too
    for a, b in zip(
        full["optimizer_states"][0]["state"].values(), again["optimizer_states"][0]["state"].values()
    ):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], atol=0, rtol=0)


def test_export_cli_writes_a_peft_adapter(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lit_llm.cli import main

    main(
        [
            "export",
            "--ckpt",
            str(lora_run / "last.ckpt"),
            "--out",
            str(tmp_path / "adapter"),
            "--adapter",
            "peft",
        ]
    )
    model, tok, _ = load_for_inference(lora_run / "last.ckpt")
    ids = torch.tensor([tok.encode("Where is the cat?")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "adapter/base")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=2e-5, rtol=1e-4)


def test_export_peft_refuses_a_full_checkpoint(pretrain_ckpt, tmp_path):
    from lit_llm.cli import main

    with pytest.raises(UserError, match="holds no LoRA adapters: export it without --adapter peft"):
        main(["export", "--ckpt", str(pretrain_ckpt), "--out", str(tmp_path / "x"), "--adapter", "peft"])
    assert not (tmp_path / "x").exists()


def test_stage_needs_init_from_for_lora():
    from lit_llm.stages import CausalLM

    with pytest.raises(UserError, match="init_from"):
        CausalLM(lora={"rank": 4})


# ----------------------------------------------------------------------------------- RL: reference = adapters off
PROMPTS = [
    {"prompt": p} for p in ["Where is the cat?", "Who has the apple?", "What is in the box?", "Where is Tom?"]
]


def test_ppo_with_lora_keeps_no_reference_copy_and_trains_only_adapters(rl_ckpts, fit_rl):
    from lit_llm.stages import PPOModule

    torch.manual_seed(0)
    m = PPOModule(
        init_from=rl_ckpts["sft"],
        reward_model=rl_ckpts["reward"],
        max_new_tokens=6,
        warmup_steps=0,
        learning_rate=1e-2,
        lora={"rank": 4, "targets": ALL},
    )
    assert isinstance(m.ref, AdaptersOff) and not any(k.startswith("ref.") for k in m.state_dict())
    sft, _, _ = load_backbone(rl_ckpts["sft"])
    frozen = {k: v.clone() for k, v in m.model.state_dict().items()}
    _, calls = fit_rl(m, PROMPTS, batches=2)
    assert len(calls) >= 2
    state = m.model.state_dict()
    moved = [k for k in state if not torch.equal(state.get(k), frozen.get(k, state[k] + 1))]
    assert moved and all(k.endswith(".lora_b") or k.endswith(".lora_a") for k in moved), moved
    # the reference is the SFT policy exactly: same logits as the SFT checkpoint, though the policy moved
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(m.ref(ids), sft.eval()(ids))
        assert (m.model.eval()(ids) - sft(ids)).abs().max() > 1e-4


@pytest.mark.parametrize("stage", ["grpo", "dpo", "reward"])
def test_other_stages_accept_lora(stage, rl_ckpts):
    from lit_llm.stages import DPOModule, GRPOModule, RewardModule

    lora = {"rank": 2, "targets": ["q_proj", "v_proj"]}
    if stage == "grpo":
        m = GRPOModule(init_from=rl_ckpts["sft"], reward_fn="lit_llm.data.tinyworld:gold_score", lora=lora)
    elif stage == "dpo":
        m = DPOModule(init_from=rl_ckpts["sft"], lora=lora)
    else:
        m = RewardModule(init_from=rl_ckpts["sft"], lora=lora)
    m.configure_model()
    if stage != "reward":
        assert isinstance(m.ref, AdaptersOff)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.endswith((".lora_a", ".lora_b")) or n.startswith("value_head.") for n in trainable
    )
    assert (stage == "reward") == any(n.startswith("value_head.") for n in trainable)


def test_lora_options_from_the_command_line(capsys):
    import yaml

    from lit_llm.cli import main

    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/sft/tinyworld.yaml"),
                "--model.lora.rank",
                "32",
                "--model.lora.targets",
                "[q_proj, v_proj]",
                "--print_config",
            ]
        )
    lora = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["lora"]
    assert lora["rank"] == 32 and lora["targets"] == ["q_proj", "v_proj"] and lora["alpha"] == 16.0
