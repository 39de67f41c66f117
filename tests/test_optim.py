"""Optimizers: which parameters Muon and AdamW get, Muon's orthogonal update, the shared schedule, exact
resume with Muon, and parity with torch.optim.Muon / torch.optim.AdamW."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.backbone.heads import ScalarHeadModel
from lit_llm.backbone.moe import Experts
from lit_llm.data.text import TextDataModule
from lit_llm.optim import MuonAdamW, adjusted_lr, build_optimizer, muon_param_groups
from lit_llm.resumable import make_resumable
from lit_llm.stages import CausalLM
from lit_llm.stages.base import lr_lambda

SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "vocab_size": 40, "block_size": 16}


def _models() -> dict[str, nn.Module]:
    return {
        "tied": Transformer(ModelConfig.from_name("tiny", **SMALL)),
        "untied": Transformer(ModelConfig.from_name("tiny", **SMALL, tie_embeddings=False)),
        # biases, learned positions, LayerNorm with bias, GELU MLP
        "gpt2": Transformer(ModelConfig.from_name("gpt2-char-baby", **SMALL)),
        "moe": Transformer(ModelConfig.from_name("llama4-tiny", **SMALL, moe_bias_update=True)),
        "critic": ScalarHeadModel(Transformer(ModelConfig.from_name("tiny", **SMALL))),
    }


def _owner(model: nn.Module) -> dict[int, tuple[nn.Module, str, str]]:
    """id(parameter) -> (module, module name, parameter name) of its first owner."""
    out: dict[int, tuple[nn.Module, str, str]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            out.setdefault(id(p), (mod, mod_name, p_name))
    return out


@pytest.mark.parametrize("kind", ["tied", "untied", "gpt2", "moe", "critic"])
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_every_parameter_lands_in_exactly_one_group(kind, name):
    model = _models()[kind]
    frozen = next(p for n, p in model.named_parameters() if n.endswith("input_norm.weight"))
    frozen.requires_grad_(False)  # a frozen parameter is left out
    opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)  # none twice (tied counts once)
    assert {id(p) for p in grouped} == trainable  # none missing, no frozen one
    if name == "adamw":
        return
    owner = _owner(model)
    for g in opt.param_groups:
        for p in g["params"]:
            mod, mod_name, p_name = owner[id(p)]
            hidden_linear = isinstance(mod, nn.Linear) and p_name == "weight" and "head" not in mod_name
            if hidden_linear or isinstance(mod, Experts):
                assert g["use_muon"], (mod_name, p_name)
                assert g["layout"] == ("in_out" if isinstance(mod, Experts) else "linear")
                assert g["chunks"] == (2 if p_name == "gate_up_proj" else 1)
                assert (g["lr"], g["weight_decay"]) == (0.02, 0.1)
            else:  # embeddings, positions, heads, norms, biases
                assert not g["use_muon"], (mod_name, p_name)
                assert g["lr"] == 1e-3
                assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), (mod_name, p_name)
    n_muon = sum(len(g["params"]) for g in opt.param_groups if g["use_muon"])
    assert n_muon > 0 and (kind != "moe" or any(g["layout"] == "in_out" for g in opt.param_groups))


def test_muon_update_of_a_matrix_is_orthogonal():
    """The gradient's singular values span 1e-2..1; the update's are all close to one another."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 64, bias=False)
    experts = Experts(3, 16, 24)  # gate_up (3, 16, 48), down (3, 24, 16)
    opt = MuonAdamW(muon_param_groups(nn.ModuleList([lin, experts]), 1e-3, 0.0, (0.9, 0.95), muon_lr=0.01))
    u, _, vh = torch.linalg.svd(torch.randn(64, 32), full_matrices=False)
    lin.weight.grad = u @ torch.diag(torch.logspace(0, -2, 32)) @ vh  # (64, 32), condition number 100
    # experts and the gate / up halves at very different scales: each is orthogonalised alone
    scale = torch.tensor([100.0, 1.0, 0.01])[:, None, None]
    experts.gate_up_proj.grad = torch.cat([torch.randn(3, 16, 24), 0.01 * torch.randn(3, 16, 24)], -1) * scale
    experts.down_proj.grad = torch.randn(3, 24, 16) * scale
    before = [p.detach().clone() for p in (lin.weight, experts.gate_up_proj, experts.down_proj)]
    opt.step()

    def check(delta: torch.Tensor, fan_out: int, fan_in: int) -> None:
        sv = torch.linalg.svdvals(delta / adjusted_lr(0.01, fan_out, fan_in, "match_rms_adamw"))
        assert sv.min() > 0.5 and sv.max() < 1.5, sv  # Newton-Schulz lands in about [0.7, 1.2]

    check(before[0] - lin.weight.detach(), 64, 32)
    d_gate_up, d_down = before[1] - experts.gate_up_proj.detach(), before[2] - experts.down_proj.detach()
    for e in range(3):
        check(d_gate_up[e, :, :24].T, 24, 16)  # gate of expert e as (out, in)
        check(d_gate_up[e, :, 24:].T, 24, 16)  # up
        check(d_down[e].T, 16, 24)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_matches_torch_muon_and_adamw_matches_torch_adamw(adjust):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(48, 32))
    b = nn.Parameter(torch.randn(48))
    w_ref, b_ref = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    ours = MuonAdamW(
        [
            {"params": [w], "use_muon": True, "lr": 0.02, "weight_decay": 0.1, "adjust_lr": adjust},
            {"params": [b], "lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)},
        ]
    )
    muon = torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    adamw = torch.optim.AdamW([b_ref], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    for _ in range(4):
        gw, gb = torch.randn(48, 32), torch.randn(48)
        w.grad, w_ref.grad, b.grad, b_ref.grad = gw, gw.clone(), gb, gb.clone()
        ours.step()
        muon.step()
        adamw.step()
    assert torch.equal(w, w_ref)
    torch.testing.assert_close(b, b_ref)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_every_group_follows_the_shared_schedule(name):
    """Through ``Stage.configure_optimizers``: with a constant gradient, each step of each group moves its
    parameter by (its peak step) x ``lr_lambda(step)``, Muon and AdamW groups alike."""
    torch.manual_seed(0)
    module = CausalLM(
        model_overrides=SMALL,
        optimizer=name,
        muon_lr=0.02,
        weight_decay=0.0,
        warmup_steps=3,
        min_lr_ratio=0.1,
        muon_momentum=0.0,  # the update is then exactly orthogonalize(grad), the same every step
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    steps = []
    for _ in range(10):
        before = [p.detach().clone() for p in params]
        opt.step()
        sched.step()
        steps.append([(b - p.detach()).norm() for b, p in zip(before, params)])
    # AdamW's step with a constant gradient is lr * m_hat / (sqrt(v_hat) + eps) = lr * sign(g) (up to eps)
    for t in range(10):
        for i in range(len(params)):
            want = steps[0][i] * lr_lambda(t, 3, 10, 0.1) / lr_lambda(0, 3, 10, 0.1)
            torch.testing.assert_close(steps[t][i], want, rtol=2e-3, atol=0.0)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_resume_with_muon_is_exact(tmp_path, name):
    """Fit 8 steps saving a checkpoint every 4; resume a second fit from the step-4 checkpoint: its final
    weights and optimizer state (Muon momentum of matrices and stacked experts, AdamW moments) are bitwise
    those of the uninterrupted run (AdamW: the control)."""

    def fit(ckpt: str | None = None):
        dm = make_resumable(
            TextDataModule(
                tinyworld_docs=60,
                tokenizer_vocab_size=300,
                seq_len=32,
                batch_size=4,
                cache_dir=str(tmp_path / "data"),
            )
        )
        torch.manual_seed(0)
        overrides = {
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "n_kv_head": 1,
            "moe_n_expert": 2,
            "dropout": 0.1,
        }
        module = CausalLM(
            model_overrides=overrides,
            vocab_size=300,
            block_size=32,
            optimizer=name,
            muon_lr=0.01,
            warmup_steps=2,
        )
        trainer = Trainer(
            default_root_dir=str(tmp_path),
            accelerator="cpu",
            max_steps=8,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            precision="32-true",
            gradient_clip_val=1.0,
            callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)],
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return module, trainer

    full, _ = fit()
    (mid,) = (tmp_path / "ckpt").glob("*step=4.ckpt")
    resumed, trainer = fit(ckpt=str(mid))
    assert trainer.global_step == 8
    for (p_name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), p_name
    sa, sb = full.optimizers().optimizer.state_dict(), resumed.optimizers().optimizer.state_dict()
    assert any("momentum_buffer" in s for s in sa["state"].values()) == (name == "muon")
    for k, s in sa["state"].items():
        for key, v in s.items():
            assert torch.equal(v, sb["state"][k][key]), (k, key)
