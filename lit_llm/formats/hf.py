"""Hugging Face model folders: our ``Transformer`` to and from ``LlamaForCausalLM``, ``Llama4ForCausalLM`` and
``Llama4ForConditionalGeneration``, by architecture family (the mappings: :mod:`lit_llm.formats.llama`,
:mod:`lit_llm.formats.llama4`).

Configs and state dicts go both ways; ``export_hf`` / ``import_hf`` write and read a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline.
Neither needs ``transformers`` installed: configs are plain dicts, weights plain safetensors.

A config that a side cannot express (biases, another RoPE scaling type, a NoPE / MoE layer pattern that is
not "every n-th", a sliding window in a Llama 4 export, ...) is refused with the reason, never approximated.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.model import Transformer
from lit_llm.formats.llama import (
    _config_dict,
    _llama4_only,
    config_from_hf_llama,
    hf_llama_config_dict,
    state_dict_from_hf_llama,
    state_dict_to_hf_llama,
)
from lit_llm.formats.llama4 import (
    _image_token_fields,
    config_from_hf_llama4,
    config_from_hf_llama4_vision,
    hf_llama4_config_dict,
    hf_llama4_vision_config_dict,
    state_dict_from_hf_llama4,
    state_dict_from_hf_llama4_vision,
    state_dict_to_hf_llama4,
    state_dict_to_hf_llama4_vision,
)

if TYPE_CHECKING:
    from lit_llm.tokenizer import Tokenizer

Arch = Literal["auto", "llama", "llama4"]


# ------------------------------------------------------------------------------------- either, by arch
def hf_arch(config: ModelConfig) -> Literal["llama", "llama4"]:
    """``llama`` when a Llama checkpoint expresses the config, else ``llama4`` (always with a vision tower)."""
    blockers = _llama4_only(config) + ([] if config.sliding_window is None else ["sliding_window"])
    blockers += [] if config.vision is None else ["vision"]
    return "llama4" if blockers else "llama"


def _resolve(config: ModelConfig, arch: Arch) -> Literal["llama", "llama4"]:
    if arch not in ("auto", "llama", "llama4"):
        raise ValueError(f"arch must be 'auto', 'llama' or 'llama4', got {arch!r}")
    return hf_arch(config) if arch == "auto" else arch


def hf_config_dict(config: ModelConfig, arch: Arch = "auto", **special_tokens: Any) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` or ``Llama4ForCausalLM`` (``auto``: Llama when it fits)."""
    if _resolve(config, arch) == "llama":
        return hf_llama_config_dict(config, **special_tokens)
    if config.vision is not None:
        return hf_llama4_vision_config_dict(config, **special_tokens)
    return hf_llama4_config_dict(config, **special_tokens)


def state_dict_to_hf(
    state: dict[str, torch.Tensor], config: ModelConfig, arch: Arch = "auto"
) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face names for ``arch`` (see :func:`hf_config_dict`)."""
    if _resolve(config, arch) == "llama":
        return state_dict_to_hf_llama(state, config)
    if config.vision is not None:
        return state_dict_to_hf_llama4_vision(state, config)
    return state_dict_to_hf_llama4(state, config)


# The architecture families we read, by Hugging Face ``model_type``: (config mapping, state-dict mapping). The
# export side dispatches on our config (``hf_arch``); both sides live in the family modules.
FAMILIES: dict[str, tuple[Any, Any]] = {
    "llama": (config_from_hf_llama, state_dict_from_hf_llama),
    "llama4_text": (config_from_hf_llama4, state_dict_from_hf_llama4),
    "llama4": (config_from_hf_llama4_vision, state_dict_from_hf_llama4_vision),
}
# Families we refuse, with what of theirs our backbone cannot express (add one with a parity test to lift it).
UNSUPPORTED: dict[str, str] = {
    "qwen2": "attention biases on q_proj / k_proj / v_proj (Qwen2 always has them; our attention has none)",
    "qwen2_moe": "attention biases on q_proj / k_proj / v_proj and Qwen's shared-expert gate",
    "qwen3": "per-head RMSNorm with weights on queries and keys (q_norm / k_norm) before RoPE",
    "gemma": "embeddings scaled by sqrt(hidden_size), RMSNorm weights stored as (w - 1), and GeGLU "
    "(hidden_activation gelu_pytorch_tanh)",
    "gemma2": "logit soft-capping (final_logit_softcapping, attn_logit_softcapping), sandwich norms, GeGLU",
    "gemma3": "sandwich norms, per-head query/key norms, GeGLU and two RoPE bases (local / global layers)",
    "gemma3_text": "sandwich norms, per-head query/key norms, GeGLU and two RoPE bases (local / global layers)",
    "mistral": "sliding_window attention (the backbone has a sliding window, but this mapping has no "
    "parity test yet)",
    "mixtral": "softmax top-2 routing over 8 experts (block_sparse_moe) and a sliding window",
    "phi": "LayerNorm, partial rotary embeddings (partial_rotary_factor), parallel attention + MLP, biases",
    "phi3": "fused qkv_proj and gate_up_proj weights (a split would be exact, but is not written yet) and "
    "longrope scaling",
    "gpt2": "LayerNorm, GELU, learned positions and biases (the gpt2-char-baby preset is that flavour, but no "
    "mapping to GPT2LMHeadModel exists)",
}


def _family(c: dict[str, Any]) -> str:
    kind = c.get("model_type")
    if kind == "llama4" or "vision_config" in c:
        return "llama4"
    if kind in FAMILIES:
        return kind
    reason = UNSUPPORTED.get(kind)
    if reason is not None:
        raise ValueError(f"cannot load model_type={kind!r}: our backbone cannot express its {reason}")
    raise ValueError(
        f"cannot load model_type={kind!r} (architectures {c.get('architectures')}): supported are "
        f"{', '.join(FAMILIES)} (Llama, Llama 3, SmolLM, TinyLlama, Llama 4)"
    )


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our config for a Hugging Face config (object or ``config.json`` dict) of a family in ``FAMILIES``;
    any other family is refused, naming what we cannot express."""
    c = _config_dict(hf_config)
    return FAMILIES[_family(c)][0](c)


def state_dict_from_hf(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, model_type: str
) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict of ``model_type`` (``llama`` / ``llama4_text`` / ``llama4``) in our names."""
    return FAMILIES[_family({"model_type": model_type})][1](hf_state, config)


def from_hf(hf_model: Any) -> Transformer:
    """Our ``Transformer`` from a Hugging Face ``LlamaForCausalLM``, ``Llama4ForCausalLM`` or
    ``Llama4ForConditionalGeneration`` instance."""
    config = config_from_hf(hf_model.config)
    model = Transformer(config)
    state = state_dict_from_hf(hf_model.state_dict(), config, hf_model.config.model_type)
    model.load_state_dict(state)
    return model


def to_hf(model: Transformer, arch: Arch = "auto") -> Any:
    """A Hugging Face model instance holding our weights (needs ``transformers``)."""
    import transformers

    kind = _resolve(model.config, arch)
    values = hf_config_dict(model.config, kind)
    for key in ("architectures", "model_type", "torch_dtype"):
        values.pop(key)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values))
    elif model.config.vision is not None:
        hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**values))
    else:
        hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**values))
    state = state_dict_to_hf(model.state_dict(), model.config, kind)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"conversion bug: missing {missing}, unexpected {unexpected}")
    dtype = model.embed_tokens.weight.dtype
    if dtype != torch.float32:
        with warnings.catch_warnings():  # the complex RoPE buffer's cast, repaired just below
            warnings.filterwarnings("ignore", message="Casting complex values to real")
            hf = hf.to(dtype)
        # Module.to(dtype) also casts complex buffers to real: recompute the vision RoPE's complex angles
        rotary = getattr(getattr(hf, "vision_model", None), "rotary_embedding", None)
        if rotary is not None:
            rotary.freqs_ci = rotary._compute_freqs_ci(rotary.config).to(rotary.freqs_ci.device)
    return hf.eval()


# ------------------------------------------------------------------------------------ folders on disk
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(
    model: Transformer,
    tokenizer: Tokenizer | None,
    out_dir: str | os.PathLike,
    arch: Arch = "auto",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a Hugging Face model folder: ``config.json``, ``model.safetensors`` and the tokenizer files.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` (``AutoModelForImageTextToText`` for a model with a
    vision tower, saved as ``Llama4ForConditionalGeneration``) and ``AutoTokenizer.from_pretrained(out_dir)``
    then load it offline. A tied output head is stored once (``tie_word_embeddings``).

    Args:
        model: The backbone to export.
        tokenizer: Its tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``
            are written; ``bos/eos/pad_token_id`` go into the config); ``None`` writes weights only.
        out_dir: Destination folder (created; existing files of the same names are replaced).
        arch: ``llama``, ``llama4`` or ``auto`` (Llama when the config fits it, else Llama 4).
        dtype: Store the weights in this dtype; defaults to the model's.

    Returns:
        The folder.
    """
    from safetensors.torch import save

    from lit_llm.atomic import atomic_save_many

    config = model.config
    kind = _resolve(config, arch)
    special: dict[str, Any] = {}
    if tokenizer is not None:
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
            )
        special = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.stop_ids,
            "pad_token_id": tokenizer.pad_id,
        }
        if config.vision is not None:
            special.update(_image_token_fields(config.vision, tokenizer))
    dtype = dtype or model.embed_tokens.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    values = hf_config_dict(config, kind, **special)
    values["torch_dtype"] = _DTYPE_NAMES[dtype]
    state = state_dict_to_hf(model.state_dict(), config, kind)
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {"config.json": json.dumps(values, indent=2) + "\n"}
    if tokenizer is not None:
        # the model's own tokenizer files as they were read (its chat template included), and a generation
        # config whose eos_token_id lists every stop id, so that transformers' generate stops where we do
        texts.update(tokenizer.export_files())
        generation = json.loads(texts.get("generation_config.json", "{}"))
        generation.update({k: v for k, v in special.items() if k.endswith("_token_id") and v is not None})
        texts["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    # all files written to temp files first, then renamed into place: an interrupted or failed export never
    # leaves a truncated file, nor new weights beside an old config, and an existing export stays whole
    items = [(tensors, out / "model.safetensors", lambda t, f: f.write(save(t, metadata={"format": "pt"})))]
    items += [(text, out / name, lambda t, f: f.write(t.encode("utf-8"))) for name, text in texts.items()]
    atomic_save_many(items)
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}")


def import_hf(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Load a Hugging Face folder of a family in ``FAMILIES`` as our ``Transformer``, with its tokenizer.

    Args:
        path: A folder with ``config.json`` and ``model.safetensors`` (or a sharded safetensors index), and
            normally ``tokenizer.json`` with its ``tokenizer_config.json`` / ``chat_template.jinja`` /
            ``generation_config.json``.
        dtype: Cast the model to this dtype (default: as stored, float32 for a float16 folder).

    Returns:
        The model (eval mode) and the folder's tokenizer (``None`` when the folder has no ``tokenizer.json``).

    Raises:
        FileNotFoundError: Without ``config.json`` or weights.
        ValueError: For a family or config we cannot express (naming it), or weights that do not fit.
    """
    from lit_llm.tokenizer import Tokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config_from_hf(values)
    model = from_hf_state(_read_weights(folder), config, values["model_type"], folder)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = Tokenizer.load(folder) if (folder / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
            f"{config.vocab_size} rows: the tokenizer is not this model's"
        )
    return model.eval(), tokenizer


def from_hf_state(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, model_type: str, where: Any
) -> Transformer:
    """Our ``Transformer`` holding a Hugging Face state dict (half precision read as float32), with a clear
    error for weights that do not fit the config."""
    try:
        state = state_dict_from_hf(hf_state, config, model_type)
    except KeyError as err:
        raise ValueError(f"{where}: the weights lack {err}, which config.json implies") from None
    model = Transformer(config)
    try:
        model.load_state_dict({k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()})
    except RuntimeError as err:
        raise ValueError(f"{where}: the weights do not fit config.json: {str(err)[:300]}") from None
    return model
