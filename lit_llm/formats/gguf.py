"""Export to GGUF, the file format of llama.cpp (and of Ollama, LM Studio, llama-cpp-python built on it).

:func:`export_gguf` writes one ``.gguf`` file with the ``gguf`` library (the reference writer that
llama.cpp's own converter uses): the architecture metadata, every tensor in the layout llama.cpp reads, the
tokenizer and the chat template. ``lit-llm export --format gguf`` calls it.

- **Architectures.** A dense model becomes llama.cpp's ``llama``; a Llama 4 model (MoE, iRoPE, QK-norm)
  its ``llama4``. llama.cpp's ``llama4`` hard-codes several values that a ``ModelConfig`` leaves free
  (chunk size 8192, a NoPE layer every 4th, temperature tuning with floor 8192 and scale 0.1, QK-norm unless
  there are 128 experts); a config that differs is refused, naming the field, never approximated.
- **RoPE layout.** Our RoPE rotates the half-split pairs ``(x[i], x[i + D/2])`` (as Hugging Face Llama);
  llama.cpp's ``llama`` and ``llama4`` rotate adjacent pairs ``(x[2i], x[2i+1])``. The rows of every RoPE
  layer's ``q`` and ``k`` projections are therefore interleaved within each head (row ``2i`` takes our row
  ``i``, row ``2i+1`` our row ``i + D/2``), the permutation llama.cpp's ``convert_hf_to_gguf.py`` applies to
  Hugging Face Llama checkpoints. Attention scores are unchanged: queries and keys get the same permutation.
  NoPE layers are not rotated and keep their rows.
- **Tokenizer.** Our byte-level BPE with the GPT-2 split regex is llama.cpp's tokenizer model ``gpt2`` with
  pre-tokenizer ``gpt-2``: the token strings and merges are written as they are, the special tokens as
  control tokens. ``<|eos|>`` is the end-of-sequence token and ``<|end|>`` (which closes every chat turn) the
  end-of-turn token; llama.cpp stops generating at either. No BOS is added to raw prompts (``lit-llm
  generate`` adds none); the chat template writes ``<|bos|>`` itself.
- **Types.** ``f32``, ``f16``, ``bf16``, or ``q8_0`` (llama.cpp's 8-bit blocks of 32 with one float16 scale,
  quantised by the ``gguf`` library). As llama.cpp's converter does, vectors (norm weights, RoPE factors) and
  the MoE router stay float32, and a matrix whose rows are not a multiple of 32 long falls back from
  ``q8_0`` to ``f16``.

The file is written to a temporary file in the destination folder, synced, then renamed over the target: an
existing file is replaced whole or left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np
import torch

from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.rope import inv_frequencies
from lit_llm.errors import MissingCheckpointError, UserError
from lit_llm.formats.llama import _llama4_only, _llama_blockers, _permute_rows, _rope_permutation

if TYPE_CHECKING:
    from lit_llm.backbone.model import Transformer
    from lit_llm.tokenizer import Tokenizer

GGUFArch = Literal["auto", "llama", "llama4"]
GGUFType = Literal["f32", "f16", "bf16", "q8_0"]

Q = gguf.GGMLQuantizationType
TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# the values llama.cpp's ``llama4`` uses whatever the file says (src/models/llama4.cpp)
LLAMA4_FIXED: dict[str, Any] = {
    "nope_every": 4,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "attn_floor_scale": 8192.0,
    "attn_scale": 0.1,
}
_GPT2_FLAVOUR = (
    "llama.cpp's `gpt2` architecture would express the GPT-2 flavour (LayerNorm, GELU, learned positions, "
    "biases), but this exporter writes llama and llama4 only"
)


# ------------------------------------------------------------------------------------------ architecture
def _llama4_blockers(config: ModelConfig) -> list[str]:
    bad = []
    if config.moe_n_expert == 0:
        bad.append("moe_n_expert=0 (llama.cpp's llama4 needs experts; a dense model exports as llama)")
    else:
        if config.moe_score != "sigmoid":
            bad.append(f"moe_score={config.moe_score!r} (llama4 routes with sigmoid)")
        if not config.moe_weight_input:
            bad.append("moe_weight_input=False (llama4 scales the expert input)")
        if not config.moe_shared_expert:
            bad.append("moe_shared_expert=False (llama4 always has a shared expert)")
        if config.moe_renormalize:
            bad.append("moe_renormalize=True")
    for field, want in LLAMA4_FIXED.items():
        if getattr(config, field) != want:
            bad.append(f"{field}={getattr(config, field)!r} (llama.cpp fixes it to {want!r})")
    want_qk = config.moe_n_expert != 128
    if config.qk_norm != want_qk:
        bad.append(
            f"qk_norm={config.qk_norm} (llama.cpp applies QK-norm exactly when there are not 128 experts, "
            f"here {config.moe_n_expert})"
        )
    if config.sliding_window is not None:
        bad.append(f"sliding_window={config.sliding_window} (llama4 has chunked attention, no window)")
    return bad


def gguf_arch(config: ModelConfig, arch: GGUFArch = "auto") -> Literal["llama", "llama4"]:
    """The llama.cpp architecture for ``config``; a :class:`UserError` names every field it cannot express.

    Args:
        config: The model's config.
        arch: ``llama``, ``llama4``, or ``auto`` (``llama`` for a dense model, else ``llama4``).
    """
    if arch not in ("auto", "llama", "llama4"):
        raise UserError(f"arch must be 'auto', 'llama' or 'llama4', got {arch!r}")
    flavour = _llama_blockers(config)
    if flavour:
        raise UserError(
            f"cannot export {config.name!r} to GGUF: llama.cpp's llama/llama4 architectures cannot express "
            f"{', '.join(flavour)} ({_GPT2_FLAVOUR}); train a Llama-flavoured model (pos rope, norm "
            "rmsnorm, mlp swiglu, no bias) to export"
        )
    if arch == "auto":
        arch = "llama4" if _llama4_only(config) else "llama"
    if arch == "llama":
        bad = _llama4_only(config)
        if config.sliding_window is not None:
            bad.append(f"sliding_window={config.sliding_window}")
        hint = (
            "" if config.sliding_window is not None else "; llama.cpp's llama4 architecture may (arch llama4)"
        )
    else:
        bad, hint = _llama4_blockers(config), ""
    if bad:
        raise UserError(
            f"cannot export {config.name!r} as llama.cpp's {arch!r} architecture: it cannot express "
            f"{'; '.join(bad)}{hint}"
        )
    return arch


# --------------------------------------------------------------------------------------------- tensors
def _rope_layer(config: ModelConfig, i: int) -> bool:
    return config.pos == "rope" and not config.is_nope_layer(i)


def gguf_tensors(model: Transformer, arch: Literal["llama", "llama4"]) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's tensor names, in its layout (float32, on the CPU).

    Shapes are PyTorch's (``(out, in)`` for a projection); GGUF lists the dimensions reversed, so llama.cpp
    sees ``{in, out}``. Experts are split into ``ffn_gate_exps`` / ``ffn_up_exps`` ``(E, H, C)`` and
    ``ffn_down_exps`` ``(E, C, H)``.
    """
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR

    def name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
        return names[kind].format(bid=bid) + ".weight"

    out = {name(T.TOKEN_EMBD): state["embed_tokens.weight"], name(T.OUTPUT_NORM): state["norm.weight"]}
    if not config.tie_embeddings:  # a tied head: llama.cpp reuses token_embd when output is absent
        out[name(T.OUTPUT)] = state["lm_head.weight"]
    if config.rope_scaling_factor is not None:
        # Llama-3 scaling as llama.cpp applies it: each frequency divided by a per-dimension factor
        plain = inv_frequencies(config.head_dim, config.rope_theta).double()
        scaled = inv_frequencies(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling_factor,
            config.rope_low_freq_factor,
            config.rope_high_freq_factor,
            config.rope_original_max_seq_len,
        ).double()
        out[names[T.ROPE_FREQS] + ".weight"] = (plain / scaled).float()
    interleave = torch.argsort(_rope_permutation(config.head_dim))  # half-split rows -> adjacent pairs
    for i in range(config.n_layer):
        p = f"layers.{i}."
        q, k = state[p + "attn.q_proj.weight"], state[p + "attn.k_proj.weight"]
        if _rope_layer(config, i):
            q = _permute_rows(q, config.n_head, config.head_dim, interleave)
            k = _permute_rows(k, config.n_kv_head, config.head_dim, interleave)
        out.update(
            {
                name(T.ATTN_NORM, i): state[p + "input_norm.weight"],
                name(T.ATTN_Q, i): q,
                name(T.ATTN_K, i): k,
                name(T.ATTN_V, i): state[p + "attn.v_proj.weight"],
                name(T.ATTN_OUT, i): state[p + "attn.o_proj.weight"],
                name(T.FFN_NORM, i): state[p + "post_attention_norm.weight"],
            }
        )
        if config.is_moe_layer(i):
            bias = state.get(p + "mlp.expert_bias")
            if bias is not None and bool(bias.ne(0).any()):
                raise UserError(
                    f"layer {i} has a non-zero expert selection bias (moe_bias_update), which llama.cpp's "
                    "llama4 cannot express"
                )
            gate_up = state[p + "mlp.experts.gate_up_proj"]  # (E, C, 2H), x @ W layout, [gate | up]
            gate, up = gate_up.chunk(2, dim=-1)
            out.update(
                {
                    name(T.FFN_GATE_INP, i): state[p + "mlp.router.weight"],
                    name(T.FFN_GATE_EXP, i): gate.transpose(1, 2),
                    name(T.FFN_UP_EXP, i): up.transpose(1, 2),
                    name(T.FFN_DOWN_EXP, i): state[p + "mlp.experts.down_proj"].transpose(1, 2),
                    name(T.FFN_GATE_SHEXP, i): state[p + "mlp.shared_expert.gate_proj.weight"],
                    name(T.FFN_UP_SHEXP, i): state[p + "mlp.shared_expert.up_proj.weight"],
                    name(T.FFN_DOWN_SHEXP, i): state[p + "mlp.shared_expert.down_proj.weight"],
                }
            )
        else:
            out.update(
                {
                    name(T.FFN_GATE, i): state[p + "mlp.gate_proj.weight"],
                    name(T.FFN_UP, i): state[p + "mlp.up_proj.weight"],
                    name(T.FFN_DOWN, i): state[p + "mlp.down_proj.weight"],
                }
            )
    return {k: v.contiguous() for k, v in out.items()}


def tensor_type(name: str, shape: tuple[int, ...], dtype: GGUFType) -> Q:
    """The GGML type a tensor is stored in for the requested ``dtype``.

    Vectors and the MoE router stay float32 (as in llama.cpp's converter: they are small and sensitive);
    ``q8_0`` needs rows that are a multiple of 32 long and falls back to ``f16`` otherwise.
    """
    if dtype not in TYPES:
        raise UserError(f"GGUF dtype must be one of {sorted(TYPES)}, got {dtype!r}")
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return Q.F32
    qtype = TYPES[dtype]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16
    return qtype


# ------------------------------------------------------------------------------------------- tokenizer
def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings by id, their GGUF token types, and the BPE merges (``"a b"``), for ``tokenizer.ggml``.

    The model's embedding may have more rows than the tokenizer has tokens: those ids are written as unused
    ``[PAD{id}]`` tokens, as llama.cpp's converter does.

    Raises:
        UserError: if the tokenizer is not a byte-level BPE with the GPT-2 split (a character tokenizer),
            which llama.cpp's ``gpt2`` tokenizer model would not reproduce.
    """
    spec = json.loads(tokenizer.tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = (
        pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    )
    if model.get("type") != "BPE" or not byte_level:
        raise UserError(
            "GGUF export needs a byte-level BPE tokenizer (llama.cpp tokenizer model 'gpt2', pre-tokenizer "
            f"'gpt-2'); this one is {model.get('type')} with pre-tokenizer {pre.get('type')!r} (a character "
            "tokenizer?): train a 'bpe' tokenizer, or use --format hf"
        )
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    by_id = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def chat_template(tokenizer: Tokenizer) -> str:
    """The tokenizer's own chat template (Jinja), as llama.cpp renders it: lit_llm's format
    (``LIT_LLM_TEMPLATE``) for a tokenizer trained here, the model's template for a real model's tokenizer.

    llama.cpp tokenizes the rendered text with special tokens parsed, exactly as ``render_chat`` does.
    """
    return tokenizer.require_template().source


# ------------------------------------------------------------------------------------------------ file
def _add_metadata(w: gguf.GGUFWriter, config: ModelConfig, arch: str, dtype: GGUFType) -> None:
    w.add_name(config.name)
    w.add_file_type(FILE_TYPES[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_head)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    if arch == "llama4":
        w.add_expert_count(config.moe_n_expert)
        w.add_expert_used_count(config.moe_top_k)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_interleave_moe_layer_step(config.moe_every)


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    tokens, types, merges = gguf_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
    w.add_eot_token_id(tokenizer.end_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(tokenizer.adds_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template(tokenizer))


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    dtype: GGUFType = "f32",
    arch: GGUFArch = "auto",
) -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file that llama.cpp loads.

    Args:
        model: The backbone to export (any dtype; weights are read as float32 and stored as ``dtype``).
        tokenizer: Its tokenizer (byte-level BPE).
        path: The ``.gguf`` file to write. Its folder must exist; an existing file is replaced atomically.
        dtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (see the module docstring for what stays float32).
        arch: ``llama``, ``llama4``, or ``auto`` (``llama`` for a dense model, else ``llama4``).

    Returns:
        The path written.

    Raises:
        UserError: for a config llama.cpp cannot express (naming the fields), a non-BPE tokenizer, an
            unknown dtype, or a missing output folder.
    """
    config = model.config
    kind = gguf_arch(config, arch)
    if dtype not in TYPES:
        raise UserError(f"GGUF dtype must be one of {sorted(TYPES)}, got {dtype!r}")
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{target} is a folder; give the path of the .gguf file to write inside it")
    if not target.parent.is_dir():
        raise UserError(f"the output folder {target.parent} does not exist; create it first")
    tensors = gguf_tensors(model, kind)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[_ARCHS[kind]])
        _add_metadata(w, config, kind, dtype)
        _add_tokenizer(w, tokenizer, config.vocab_size)
        for name, t in tensors.items():
            qtype = tensor_type(name, tuple(t.shape), dtype)
            data = gguf.quants.quantize(t.numpy().astype(np.float32, copy=False), qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "llama4": gguf.MODEL_ARCH.LLAMA4}


# ------------------------------------------------------------------------------------------------ import
# types the ``gguf`` library dequantises (besides plain floats); llama.cpp's newer ones may be missing
_PLAIN = {Q.F32, Q.F16, Q.BF16}


def _dequantisable() -> set[Any]:
    traits = getattr(gguf.quants, "_type_traits", {})
    return _PLAIN | set(traits)


def check_gguf(path: str | os.PathLike) -> str:
    """The architecture of a GGUF file, refusing one we cannot run or whose tensor types the ``gguf`` library
    cannot dequantise, before anything is loaded.

    Raises:
        UserError: naming the architecture or the quantisation types.
    """
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "?"
    if arch != "llama":
        raise UserError(
            f"{path}: GGUF architecture {arch!r} is not one we load (llama: Llama, Llama 3, SmolLM, "
            "TinyLlama); convert the original Hugging Face folder instead"
        )
    types = {Q(t.tensor_type) for t in reader.tensors}
    bad = sorted(t.name for t in types - _dequantisable())
    if bad:
        raise UserError(
            f"{path}: the gguf library cannot dequantise tensor type(s) {bad}; use a file quantised as Q8_0, "
            "Q4_0/Q4_1, a K-quant, or float"
        )
    return arch


def import_gguf(path: str | os.PathLike) -> tuple[Transformer, Tokenizer]:
    """A GGUF file (llama.cpp's ``llama`` architecture, any quantisation the ``gguf`` library dequantises) as
    our float32 ``Transformer`` and its tokenizer with the file's chat template.

    The file is read by ``transformers``' GGUF loader (which dequantises with the ``gguf`` library, undoes
    llama.cpp's RoPE row permutation and rebuilds ``tokenizer.json`` from the vocabulary and merges); nothing
    here parses GGUF by hand. Needs ``transformers`` (``pip install -e ".[dev]"``).
    """
    from lit_llm.formats.hf import from_hf_state

    target = Path(path)
    if not target.is_file():
        raise MissingCheckpointError(target, "GGUF file")
    check_gguf(target)
    try:
        import transformers
    except ImportError:
        raise UserError(
            "reading a GGUF file needs transformers: pip install transformers (or the project's [dev] extra)"
        ) from None

    from lit_llm.formats.hf import config_from_hf

    folder, name = str(target.parent), target.name
    with warnings_quiet():
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = import_gguf_tokenizer(target, hf.generation_config)
    config = config_from_hf(hf.config)
    model = from_hf_state(hf.state_dict(), config, hf.config.model_type, target)
    return model.eval(), tokenizer


def import_gguf_tokenizer(path: str | os.PathLike, generation_config: Any = None) -> Tokenizer:
    """The tokenizer of a GGUF file (``tokenizer.json`` rebuilt by ``transformers``, the file's chat template)."""
    import tempfile

    import transformers

    from lit_llm.tokenizer import Tokenizer
    from lit_llm.tokenizer.files import read_tokenizer_files

    target = Path(path)
    if not target.is_file():
        raise MissingCheckpointError(target, "GGUF file")
    with warnings_quiet():
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(target.parent), gguf_file=target.name)
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        return Tokenizer.from_files(read_tokenizer_files(tmp))


@contextlib.contextmanager
def warnings_quiet():
    """transformers' progress bars and notes while it converts a GGUF file are not the user's concern."""
    import warnings

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
