"""Backbone: config validation, RoPE, attention variants, KV cache, generation, HF Llama parity."""

from __future__ import annotations

import math

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer, count_parameters
from lit_llm.backbone.generate import generate, logits_to_probs, stream
from lit_llm.backbone.rope import apply_rope, inv_frequencies, rope_cos_sin


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    return ModelConfig(**{**base, **kw})


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="n_head=5 must divide n_embd=32"):
        tiny(n_head=5, n_kv_head=5)
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny"):
        ModelConfig.from_name("nope")
    with pytest.raises(ValueError, match="norm must be"):
        tiny(norm="batchnorm")


def test_text_values_from_the_command_line_are_read_or_named():
    # `--model.model_overrides.n_head 2` can reach the config as text: read as the field's type ...
    cfg = ModelConfig.from_name(
        "llama4-vision-tiny", n_head="2", qk_norm="false", vision={"projector_init_scale": "2.5"}
    )
    assert (cfg.n_head, cfg.head_dim, cfg.qk_norm, cfg.vision.projector_init_scale) == (2, 64, False, 2.5)
    assert type(cfg.n_head) is int and type(cfg.vision.projector_init_scale) is float
    # ... or refused naming the field, not a TypeError from a comparison deep in the checks
    with pytest.raises(ValueError, match="n_embd must be int, got 'wide'"):
        ModelConfig.from_name("tiny", n_embd="wide")
    with pytest.raises(ValueError, match="VisionConfig: projector_init_scale must be float, got 'big'"):
        ModelConfig.from_name("llama4-vision-tiny", vision={"projector_init_scale": "big"})


def test_presets_sizes():
    sizes = {}
    for name in ("tiny", "small", "gpt-char-baby", "gpt2-char-baby", "llama-125m"):
        with torch.device("meta"):
            sizes[name] = count_parameters(Transformer(ModelConfig.from_name(name)))
    assert 0.7e6 <= sizes["tiny"] <= 1.3e6
    assert 10e6 <= sizes["small"] <= 30e6
    assert 100e6 <= sizes["llama-125m"] <= 150e6
    # the modern baby has no more parameters than the classic one
    assert sizes["gpt-char-baby"] <= sizes["gpt2-char-baby"]


def test_rope_matches_complex_rotation():
    D, T = 8, 5
    inv = inv_frequencies(D, 10000.0)
    x = torch.randn(1, 1, T, D)
    cos, sin = rope_cos_sin(torch.arange(T)[None], inv)
    out = apply_rope(x, cos, sin)
    # direct computation: pair (x_i, x_{i+D/2}) as a complex number multiplied by e^{i * pos * f_i}
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double())
    rot = torch.exp(1j * torch.arange(T).double()[:, None] * inv.double()[None, :])
    ref = z * rot
    torch.testing.assert_close(out[..., : D // 2].double(), ref.real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., D // 2 :].double(), ref.imag, atol=1e-5, rtol=1e-5)


def test_rope_relative_position_invariance():
    D = 16
    inv = inv_frequencies(D, 500.0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([[m]]), inv)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), inv)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_llama3_rope_scaling_bands():
    inv = inv_frequencies(64, 500000.0)
    scaled = inv_frequencies(64, 500000.0, 8.0, 1.0, 4.0, 8192)
    wavelen = 2 * math.pi / inv
    assert torch.allclose(scaled[wavelen < 8192 / 4], inv[wavelen < 8192 / 4])
    assert torch.allclose(scaled[wavelen > 8192], inv[wavelen > 8192] / 8)


def test_gqa_with_all_kv_heads_equals_mha():
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=4)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 97, (2, 10))
    # a hand-written multi-head attention on the first block's weights
    attn, h = model.layers[0].attn, model.layers[0].input_norm(model.embed_tokens(x))
    B, T, _ = h.shape
    q = attn.q_proj(h).view(B, T, 4, 8).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, 4, 8).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, 4, 8).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), model.inv_freq)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    ref = attn.o_proj((att @ v).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(attn(h, (cos, sin), None), ref, atol=1e-5, rtol=1e-5)


# Llama 4 layer kinds: MoE (top-2 softmax) on every layer, NoPE every 2nd layer with temperature tuning
# (visible from position 2), chunks of 4 positions and QK-norm on the RoPE layers. Larger initial weights
# than the default make every feature change the greedy tokens.
LLAMA4_KINDS = dict(
    init_std=0.3,
    moe_n_expert=4,
    moe_top_k=2,
    moe_intermediate_size=16,
    nope_every=2,
    attention_chunk_size=4,
    qk_norm=True,
    attn_temperature_tuning=True,
    attn_floor_scale=3.0,
    attn_scale=0.5,
)
# sliding window on every layer, MoE (sigmoid, Llama 4 gating) on every 2nd one
WINDOW_KINDS = dict(
    init_std=0.3, sliding_window=3, moe_n_expert=3, moe_every=2, moe_score="sigmoid", moe_weight_input=True
)
FLAVOURS = [
    {},
    dict(norm="layernorm", mlp="gelu", pos="learned", bias=True),
    LLAMA4_KINDS,
    WINDOW_KINDS,
    dict(n_layer=3, nope_every=3, sliding_window=5, attention_chunk_size=4),  # window and chunk together
]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_incremental_equals_full_forward(flavour):
    torch.manual_seed(0)
    model = Transformer(tiny(**flavour)).eval()
    x = torch.randint(0, 97, (3, 12))
    full = model(x)
    cache = model.new_cache(3, 12)
    parts = [model(x[:, :5], cache=cache), model(x[:, 5:6], cache=cache), model(x[:, 6:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", [{}, LLAMA4_KINDS, WINDOW_KINDS])
def test_batched_left_padded_generation_equals_one_by_one(flavour):
    torch.manual_seed(1)
    model = Transformer(tiny(**flavour)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    batched = generate(model, prompts, max_new_tokens=10, pad_id=0).response_lists()
    for p, b in zip(prompts, batched):
        assert generate(model, [p], max_new_tokens=10, pad_id=0).response_lists()[0] == b
    # the cache does not change greedy tokens
    assert generate(model, prompts, 10, use_cache=False).response_lists() == batched


def test_stop_tokens_and_stream():
    torch.manual_seed(2)
    model = Transformer(tiny()).eval()
    free = generate(model, [[1, 2, 3]], max_new_tokens=12).response_lists()[0]
    stop = free[3]
    first = free.index(stop)
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=12, stop_tokens=[stop]).response_lists()[0]
    assert stopped == free[: first + 1]
    assert list(stream(model, [1, 2, 3], 12, stop_tokens=[stop])) == stopped


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(logits_to_probs(logits, top_k=2), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    hot = logits_to_probs(logits, temperature=2.0)
    ref = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(hot, (ref / ref.sum())[None])
    g = torch.Generator().manual_seed(0)
    from lit_llm.backbone.generate import sample

    draws = torch.stack([sample(logits, 1.0, top_k=2, generator=g) for _ in range(2000)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.04


@pytest.mark.parametrize("tie,gqa", [(True, 2), (False, 4), (False, 1)])
def test_logits_match_hf_llama(tie, gqa):
    transformers = pytest.importorskip("transformers")
    from lit_llm.formats.hf import from_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=gqa,
        max_position_embeddings=64,
        rope_theta=1000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        attention_bias=False,
    )
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    ref.generation_config.eos_token_id = None  # decode the full length, as ours does without stop tokens
    ours = from_hf(ref).eval()
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)
        got = generate(ours, [x[0].tolist()], 8).response_lists()[0]
        want = ref.generate(x[:1], max_new_tokens=8, do_sample=False)[0, 11:].tolist()
    assert got == want


def test_flops_per_token_counts_matrices_and_attention():
    from lit_llm.callbacks import flops_per_token

    cfg = tiny()
    model = Transformer(cfg)
    d, hd, L = 32, 8, 2
    per_layer = d * hd * (4 + 2 * 2) + 4 * hd * d + 3 * d * cfg.intermediate_size + 2 * d  # + two norms
    n = L * per_layer + d + 97 * d  # final norm, tied head
    assert flops_per_token(model, 16) == 6 * n + 6 * L * 16 * 4 * hd


def test_rope_frequencies_stay_float32_after_a_dtype_cast():
    model = Transformer(tiny()).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, inv_frequencies(8, 10000.0))
