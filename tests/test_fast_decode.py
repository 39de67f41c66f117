"""Fast decoding: the fixed-shape cache, compiled decode steps and weight-only int8 / 4-bit quantization."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_llm.backbone import Transformer
from lit_llm.backbone.generate import generate
from lit_llm.backbone.masks import padding_mask as attention_mask
from lit_llm.backbone.quantize import (
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    quantize_weight_int4,
)
from tests.test_backbone import LLAMA4_KINDS, WINDOW_KINDS, tiny


@pytest.mark.parametrize("flavour", [{}, LLAMA4_KINDS, WINDOW_KINDS])
def test_static_cache_incremental_equals_full_forward(flavour):
    """Written at named slots, attended over all slots with a mask: the same logits as one full pass."""
    torch.manual_seed(0)
    model = Transformer(tiny(**flavour)).eval()
    B, T, slots = 3, 12, 20  # more slots than tokens: the empty ones must be masked out
    x = torch.randint(0, 97, (B, T))
    full = model(x)
    cache = model.new_cache(B, slots, static=True)
    valid = torch.zeros(B, slots, dtype=torch.bool)
    valid[:, :T] = True
    positions = torch.arange(T).expand(B, T)
    parts = []
    for a, b in [(0, 5), (5, 6), (6, T)]:
        cache.index = torch.arange(a, b)
        parts.append(model(x[:, a:b], positions[:, a:b], attention_mask(valid, a, b - a, slots), cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 0  # the model never advances a static cache: the caller moves `index`


def test_static_cache_needs_explicit_positions_and_mask():
    model = Transformer(tiny()).eval()
    cache = model.new_cache(1, 8, static=True)
    with pytest.raises(ValueError, match="explicit positions and an attention mask"):
        model(torch.tensor([[1, 2]]), cache=cache)


def test_compile_argument_errors_are_clear():
    model = Transformer(tiny()).eval()
    with pytest.raises(ValueError, match="requires_grad_"):
        generate(model, [[1, 2]], 2, compile="frozen")
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, [[1, 2]], 2, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="compile must be"):
        generate(model, [[1, 2]], 2, compile="fast")


@pytest.mark.slow
def test_compiled_generation_equals_eager(monkeypatch):
    """A torch.compile-d decode step over the static cache gives the eager tokens, for padded batches and
    for a second call with other prompt lengths (the same compiled steps are reused); small buckets make
    the attended part of the cache grow several times within one call."""
    import lit_llm.backbone.generate as gen

    monkeypatch.setattr(gen, "STATIC_CACHE_BUCKET", 8)
    torch.manual_seed(1)
    model = Transformer(tiny()).eval()
    for prompts in ([[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]], [[9, 8], [7, 6, 5, 4], [3, 2, 1]]):
        eager = generate(model, prompts, 10, stop_tokens=[7])
        compiled = generate(model, prompts, 10, stop_tokens=[7], compile=True)
        assert torch.equal(compiled.sequences, eager.sequences)
        assert torch.equal(compiled.valid, eager.valid)
    # weights frozen into the compiled code (float32: the same tokens again)
    frozen_model = copy.deepcopy(model).requires_grad_(False)
    frozen = generate(frozen_model, prompts, 10, stop_tokens=[7], compile="frozen")
    assert torch.equal(frozen.sequences, generate(frozen_model, prompts, 10, stop_tokens=[7]).sequences)


def test_quantize_weight_is_symmetric_per_row_rounding():
    w = torch.tensor([[0.5, -1.27, 0.003], [2.0, 1.1, -0.5]])
    q, scale = quantize_weight(w)
    torch.testing.assert_close(scale, torch.tensor([1.27 / 127, 2.0 / 127]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[50, -127, 0], [127, 70, -32]]  # e.g. 1.1 / (2 / 127) = 69.85 -> 70
    # each weight is off by at most half a quantization step
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_equals_the_dequantized_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=True)
    q8 = Int8Linear(lin)
    w = q8.weight_int8.float() * q8.scale[:, None]  # what the layer claims to compute with
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(q8(x), x @ w.T + lin.bias.detach())  # float32: dequantize-on-the-fly path
    # bfloat16 on CPU: the fused int8-weight kernel, same product up to bfloat16 rounding
    lin_bf16 = copy.deepcopy(lin).to(torch.bfloat16)
    q8b = Int8Linear(lin_bf16)
    xb = x.to(torch.bfloat16)
    ref = xb.float() @ q8b.dequantized_weight().float().T + lin_bf16.bias.float()
    torch.testing.assert_close(q8b(xb).float(), ref, atol=0.05, rtol=0.02)


def test_quantized_model_stays_close_and_decodes():
    torch.manual_seed(0)
    model = Transformer(tiny(init_std=0.3)).eval()
    embed = model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="eval"):
        quantize_int8(copy.deepcopy(model).train())
    qmodel = quantize_int8(copy.deepcopy(model).to(torch.bfloat16).eval())
    assert isinstance(qmodel.lm_head, Int8Linear) and isinstance(qmodel.layers[0].attn.q_proj, Int8Linear)
    assert torch.equal(qmodel.embed_tokens.weight.float(), embed.to(torch.bfloat16).float())  # lookup stays
    x = torch.randint(0, 97, (32, 10))
    ref, got = model(x)[:, -1], qmodel(x)[:, -1].float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, f"int8 logits off by {rel:.3f} relative"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # decoding with it works (bfloat16 weights, float32 CPU cache) and mostly agrees with float32
    out = generate(qmodel, x[:4].tolist(), 6).responses
    assert out.shape == (4, 6)
    assert (out[:, 0] == generate(model, x[:4].tolist(), 1).responses[:, 0]).float().mean() >= 0.75


def test_quantize_weight_int4_rounds_each_group_between_its_min_and_max():
    # one row, two groups of 32: 0 .. 3.1 in steps of 0.1, then -1 .. 1 with one outlier at 2
    g1 = torch.arange(32) * 0.1
    g2 = torch.linspace(-1, 1, 32)
    g2[5] = 2.0
    w = torch.cat([g1, g2])[None]
    q, scale, lo = quantize_weight_int4(w)
    torch.testing.assert_close(lo, torch.tensor([[0.0, -1.0]]))
    torch.testing.assert_close(scale, torch.tensor([[3.1 / 15, 3.0 / 15]]))
    assert q.dtype == torch.int32 and q.min() == 0 and q.max() == 15
    assert q[0, :4].tolist() == [0, 0, 1, 1]  # 0.1 / (3.1 / 15) = 0.48 -> 0, 0.2 / 0.207 = 0.97 -> 1
    assert q[0, 31] == 15 and q[0, 32] == 0 and q[0, 32 + 5] == 15
    back = lo.repeat_interleave(32, 1) + scale.repeat_interleave(32, 1) * q
    assert ((back - w).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-6).all()


def test_int4_linear_equals_its_groupwise_dequantized_product():
    """The packed kernel computes with ``min + scale * q`` per group of 32 (up to bfloat16 rounding)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=True)
    q4 = Int4Linear(lin)
    q, scale, lo = quantize_weight_int4(lin.weight)
    w = lo.repeat_interleave(32, 1) + scale.repeat_interleave(32, 1) * q  # (48, 96)
    x = torch.randn(2, 5, 96)
    ref = x.to(torch.bfloat16).float() @ w.T + lin.bias.detach()
    got = q4(x)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 48)
    torch.testing.assert_close(got, ref, atol=0.03, rtol=0.02)
    torch.testing.assert_close(q4.dequantized_weight(), w, atol=0.01, rtol=0.01)
    with pytest.raises(ValueError, match="in_features % 32 == 0 and out_features % 16 == 0"):
        Int4Linear(torch.nn.Linear(40, 48))


def test_int4_model_keeps_the_head_int8_stays_close_and_decodes():
    torch.manual_seed(0)
    model = Transformer(tiny(n_embd=64)).eval()
    with pytest.raises(ValueError, match="eval"):
        quantize_int4(copy.deepcopy(model).train())
    qmodel = quantize_int4(copy.deepcopy(model).to(torch.bfloat16).eval())
    layer = qmodel.layers[0]
    assert isinstance(layer.attn.q_proj, Int4Linear) and isinstance(layer.mlp.gate_proj, Int4Linear)
    assert isinstance(layer.mlp.down_proj, Int8Linear)  # 176 inputs: not whole groups of 32
    assert isinstance(qmodel.lm_head, Int8Linear)  # the head stays 8-bit, as in llama.cpp's Q4 files
    x = torch.randint(0, 97, (32, 10))
    ref, got = model(x)[:, -1], qmodel(x)[:, -1].float()
    rel = (got - ref).norm() / ref.norm()
    rel8 = (
        quantize_int8(copy.deepcopy(model).to(torch.bfloat16))(x)[:, -1].float() - ref
    ).norm() / ref.norm()
    # 16 levels per group instead of 255 per row: several times int8's error, still small (0.034 vs 0.007)
    assert 2 * rel8 < rel < 0.08, f"int4 logits off by {rel:.3f} relative (int8: {rel8:.3f})"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert generate(qmodel, x[:4].tolist(), 6).responses.shape == (4, 6)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_compiled_quantized_model_matches_eager(quantize):
    """Compiled int8 / int4 models compute the eager logits (to bfloat16 rounding) and decode, on shapes the
    fused int8 kernel does not take (88 hidden, a vocabulary of 97): Inductor must not route those through
    it (it rewrote ``linear(x, q) * scale`` into that kernel and crashed)."""
    torch.manual_seed(2)
    model = quantize(Transformer(tiny(init_std=0.3)).eval().to(torch.bfloat16)).requires_grad_(False)
    x = torch.randint(0, 97, (2, 6))
    eager = model(x).float()
    compiled = torch.compile(model)(x).float()
    assert ((compiled - eager).norm() / eager.norm()) < 0.02
    prompts = [[5, 6, 7, 8], [3, 9]]
    out = generate(model, prompts, 4, compile=True).responses
    # bfloat16 rounds differently once fused, so later near-ties may differ: the first token may not
    assert torch.equal(out[:, 0], generate(model, prompts, 1).responses[:, 0])


def test_overlapping_decodes_never_share_a_graph_cache():
    """CUDA-graph decoding keeps caches across calls; two decodes alive at once (two stream iterators)
    must get different caches, and a finished decode's cache is reused by the next one."""
    import lit_llm.backbone.generate as gen

    model = Transformer(tiny()).eval()
    cuda = torch.device("cuda")  # selects the pooled path; the buffers stay on the model's device
    gen._graph_caches.clear()
    first, key = gen._static_cache(model, 2, 64, torch.float32, cuda)
    second, key2 = gen._static_cache(model, 2, 64, torch.float32, cuda)
    assert key == key2 and second is not first  # the first is in use: not handed out twice
    gen._release_cache(key, first)
    gen._release_cache(key2, second)
    third, _ = gen._static_cache(model, 2, 64, torch.float32, cuda)
    assert third is first or third is second  # idle caches are reused
    gen._graph_caches.clear()
