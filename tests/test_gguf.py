"""GGUF export (issue 18): the file read back with the ``gguf`` library's reader.

The model in the file is checked three ways: every tensor against the model's weight (with the RoPE row
interleave written out by hand here), the metadata against the config, and a small numpy forward pass that
computes the way llama.cpp does (adjacent-pair RoPE, its tensor layout, sigmoid-routed experts scaled at the
input for ``llama4``) from the file alone and must give our logits. The tokenizer is rebuilt from the file and
must encode as ours does; the chat template, rendered with Jinja, must give ``render_chat``'s tokens. The test
that runs llama.cpp itself is skipped unless ``llama_cpp`` (llama-cpp-python) is importable.
"""

from __future__ import annotations

import json
import os

import gguf
import jinja2
import numpy as np
import pytest
import torch

from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.model import Transformer
from lit_llm.data import tinyworld
from lit_llm.errors import UserError
from lit_llm.formats.gguf import chat_template, export_gguf
from lit_llm.tokenizer import Tokenizer

# a Llama 4 model llama.cpp's llama4 expresses: its fixed chunk / NoPE / temperature values, QK-norm,
# MoE on every second layer (dense layers in between), top-1 sigmoid routing on the input, a shared expert
LLAMA4_OK = dict(
    vocab_size=400,
    n_layer=4,
    n_embd=64,
    n_head=4,
    n_kv_head=2,
    intermediate_size=96,
    moe_n_expert=4,
    moe_top_k=1,
    moe_every=2,
    moe_intermediate_size=64,
    moe_score="sigmoid",
    moe_weight_input=True,
    moe_shared_expert=True,
    nope_every=4,
    attention_chunk_size=8192,
    qk_norm=True,
    attn_temperature_tuning=True,
    attn_floor_scale=8192.0,
    attn_scale=0.1,
    tie_embeddings=False,
    rope_theta=500000.0,
)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(tinyworld.pretrain_text(300), "bpe", 400)


def _model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with every weight perturbed (norm weights not 1, nothing symmetric by accident)."""
    torch.manual_seed(seed)
    values = dict(vocab_size=400, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64)
    model = Transformer(ModelConfig(**{**values, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _read(path) -> tuple[dict[str, np.ndarray], dict[str, str], gguf.GGUFReader]:
    """Tensors (dequantised to float32, PyTorch shape) and their GGML type names."""
    r = gguf.GGUFReader(path)
    tensors, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        types[t.name] = t.tensor_type.name
    return tensors, types, r


def _field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def _interleave(w: torch.Tensor, n_head: int, d: int) -> torch.Tensor:
    """Half-split RoPE rows -> adjacent pairs, per head: new row 2i = old row i, 2i+1 = old row i + d/2."""
    w = w.reshape(n_head, d, -1)
    out = torch.empty_like(w)
    out[:, 0::2], out[:, 1::2] = w[:, : d // 2], w[:, d // 2 :]
    return out.reshape(n_head * d, -1)


# ------------------------------------------------------------------ a forward pass as llama.cpp computes it
def _rms(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def _rope_adjacent(x: np.ndarray, theta: float, factors: np.ndarray | None) -> np.ndarray:
    """llama.cpp's NORM RoPE on ``x`` ``(T, H, D)``: pair ``(2i, 2i+1)`` by ``pos * theta^(-2i/D) / f_i``."""
    T, _, D = x.shape
    freq = theta ** (-np.arange(0, D, 2) / D)
    if factors is not None:
        freq = freq / factors
    ang = np.arange(T)[:, None, None] * freq[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """Logits ``(T, V)`` computed from the GGUF file alone, following llama.cpp's llama / llama4 graphs."""
    W, _, r = _read(path)
    W = {k: v.astype(np.float64) for k, v in W.items()}
    arch = _field(r, "general.architecture")
    kv = {k: _field(r, k) for k in r.fields if k.startswith(arch + ".")}
    L, H, Hkv = (
        kv[f"{arch}.block_count"],
        kv[f"{arch}.attention.head_count"],
        kv[f"{arch}.attention.head_count_kv"],
    )
    D, eps, theta = (
        kv[f"{arch}.rope.dimension_count"],
        kv[f"{arch}.attention.layer_norm_rms_epsilon"],
        kv[f"{arch}.rope.freq_base"],
    )
    factors = W.get("rope_freqs.weight")
    T = len(ids)
    x = W["token_embd.weight"][ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(L):
        b = f"blk.{i}."
        h = _rms(x, W[b + "attn_norm.weight"], eps)
        q = (h @ W[b + "attn_q.weight"].T).reshape(T, H, D)
        k = (h @ W[b + "attn_k.weight"].T).reshape(T, Hkv, D)
        v = (h @ W[b + "attn_v.weight"].T).reshape(T, Hkv, D)
        use_rope = arch == "llama" or (i + 1) % 4 != 0  # llama4: every 4th layer is NoPE
        if use_rope:
            q, k = _rope_adjacent(q, theta, factors), _rope_adjacent(k, theta, factors)
            if arch == "llama4":  # QK-norm (no weight) on the RoPE layers
                q, k = _rms(q, None, eps), _rms(k, None, eps)
        elif arch == "llama4":  # temperature tuning, llama.cpp's fixed floor 8192 and scale 0.1
            pos = np.arange(T)
            q = q * (np.log(np.floor((pos + 1.0) / 8192) + 1) * 0.1 + 1)[:, None, None]
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, H * D)
        x = x + o @ W[b + "attn_output.weight"].T
        h = _rms(x, W[b + "ffn_norm.weight"], eps)
        if b + "ffn_gate_inp.weight" in W:
            n_used = kv[f"{arch}.expert_used_count"]
            logits = h @ W[b + "ffn_gate_inp.weight"].T  # (T, E)
            ff = np.zeros_like(h)
            for t in range(T):
                for e in np.argsort(-logits[t])[:n_used]:
                    xe = h[t] / (1 + np.exp(-logits[t, e]))  # the sigmoid weight scales the input
                    g, u = W[b + "ffn_gate_exps.weight"][e] @ xe, W[b + "ffn_up_exps.weight"][e] @ xe
                    ff[t] += W[b + "ffn_down_exps.weight"][e] @ (_silu(g) * u)
            sg, su = h @ W[b + "ffn_gate_shexp.weight"].T, h @ W[b + "ffn_up_shexp.weight"].T
            ff += (_silu(sg) * su) @ W[b + "ffn_down_shexp.weight"].T
        else:
            ff = (_silu(h @ W[b + "ffn_gate.weight"].T) * (h @ W[b + "ffn_up.weight"].T)) @ W[
                b + "ffn_down.weight"
            ].T
        x = x + ff
    out = W.get("output.weight", W["token_embd.weight"])
    return _rms(x, W["output_norm.weight"], eps) @ out.T


def _our_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


# ----------------------------------------------------------------------------------------------- tests
def test_llama_tensors_and_metadata_match_the_model(tmp_path, bpe):
    model = _model(tie_embeddings=False)
    c = model.config
    tensors, types, r = _read(export_gguf(model, bpe, tmp_path / "m.gguf"))
    sd = {k: v.float() for k, v in model.state_dict().items()}
    want = {
        "token_embd.weight": sd["embed_tokens.weight"],
        "output_norm.weight": sd["norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(c.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        want.update(
            {
                b + "attn_norm.weight": sd[p + "input_norm.weight"],
                b + "attn_q.weight": _interleave(sd[p + "attn.q_proj.weight"], c.n_head, c.head_dim),
                b + "attn_k.weight": _interleave(sd[p + "attn.k_proj.weight"], c.n_kv_head, c.head_dim),
                b + "attn_v.weight": sd[p + "attn.v_proj.weight"],
                b + "attn_output.weight": sd[p + "attn.o_proj.weight"],
                b + "ffn_norm.weight": sd[p + "post_attention_norm.weight"],
                b + "ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                b + "ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                b + "ffn_down.weight": sd[p + "mlp.down_proj.weight"],
            }
        )
    assert set(tensors) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(tensors[name], w.numpy(), err_msg=name)
    assert set(types.values()) == {"F32"}
    meta = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "llama.vocab_size": c.vocab_size,
        "llama.context_length": c.block_size,
        "llama.embedding_length": c.n_embd,
        "llama.block_count": c.n_layer,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.n_head,
        "llama.attention.head_count_kv": c.n_kv_head,
        "llama.attention.key_length": c.head_dim,
        "llama.attention.value_length": c.head_dim,
        "llama.rope.dimension_count": c.head_dim,
    }
    assert {k: _field(r, k) for k in meta} == meta
    assert _field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tied head: no output.weight, llama.cpp reuses token_embd
        {"tie_embeddings": False, "head_dim": 24, "rope_theta": 500000.0},
        {"rope_scaling_factor": 8.0, "rope_original_max_seq_len": 16, "rope_theta": 500000.0},
    ],
    ids=["tied", "untied-headdim", "llama3-rope"],
)
def test_llama_forward_from_the_file_gives_our_logits(tmp_path, bpe, overrides):
    model = _model(**overrides)
    path = export_gguf(model, bpe, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) == (not model.config.tie_embeddings)
    assert ("rope_freqs.weight" in names) == (model.config.rope_scaling_factor is not None)
    ids = bpe.encode("Alice is in the garden. Alice has 3 apples and Bob has")
    np.testing.assert_allclose(_llama_cpp_logits(path, ids), _our_logits(model, ids), atol=2e-4, rtol=0)


def test_llama4_forward_from_the_file_gives_our_logits(tmp_path, bpe):
    model = _model(**LLAMA4_OK)
    c = model.config
    path = export_gguf(model, bpe, tmp_path / "m4.gguf")
    tensors, _, r = _read(path)
    assert _field(r, "general.architecture") == "llama4"
    meta = {
        "llama4.expert_count": c.moe_n_expert,
        "llama4.expert_used_count": c.moe_top_k,
        "llama4.expert_feed_forward_length": c.moe_intermediate_size,
        "llama4.interleave_moe_layer_step": c.moe_every,
        "llama4.feed_forward_length": c.intermediate_size,
    }
    assert {k: _field(r, k) for k in meta} == meta
    assert "blk.1.ffn_gate_exps.weight" in tensors and "blk.0.ffn_gate.weight" in tensors
    assert tensors["blk.1.ffn_gate_exps.weight"].shape == (4, 64, 64)
    # the NoPE layer (3) keeps its rows; RoPE layers are interleaved
    sd = model.state_dict()
    np.testing.assert_array_equal(tensors["blk.3.attn_q.weight"], sd["layers.3.attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(
        tensors["blk.2.attn_q.weight"], _interleave(sd["layers.2.attn.q_proj.weight"], 4, 16).numpy()
    )
    ids = bpe.encode("Bob is in the kitchen. Bob has 2 cups. Alice is in the")
    np.testing.assert_allclose(_llama_cpp_logits(path, ids), _our_logits(model, ids), atol=2e-4, rtol=0)


def test_dtypes_and_q8_0(tmp_path, bpe):
    model = _model(intermediate_size=80)  # rows of 80 are not a multiple of 32: ffn_down falls back to f16
    ref = {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        tensors, types, r = _read(export_gguf(model, bpe, tmp_path / f"{dtype}.gguf", dtype=dtype))
        ref[dtype] = tensors
        assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
        assert _field(r, "general.file_type") == int({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[dtype])
        if dtype == "q8_0":
            assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
            assert types["blk.0.ffn_down.weight"] == "F16"
        elif dtype != "f32":
            assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_down.weight"] == dtype.upper()
    emb = model.embed_tokens.weight.detach()
    np.testing.assert_array_equal(ref["f16"]["token_embd.weight"], emb.half().float().numpy())
    np.testing.assert_array_equal(ref["bf16"]["token_embd.weight"], emb.bfloat16().float().numpy())
    # Q8_0: blocks of 32 with one float16 scale d = max|x|/127 each: error at most half a step, plus the
    # rounding of d to float16 (relative 2^-11) times the largest code 127
    q = ref["q8_0"]["token_embd.weight"]
    step = np.abs(emb.numpy()).reshape(-1, 32).max(1, keepdims=True) / 127
    err = np.abs(q - emb.numpy()).reshape(-1, 32)
    assert (err <= step * (0.5 + 127 / 2048)).all() and err.max() > 0


def test_tokenizer_round_trips_through_the_file(tmp_path, bpe):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    model = _model(vocab_size=410)  # 10 more ids than tokens: written as unused pads
    r = gguf.GGUFReader(export_gguf(model, bpe, tmp_path / "m.gguf"))
    tokens, types, merges = (_field(r, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    assert (_field(r, "tokenizer.ggml.model"), _field(r, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    vocab = bpe.tok.get_vocab(with_added_tokens=True)
    assert tokens[: bpe.vocab_size] == sorted(vocab, key=vocab.get)
    assert tokens[400:] == [f"[PAD{i}]" for i in range(400, 410)]
    assert types[:7] == [int(gguf.TokenType.CONTROL)] * 7
    assert set(types[7:400]) == {int(gguf.TokenType.NORMAL)}
    assert set(types[400:]) == {int(gguf.TokenType.UNUSED)}
    assert merges == [" ".join(m) for m in json.loads(bpe.tok.to_str())["model"]["merges"]]
    ids = {k: _field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "padding")}
    assert ids == {"bos": bpe.bos_id, "eos": bpe.eos_id, "eot": bpe.end_id, "padding": bpe.pad_id}
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    # a BPE rebuilt from the file's tokens and merges alone encodes as ours does
    vocab_back = {t: i for i, t in enumerate(tokens[: bpe.vocab_size])}
    rebuilt = HFTokenizer(models.BPE(vocab_back, [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    for text in ["Alice has 3 apples.", "héllo wörld ✓ 12345\n\ttabs", "Who is in the garden?"]:
        assert rebuilt.encode(text).ids == bpe.encode(text)


def _render(template: str, messages, add_generation_prompt: bool) -> str:
    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_gives_render_chat_tokens(tmp_path, bpe):
    path = export_gguf(_model(), bpe, tmp_path / "m.gguf")
    template = _field(gguf.GGUFReader(path), "tokenizer.chat_template")
    assert template == chat_template(bpe)
    convs = [
        [{"role": "user", "content": "Who has 3 apples?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Alice is in the garden. Where is Alice?"},
            {"role": "assistant", "content": "the garden"},
            {"role": "user", "content": " And Bob?\n"},
        ],
    ]
    for msgs in convs:
        for gen in (True, False):
            text = _render(template, msgs, gen)
            # llama.cpp tokenizes the rendered text with special tokens parsed, as encode() does here
            assert bpe.encode(text) == bpe.render_chat(msgs, add_generation_prompt=gen)[0]
    with pytest.raises(ValueError, match="roles must be one of"):
        _render(template, [{"role": "tool", "content": "x"}], True)


@pytest.mark.parametrize(
    "overrides, arch, words",
    [
        (dict(pos="learned"), "auto", ["pos='learned'", "gpt2"]),
        (
            dict(norm="layernorm", mlp="gelu", bias=True),
            "auto",
            ["norm='layernorm'", "mlp='gelu'", "bias=True"],
        ),
        (dict(nope_every=2), "llama", ["nope_every=2", "llama4"]),
        ({**LLAMA4_OK, "attention_chunk_size": 64}, "auto", ["attention_chunk_size=64", "8192"]),
        ({**LLAMA4_OK, "nope_every": 2}, "auto", ["nope_every=2", "4"]),
        ({**LLAMA4_OK, "qk_norm": False}, "auto", ["qk_norm=False", "128 experts"]),
        ({**LLAMA4_OK, "moe_score": "softmax"}, "auto", ["moe_score='softmax'", "sigmoid"]),
        (dict(), "llama4", ["moe_n_expert=0", "dense model exports as llama"]),
        (dict(sliding_window=8), "auto", ["sliding_window=8"]),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, bpe, overrides, arch, words):
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError) as err:
        export_gguf(_model(**overrides), bpe, out, arch=arch)
    for w in words:
        assert w in str(err.value)
    assert not out.exists()


def test_llama4_tiny_preset_is_refused_for_its_chunk_and_floor(tmp_path, bpe):
    model = Transformer(ModelConfig.from_name("llama4-tiny", vocab_size=400))
    with pytest.raises(UserError, match=r"attention_chunk_size=64 .*attn_floor_scale=64.0"):
        export_gguf(model, bpe, tmp_path / "m.gguf")


def test_character_tokenizer_is_refused(tmp_path):
    tok = Tokenizer.train(["abc\nab"], "char")
    with pytest.raises(UserError, match="byte-level BPE"):
        export_gguf(_model(vocab_size=tok.vocab_size), tok, tmp_path / "m.gguf")


def test_missing_folder_and_bad_dtype(tmp_path, bpe):
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(_model(), bpe, tmp_path / "nope" / "m.gguf")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(UserError, match="is a folder"):
        export_gguf(_model(), bpe, tmp_path)
    with pytest.raises(UserError, match="q4_0"):
        export_gguf(_model(), bpe, tmp_path / "m.gguf", dtype="q4_0")


def test_existing_file_is_replaced_whole_or_kept(tmp_path, bpe, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the old export")

    def crash(self, *args, **kwargs):  # the disk fills up / the process dies while tensors are written
        self.fout[0].write(b"half a tensor")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
        with pytest.raises(OSError, match="No space"):
            export_gguf(_model(), bpe, out)
    assert out.read_bytes() == b"the old export"
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temp file left behind
    export_gguf(_model(), bpe, out)
    assert _field(gguf.GGUFReader(out), "general.architecture") == "llama"
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_cli_export_gguf_and_hf(tmp_path, sft_ckpt, capsys):
    from lit_llm.checkpoint import load_for_inference
    from lit_llm.cli import main

    out = tmp_path / "sft.gguf"
    main(["export", "--ckpt", str(sft_ckpt), "--out", str(out), "--format", "gguf", "--dtype", "f16"])
    assert f"exported to {out}" in capsys.readouterr().out
    tensors, types, r = _read(out)
    model, tok, _ = load_for_inference(sft_ckpt)
    assert types["blk.0.attn_q.weight"] == "F16"
    assert _field(r, "tokenizer.chat_template") == chat_template(tok)
    ids = tok.prompt_ids("Alice is in the garden. Where is Alice?")
    np.testing.assert_allclose(_llama_cpp_logits(out, ids), _our_logits(model, ids), atol=5e-2, rtol=0)
    # the default format is still a Hugging Face folder
    main(["export", "--ckpt", str(sft_ckpt), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    with pytest.raises(UserError, match="--format gguf"):
        main(["export", "--ckpt", str(sft_ckpt), "--out", str(tmp_path / "hf2"), "--dtype", "q8_0"])


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _llama_cpp_available(), reason="llama-cpp-python is not installed (compiles llama.cpp)"
)
def test_llama_cpp_decodes_as_we_do(tmp_path, sft_ckpt):
    """llama.cpp itself: same prompt tokens and the same greedy tokens as our decoding."""
    from benchmarks.gguf_llama_cpp import compare

    result = compare(sft_ckpt, tmp_path / "sft.gguf", n_prompts=5, max_new_tokens=16)
    assert result["prompt_tokens_equal"] == result["n_prompts"]
    assert result["greedy_equal"] == result["n_prompts"], result["mismatches"]
    assert result["chat_completion_equal"] == result["n_prompts"]


@pytest.mark.skipif(
    not os.environ.get("LLAMA_CPP_DIR"),
    reason="set LLAMA_CPP_DIR to a llama.cpp source folder (its converter)",
)
@pytest.mark.parametrize(
    "overrides",
    [dict(tie_embeddings=False, rope_scaling_factor=8.0, rope_original_max_seq_len=16), LLAMA4_OK],
    ids=["llama", "llama4"],
)
def test_same_file_as_llama_cpp_converter(tmp_path, bpe, overrides):
    """llama.cpp's convert_hf_to_gguf.py on our Hugging Face export writes the same tensors and metadata."""
    from benchmarks.gguf_llama_cpp import crosscheck_converter

    r = crosscheck_converter(_model(**overrides), bpe, os.environ["LLAMA_CPP_DIR"], tmp_path)
    assert r["tensors"] > 10
    assert r["tensor_names_differ"] == r["keys_differ"] == []
    # every weight bit-identical; only the Llama-3 RoPE factors differ in float32 rounding
    assert set(r["tensors_differ"]) <= {"rope_freqs.weight"} and r["max_rel_diff"] < 1e-6


@pytest.mark.skipif(
    not _llama_cpp_available(), reason="llama-cpp-python is not installed (compiles llama.cpp)"
)
@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_embeddings=False, head_dim=24, rope_scaling_factor=8.0, rope_original_max_seq_len=16),
        LLAMA4_OK,
    ],
    ids=["llama", "llama4"],
)
def test_llama_cpp_logits_equal_ours(tmp_path, bpe, overrides):
    """llama.cpp's own forward on the file: every position's logits as ours (float32 file)."""
    from benchmarks.gguf_llama_cpp import logits_vs_llama_cpp

    text = "Alice is in the garden. Alice has 3 apples and Bob has 2 cups. Who has"
    assert logits_vs_llama_cpp(_model(**overrides), bpe, tmp_path / "m.gguf", text) < 5e-3
