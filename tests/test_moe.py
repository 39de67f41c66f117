"""Mixture-of-Experts and Llama 4 attention: routing against a per-token reference, losses against hand
computations, bias balancing, local masks, presets against the published Llama 4 sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lit_llm.backbone import ModelConfig, Transformer, count_active_parameters, count_parameters
from lit_llm.backbone.attention import rms_normalize, temperature_scales
from lit_llm.backbone.masks import local_mask as local_attention_mask
from lit_llm.backbone.moe import (
    MoE,
    expert_load,
    grouped_swiglu,
    load_balancing_loss,
    moe_aux_losses,
    moe_layers,
    router_z_loss,
    update_moe_biases,
)


def moe_config(**kw) -> ModelConfig:
    base = dict(vocab_size=61, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    return ModelConfig(**{**base, "moe_n_expert": 4, "moe_intermediate_size": 16, **kw})


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer written as a loop over tokens and their chosen experts (the slow reference)."""
    B, T, C = x.shape
    W1, W2 = moe.experts.gate_up_proj, moe.experts.down_proj
    out = []
    for t in x.reshape(-1, C):
        logits = moe.router.weight.float() @ t.float()  # (E,)
        scores = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
        rank = scores + moe.expert_bias if moe.expert_bias is not None else logits
        chosen = rank.topk(moe.top_k).indices
        gates = scores[chosen]
        if moe.renormalize:
            gates = gates / gates.sum()
        y = moe.shared_expert(t) if moe.shared_expert is not None else torch.zeros(C)
        for e, g in zip(chosen.tolist(), gates):
            inp = t * g if moe.weight_input else t
            a, b = (inp @ W1[e]).chunk(2)
            o = (F.silu(a) * b) @ W2[e]
            y = y + (o if moe.weight_input else g * o)
        out.append(y)
    return torch.stack(out).view(B, T, C)


ROUTINGS = [
    dict(moe_top_k=2, moe_score="softmax"),  # Switch-style gates on the output, top-2
    dict(moe_top_k=2, moe_score="softmax", moe_renormalize=True, moe_shared_expert=False),  # Mixtral
    dict(moe_top_k=1, moe_score="sigmoid", moe_weight_input=True),  # Llama 4
    dict(moe_top_k=3, moe_score="sigmoid", moe_bias_update=True),  # DeepSeek-V3-style selection bias
]


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(f"{k[4:]}={v}" for k, v in r.items()))
def test_moe_layer_equals_per_token_reference(routing):
    torch.manual_seed(0)
    moe = MoE(moe_config(**routing))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        if moe.expert_bias is not None:
            moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(3, 7, 32)
    out = moe(x)
    torch.testing.assert_close(out, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    # what the layer stores for the training losses and the load callback
    assert moe.last_router_logits.shape == (21, 4) and moe.last_top_k_indices.shape == (21, moe.top_k)
    assert int(moe.last_expert_counts.sum()) == 21 * moe.top_k
    torch.testing.assert_close(
        moe.last_expert_counts, torch.bincount(moe.last_top_k_indices.flatten(), minlength=4)
    )


def test_grouped_mm_equals_expert_loop():
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    torch.manual_seed(0)
    E, C, H, M = 4, 32, 16, 29
    counts = torch.tensor([7, 0, 13, 9])  # an expert without tokens too
    x = torch.randn(M, C, requires_grad=True)
    w1 = torch.randn(E, C, 2 * H, requires_grad=True)
    w2 = torch.randn(E, H, C, requires_grad=True)
    g = torch.randn(M, C)
    grads = []
    for impl in ("loop", "grouped_mm"):
        y = grouped_swiglu(x, w1, w2, counts, impl)
        y.backward(g)
        grads.append((y.detach(), x.grad.clone(), w1.grad.clone(), w2.grad.clone()))
        x.grad = w1.grad = w2.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="impl must be"):
        grouped_swiglu(x, w1, w2, counts, "bmm")


def test_load_balancing_and_z_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    top1 = torch.tensor([[0], [1], [0]])

    def softmax(a: float, b: float) -> tuple[float, float]:
        ea, eb = math.exp(a), math.exp(b)
        return ea / (ea + eb), eb / (ea + eb)

    p = [softmax(2, 0), softmax(0, 1), softmax(1, 0)]
    mean_p = [sum(r[e] for r in p) / 3 for e in range(2)]
    want = 2 * (2 / 3 * mean_p[0] + 1 / 3 * mean_p[1])  # E * sum_e fraction_e * P_e
    assert load_balancing_loss(logits, top1, 2).item() == pytest.approx(want, rel=1e-6)
    z = [math.log(math.exp(2) + 1), math.log(1 + math.e), math.log(math.e + 1)]
    assert router_z_loss(logits).item() == pytest.approx(sum(v * v for v in z) / 3, rel=1e-6)
    # a perfectly balanced router scores 1 for any k; leading dimensions are flattened
    uniform = torch.zeros(2, 4, 4)
    top2 = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]).expand(2, 4, 2)
    assert load_balancing_loss(uniform, top2, 4).item() == pytest.approx(1.0)
    assert router_z_loss(uniform).item() == pytest.approx(math.log(4) ** 2)
    # collapse onto one expert: fraction 1 there, and the gradient pushes its probability down
    logits = torch.tensor([[3.0, 0.0, 0.0]] * 5, requires_grad=True)
    loss = load_balancing_loss(logits, torch.zeros(5, 1, dtype=torch.long), 3)
    loss.backward()
    assert loss.item() > 2.0 and (logits.grad[:, 0] > 0).all()


def test_moe_aux_losses_collects_layers():
    torch.manual_seed(0)
    cfg = moe_config(n_layer=4, moe_every=2, moe_aux_loss_coef=0.5, moe_z_loss_coef=0.25)
    model = Transformer(cfg)
    assert [type(b.mlp).__name__ for b in model.layers] == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    with pytest.raises(ValueError, match="run a forward pass"):
        moe_aux_losses(model)
    model(torch.randint(0, 61, (2, 9)))
    aux = moe_aux_losses(model)
    layers = moe_layers(model)
    lb = [load_balancing_loss(m.last_router_logits, m.last_top_k_indices, 4) for m in layers]
    z = [router_z_loss(m.last_router_logits) for m in layers]
    torch.testing.assert_close(aux["load_balancing"], (lb[0] + lb[1]) / 2)
    torch.testing.assert_close(aux["router_z"], (z[0] + z[1]) / 2)
    torch.testing.assert_close(aux["loss"], 0.5 * aux["load_balancing"] + 0.25 * aux["router_z"])
    assert aux["max_load"].item() >= 1.0 and not aux["max_load"].requires_grad
    aux["loss"].backward()  # the losses reach the routers
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in layers)
    torch.testing.assert_close(expert_load(model).sum(-1), torch.ones(2))
    assert moe_aux_losses(Transformer(ModelConfig(vocab_size=61, n_layer=1, n_embd=32))) == {}
    # the stored graph never blocks a copy (e.g. a frozen reference policy made after a training step)
    clone = copy.deepcopy(model)
    assert moe_layers(clone)[0].last_router_logits is None


def test_bias_update_balances_load_without_changing_gates():
    torch.manual_seed(0)
    cfg = moe_config(moe_top_k=1, moe_score="sigmoid", moe_bias_update=True)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1)
        moe.router.weight[0] += 0.1  # expert 0 is preferred by almost every token
    x = torch.randn(4, 16, 32) + 0.5
    moe(x)
    first = moe.last_expert_counts.clone()
    assert int(first[0]) > 48
    logits_before = moe.last_router_logits.detach()
    moe.update_bias(0.01)
    assert moe.expert_bias[0] < 0 and (moe.expert_bias[1:] > 0).all()
    loads = []
    for _ in range(100):
        moe(x)
        loads.append(moe.last_expert_counts.float())
        update_moe_biases(moe, 0.01)
    # sign updates settle into a small oscillation around equal load (16 tokens per expert)
    assert torch.stack(loads[-20:]).mean(0).max() < 20
    torch.testing.assert_close(moe.last_router_logits.detach(), logits_before)  # the router is untouched
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)  # gates stay unbiased
    assert "expert_bias" in moe.state_dict() and "load_since_update" not in moe.state_dict()
    with pytest.raises(ValueError, match="moe_bias_update=True"):
        MoE(moe_config()).update_bias(0.1)


def test_moe_layer_placement_and_config_errors():
    cfg = moe_config(n_layer=6, moe_every=3, nope_every=4, attention_chunk_size=8)
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == [2, 5]
    assert [i for i in range(6) if cfg.is_nope_layer(i)] == [3]
    assert [i for i in range(6) if cfg.is_local_layer(i)] == [0, 1, 2, 4, 5]
    assert not ModelConfig().is_moe_layer(0) and ModelConfig().moe_intermediate_size is None
    with pytest.raises(ValueError, match="moe_top_k=5 must be between 1 and moe_n_expert=4"):
        moe_config(moe_top_k=5)
    with pytest.raises(ValueError, match="nope_every=2 needs pos='rope'"):
        moe_config(nope_every=2, pos="learned")
    with pytest.raises(ValueError, match="moe_score must be"):
        moe_config(moe_score="relu")
    with pytest.raises(ValueError, match="sliding_window must be positive"):
        moe_config(sliding_window=0)


def test_local_attention_mask_by_hand():
    pos = torch.arange(6)[None]
    chunk = local_attention_mask(pos, pos, chunk_size=2, window=None)[0, 0].int()
    want = torch.tensor([[1 if i // 2 == j // 2 else 0 for j in range(6)] for i in range(6)])
    assert torch.equal(chunk, want)
    window = local_attention_mask(pos, pos, chunk_size=None, window=3)[0, 0]
    assert window[5].tolist() == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]  # itself and the 2 before (and later)
    # left-padded row: positions restart at the first real token, so chunks do too
    padded = torch.tensor([[0, 0, 0, 1, 2, 3]])
    assert local_attention_mask(padded, padded, 2, None)[0, 0, 5].tolist() == [0, 0, 0, 0, 1, 1]


def test_local_layers_wider_than_the_sequence_change_nothing():
    torch.manual_seed(0)
    x = torch.randint(0, 61, (2, 10))
    base = moe_config(nope_every=2)
    plain = Transformer(base).eval()
    for kw in (dict(attention_chunk_size=10), dict(sliding_window=10), dict(attention_chunk_size=16)):
        local = Transformer(moe_config(nope_every=2, **kw)).eval()
        local.load_state_dict(plain.state_dict())
        torch.testing.assert_close(local(x), plain(x))
        narrow = Transformer(moe_config(nope_every=2, **{k: 3 for k in kw})).eval()
        narrow.load_state_dict(plain.state_dict())
        assert not torch.allclose(narrow(x), plain(x), atol=1e-3)


def test_temperature_scales_and_qk_norm_by_hand():
    pos = torch.tensor([[0, 2, 3, 7, 8]])
    want = [math.log(math.floor((p + 1) / 4) + 1) * 0.1 + 1 for p in pos[0].tolist()]
    torch.testing.assert_close(temperature_scales(pos, 4.0, 0.1)[0], torch.tensor(want))
    x = torch.randn(2, 3, 8) * 5
    y = rms_normalize(x, 1e-5)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(2, 3), atol=1e-4, rtol=1e-4)


def test_llama4_presets_match_published_sizes():
    """Text models only: the published totals (Scout 109B, Maverick 400B) include the vision encoder."""
    counts = {}
    for name in ("llama4-tiny", "llama4-scout", "llama4-maverick", "tiny"):
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_name(name))
        counts[name] = (count_parameters(model), count_active_parameters(model))
    tiny_total, tiny_active = counts["llama4-tiny"]
    assert 1e6 <= tiny_total <= 3e6
    assert abs(tiny_active / counts["tiny"][0] - 1) < 0.05  # active parameters as the dense "tiny"
    assert counts["tiny"][0] == counts["tiny"][1]
    for name, total, active in (("llama4-scout", 109e9, 17e9), ("llama4-maverick", 400e9, 17e9)):
        assert abs(counts[name][0] / total - 1) < 0.03, (name, counts[name])
        assert abs(counts[name][1] / active - 1) < 0.03, (name, counts[name])


def test_tiny_moe_trains_with_aux_losses():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("llama4-tiny", n_layer=2, n_embd=32, n_head=4, moe_intermediate_size=32)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 512, (4, 33))
    losses = []
    for _ in range(15):
        logits = model(x[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss = ce + moe_aux_losses(model)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_moe_config_fits_and_generates(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from lit_llm.checkpoint import read_meta
    from lit_llm.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs/pretrain/tiny-moe.yaml"
    fast = [
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "1",
    ]
    fast += ["--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", str(config), *fast, "--data.tinyworld_docs", "200", "--data.seq_len", "64"])
    ckpt = tmp_path / "checkpoints/pretrain-moe/last.ckpt"
    meta = read_meta(ckpt)
    assert meta["model_config"]["moe_n_expert"] == 4 and meta["model_config"]["nope_every"] == 4
    capsys.readouterr()
    main(["generate", "--ckpt", str(ckpt), "--prompt", "Alice is", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("Alice is")


def test_causal_lm_adds_moe_aux_losses_to_the_training_objective():
    from types import SimpleNamespace

    from lit_llm.stages import CausalLM

    torch.manual_seed(0)
    tiny_moe = dict(n_layer=2, n_embd=32, n_head=4, moe_intermediate_size=32, moe_aux_loss_coef=0.5)
    module = CausalLM(preset="llama4-tiny", model_overrides=tiny_moe, vocab_size=64, block_size=16)
    module.trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-3}])])
    module.log = lambda *args, **kwargs: None
    x = torch.randint(0, 64, (2, 17))
    batch = (x[:, :-1], x[:, 1:])
    objective = module._step(batch, "train")
    ce = F.cross_entropy(module.model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    aux = moe_aux_losses(module.model)
    assert aux["loss"] > 0.1  # coef 0.5 x a load-balancing loss near 1
    torch.testing.assert_close(objective, ce + aux["loss"])
    torch.testing.assert_close(module._step(batch, "val"), ce)  # validation reports the LM loss alone
