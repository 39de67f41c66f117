"""Conversion between our ``Transformer`` and Hugging Face ``LlamaForCausalLM`` / ``Llama4ForCausalLM``.

Configs and state dicts go both ways; ``export_hf`` / ``import_hf`` write and read a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline.
Neither needs ``transformers`` installed: configs are plain dicts, weights plain safetensors.

- **Llama**: our parameter names follow Hugging Face's closely (``layers.{i}.attn.q_proj`` etc.) and both
  use the half-split RoPE layout, so the conversion is a renaming.
- **Llama 4** (text model, ``model_type: llama4_text``): Hugging Face rotates *adjacent* pairs
  ``(x[2i], x[2i+1])`` while our RoPE rotates ``(x[i], x[i + D/2])``. The conversion permutes the rows of
  every RoPE layer's ``q_proj`` and ``k_proj`` inside each head (even rows first, then odd rows), which is
  exact: rotations act on the same pairs, and attention scores, QK-norm and the values are unchanged by a
  permutation shared by queries and keys. NoPE layers are copied as they are. The stacked experts have the
  same layout on both sides (``gate_up_proj (E, C, 2H)``, ``down_proj (E, H, C)``).

- **Llama 4 with images** (``Llama4ForConditionalGeneration``, ``model_type: llama4``): a model whose config
  has a ``vision`` tower. The text model converts as above under the prefix ``language_model.``; the vision
  tower and the projector are a renaming (``vision_model.*``, ``multi_modal_projector.linear_1``): the vision
  RoPE rotates the same adjacent pairs on both sides, so no permutation there. ``image_token_index`` is our
  ``vision.patch_token_id``.

A config that a side cannot express (biases, another RoPE scaling type, a NoPE / MoE layer pattern that is
not "every n-th", a sliding window in a Llama 4 export, ...) is refused with the reason, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lit_llm.backbone.config import ModelConfig, VisionConfig
from lit_llm.backbone.model import Transformer

if TYPE_CHECKING:
    from lit_llm.tokenizer import Tokenizer

Arch = Literal["auto", "llama", "llama4"]

_ATTN_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
}
_DENSE_NAMES = {f"mlp.{p}_proj.weight": f"{p}_proj.weight" for p in ("gate", "up", "down")}
_BLOCK_NAMES = {**_ATTN_NAMES, **{k: f"mlp.{v}" for k, v in _DENSE_NAMES.items()}}  # a Llama block
_MOE_NAMES = {
    "mlp.router.weight": "router.weight",
    "mlp.experts.gate_up_proj": "experts.gate_up_proj",
    "mlp.experts.down_proj": "experts.down_proj",
    **{
        f"mlp.shared_expert.{p}_proj.weight": f"shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")
    },
}

# Hugging Face's defaults for keys a Llama ``config.json`` may leave out.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# Hugging Face's defaults for keys a Llama 4 text ``config.json`` may leave out.
_LLAMA4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "num_experts_per_tok": 1,
    "num_local_experts": 16,
    "moe_layers": None,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "no_rope_layers": None,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "layer_types": None,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "attention_bias": False,
}


# --------------------------------------------------------------------------------------------- helpers
def _config_dict(hf_config: Any) -> dict[str, Any]:
    """A Hugging Face config object or a ``config.json`` dict, as a dict."""
    if isinstance(hf_config, dict):
        return dict(hf_config)
    return hf_config.to_dict()


def _rope_params(c: dict[str, Any], default_theta: float) -> dict[str, Any]:
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    params["rope_theta"] = float(params.get("rope_theta") or c.get("rope_theta") or default_theta)
    return params


def _rope_fields(c: dict[str, Any], default_theta: float, refuse: Any) -> dict[str, Any]:
    """Our RoPE fields for a Hugging Face config dict (default or llama3 scaling)."""
    rope = _rope_params(c, default_theta)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor={rope['partial_rotary_factor']} (we rotate the whole head)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    if rope_type == "llama3":
        out.update(
            rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        refuse(f"rope type {rope_type!r} (supported: default, llama3)")
    return out


def _rope_dict(config: ModelConfig) -> dict[str, Any]:
    if config.rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": config.rope_theta,
        "factor": config.rope_scaling_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_seq_len,
    }


def _every_nth(layers: set[int], n_layer: int, what: str, refuse: Any) -> int:
    """The ``n`` with ``layers == {n-1, 2n-1, ...}`` (0 for no layers), or refuse."""
    if not layers:
        return 0
    n = min(layers) + 1
    if set(range(n - 1, n_layer, n)) != layers:
        refuse(f"{what} {sorted(layers)} is not 'every n-th layer' (layers n-1, 2n-1, ...)")
    return n


def _rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns adjacent RoPE pairs into half-split pairs: evens, then odds."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_rows(w: torch.Tensor, n_head: int, head_dim: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of a ``(n_head * head_dim, C)`` projection within each head."""
    return w.reshape(n_head, head_dim, -1)[:, perm].reshape(n_head * head_dim, -1)


def _common_fields(c: dict[str, Any]) -> dict[str, Any]:
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return dict(
        vocab_size=c["vocab_size"],
        block_size=c["max_position_embeddings"],
        n_layer=c["num_hidden_layers"],
        n_embd=c["hidden_size"],
        n_head=c["num_attention_heads"],
        n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=head_dim,
        norm_eps=c["rms_norm_eps"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def _common_dict(config: ModelConfig) -> dict[str, Any]:
    rope = _rope_dict(config)
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling_factor is None else rope,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------- Llama
def config_from_hf_llama(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``LlamaConfig`` (object or dict; refuses what we cannot express)."""

    def refuse(reason: str) -> None:
        raise ValueError(f"cannot convert this Llama config: {reason}")

    c = {**_LLAMA_DEFAULTS, **_config_dict(hf_config)}
    if c.get("attention_bias", False):
        refuse("attention_bias=True (our Llama flavour has no attention biases)")
    if c.get("mlp_bias", False):
        refuse("mlp_bias=True")
    if c.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={c['hidden_act']!r} (SwiGLU needs silu)")
    return ModelConfig(
        name="hf-llama",
        intermediate_size=c["intermediate_size"],
        **_common_fields(c),
        **_rope_fields(c, 10000.0, refuse),
    )


def _outer_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedding, final norm and output head (a tied checkpoint has no ``lm_head.weight``)."""
    embed = hf_state["model.embed_tokens.weight"]
    return {
        "embed_tokens.weight": embed,
        "norm.weight": hf_state["model.norm.weight"],
        "lm_head.weight": hf_state.get("lm_head.weight", embed),
    }


def state_dict_from_hf_llama(
    hf_state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face Llama state dict to ours."""
    out = _outer_from_hf(hf_state)
    for i in range(config.n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            out[f"layers.{i}.{ours}"] = hf_state[f"model.layers.{i}.{theirs}"]
    return out


def state_dict_to_hf_llama(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename our state dict to Hugging Face Llama names (a tied head is written once)."""
    _check_llama_expressible(config)
    out = {
        "model.embed_tokens.weight": state["embed_tokens.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            out[f"model.layers.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
    return out


def _llama_blockers(config: ModelConfig) -> list[str]:
    bad = []
    if config.norm != "rmsnorm":
        bad.append(f"norm={config.norm!r}")
    if config.mlp != "swiglu":
        bad.append(f"mlp={config.mlp!r}")
    if config.pos != "rope":
        bad.append(f"pos={config.pos!r}")
    if config.bias:
        bad.append("bias=True")
    return bad


def _llama4_only(config: ModelConfig) -> list[str]:
    """Features a Llama checkpoint lacks but a Llama 4 one may have."""
    bad = []
    if config.moe_n_expert > 0:
        bad.append(f"moe_n_expert={config.moe_n_expert}")
    if config.nope_every > 0:
        bad.append(f"nope_every={config.nope_every}")
    if config.attention_chunk_size is not None:
        bad.append(f"attention_chunk_size={config.attention_chunk_size}")
    if config.qk_norm:
        bad.append("qk_norm=True")
    return bad


def _check_llama_expressible(config: ModelConfig) -> None:
    bad = _llama_blockers(config) + _llama4_only(config)
    if config.sliding_window is not None:
        bad.append(f"sliding_window={config.sliding_window}")
    if config.vision is not None:
        bad.append("a vision tower (export it as llama4)")
    if bad:
        raise ValueError(f"a Llama checkpoint cannot express {', '.join(bad)}")


def hf_llama_config_dict(config: ModelConfig, **special_tokens: Any) -> dict[str, Any]:
    """A ``config.json`` dictionary for ``LlamaForCausalLM`` with our shapes."""
    _check_llama_expressible(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "intermediate_size": config.intermediate_size,
        "mlp_bias": False,
        **_common_dict(config),
        **special_tokens,
    }


# --------------------------------------------------------------------------------------------- Llama 4
def config_from_hf_llama4(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``Llama4TextConfig`` (object or ``config.json`` dict).

    Keys a ``config.json`` leaves out take Hugging Face's defaults. Layer patterns are derived as
    Hugging Face derives them: NoPE layers where ``no_rope_layers[i] == 0`` (by default every
    ``no_rope_layer_interval``-th layer), MoE layers ``moe_layers`` (by default every
    ``interleave_moe_layer_step``-th), chunked attention on the RoPE layers when ``attention_chunk_size``
    is set.
    """

    def refuse(reason: str) -> None:
        raise ValueError(f"cannot convert this Llama 4 config: {reason}")

    c = _config_dict(hf_config)
    if c.get("model_type") == "llama4" or "text_config" in c:
        refuse("a multimodal Llama4Config; this backbone builds the text model only (use its text_config)")
    c = {**_LLAMA4_DEFAULTS, **c}
    if c["attention_bias"]:
        refuse("attention_bias=True")
    if c["hidden_act"] != "silu":
        refuse(f"hidden_act={c['hidden_act']!r} (SwiGLU needs silu)")
    L = c["num_hidden_layers"]
    uses_rope = c["no_rope_layers"] or [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(L)]
    if len(uses_rope) < L:
        refuse(f"no_rope_layers has {len(uses_rope)} entries for {L} layers")
    nope_every = _every_nth({i for i in range(L) if not uses_rope[i]}, L, "NoPE layers", refuse)
    step = c["interleave_moe_layer_step"]
    moe = c["moe_layers"] if c["moe_layers"] is not None else list(range(step - 1, L, step))
    moe_every = _every_nth(set(moe), L, "moe_layers", refuse)
    chunk = c["attention_chunk_size"]
    derived = [
        "chunked_attention" if uses_rope[i] and chunk is not None else "full_attention" for i in range(L)
    ]
    given = c["layer_types"]
    if given is not None and chunk is None:
        # some transformers versions (5.17 seen) label RoPE layers "chunked_attention" with no chunk size set
        given = ["full_attention" if t == "chunked_attention" else t for t in given]
    if given is not None and list(given) != derived:
        refuse(f"layer_types {c['layer_types']} differ from the pattern the other fields give ({derived})")
    floor_scale = float(c["floor_scale"])
    moe_fields: dict[str, Any] = {}
    if moe_every > 0:
        moe_fields = dict(
            moe_n_expert=c["num_local_experts"],
            moe_top_k=c["num_experts_per_tok"],
            moe_every=moe_every,
            moe_intermediate_size=c["intermediate_size"],
            moe_shared_expert=True,
            moe_score="sigmoid",
            moe_weight_input=True,
            moe_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)),
        )
    return ModelConfig(
        name="hf-llama4",
        intermediate_size=c["intermediate_size_mlp"],
        nope_every=nope_every,
        attention_chunk_size=chunk,
        qk_norm=bool(c["use_qk_norm"]),
        attn_temperature_tuning=bool(c["attn_temperature_tuning"]),
        attn_floor_scale=floor_scale,
        attn_scale=float(c["attn_scale"]),
        **moe_fields,
        **_common_fields(c),
        **_rope_fields(c, 500000.0, refuse),
    )


def _check_llama4_expressible(config: ModelConfig) -> None:
    bad = _llama_blockers(config)
    if config.sliding_window is not None:
        bad.append(f"sliding_window={config.sliding_window} (Llama 4 has chunked attention, no window)")
    if config.moe_n_expert > 0:
        if config.moe_score != "sigmoid":
            bad.append(f"moe_score={config.moe_score!r} (Llama 4 routes with sigmoid)")
        if not config.moe_weight_input:
            bad.append("moe_weight_input=False (Llama 4 scales the expert input)")
        if not config.moe_shared_expert:
            bad.append("moe_shared_expert=False (Llama 4 always has one)")
    if float(config.attn_floor_scale) != int(config.attn_floor_scale):
        bad.append(f"attn_floor_scale={config.attn_floor_scale} (an integer there)")
    if bad:
        raise ValueError(f"a Llama 4 checkpoint cannot express {', '.join(bad)}")


def hf_llama4_config_dict(config: ModelConfig, **special_tokens: Any) -> dict[str, Any]:
    """A ``config.json`` dictionary for ``Llama4ForCausalLM`` (``llama4_text``) with our shapes."""
    _check_llama4_expressible(config)
    L, moe = config.n_layer, config.moe_n_expert > 0
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "intermediate_size": config.moe_intermediate_size if moe else config.intermediate_size,
        "intermediate_size_mlp": config.intermediate_size,
        "num_local_experts": config.moe_n_expert if moe else 1,
        "num_experts_per_tok": config.moe_top_k if moe else 1,
        "moe_layers": [i for i in range(L) if config.is_moe_layer(i)],
        "interleave_moe_layer_step": config.moe_every,
        "router_aux_loss_coef": config.moe_aux_loss_coef,
        "no_rope_layers": [int(not config.is_nope_layer(i)) for i in range(L)],
        "attention_chunk_size": config.attention_chunk_size,
        "use_qk_norm": config.qk_norm,
        "attn_temperature_tuning": config.attn_temperature_tuning,
        "floor_scale": int(config.attn_floor_scale),
        "attn_scale": config.attn_scale,
        **_common_dict(config),
        **special_tokens,
    }


def state_dict_from_hf_llama4(
    hf_state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """A Hugging Face ``Llama4ForCausalLM`` state dict in our names and RoPE layout."""
    out = _outer_from_hf(hf_state)
    perm = _rope_permutation(config.head_dim)
    for i in range(config.n_layer):
        theirs = f"model.layers.{i}."
        for ours, name in _ATTN_NAMES.items():
            out[f"layers.{i}.{ours}"] = hf_state[theirs + name]
        if not config.is_nope_layer(i):
            for proj, heads in (("q_proj", config.n_head), ("k_proj", config.n_kv_head)):
                key = f"layers.{i}.attn.{proj}.weight"
                out[key] = _permute_rows(out[key], heads, config.head_dim, perm)
        names = _MOE_NAMES if config.is_moe_layer(i) else _DENSE_NAMES
        for ours, name in names.items():
            out[f"layers.{i}.{ours}"] = hf_state[f"{theirs}feed_forward.{name}"]
    return out


def state_dict_to_hf_llama4(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face ``Llama4ForCausalLM`` names and RoPE layout (a tied head written once).

    Raises:
        ValueError: if the config cannot be expressed, or an expert bias (``moe_bias_update``) is non-zero.
    """
    _check_llama4_expressible(config)
    out = {
        "model.embed_tokens.weight": state["embed_tokens.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    inverse = torch.argsort(_rope_permutation(config.head_dim))
    for i in range(config.n_layer):
        theirs = f"model.layers.{i}."
        for ours, name in _ATTN_NAMES.items():
            out[theirs + name] = state[f"layers.{i}.{ours}"]
        if not config.is_nope_layer(i):
            for proj, heads in (("q_proj", config.n_head), ("k_proj", config.n_kv_head)):
                key = f"{theirs}self_attn.{proj}.weight"
                out[key] = _permute_rows(out[key], heads, config.head_dim, inverse)
        bias = state.get(f"layers.{i}.mlp.expert_bias")
        if bias is not None and bool(bias.ne(0).any()):
            raise ValueError(
                f"layer {i} has a non-zero expert selection bias (moe_bias_update), which a Llama 4 "
                "checkpoint cannot express"
            )
        names = _MOE_NAMES if config.is_moe_layer(i) else _DENSE_NAMES
        for ours, name in names.items():
            out[f"{theirs}feed_forward.{name}"] = state[f"layers.{i}.{ours}"]
    return out


# ---------------------------------------------------------------------------------- Llama 4 with images
# our vision-tower names -> Hugging Face's (under ``vision_model.``), per encoder layer and outside them
_VISION_LAYER_NAMES = {
    **{f"attn.{p}_proj.{w}": f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.fc{i}.{w}": f"mlp.fc{i}.{w}" for i in (1, 2) for w in ("weight", "bias")},
    **{f"input_norm.{w}": f"input_layernorm.{w}" for w in ("weight", "bias")},
    **{f"post_attention_norm.{w}": f"post_attention_layernorm.{w}" for w in ("weight", "bias")},
}
_VISION_NAMES = {
    "patch_embed.weight": "vision_model.patch_embedding.linear.weight",
    "class_embedding": "vision_model.class_embedding",
    "pos_embed": "vision_model.positional_embedding_vlm",
    **{f"pre_norm.{w}": f"vision_model.layernorm_pre.{w}" for w in ("weight", "bias")},
    **{f"post_norm.{w}": f"vision_model.layernorm_post.{w}" for w in ("weight", "bias")},
    "adapter.fc1.weight": "vision_model.vision_adapter.mlp.fc1.weight",
    "adapter.fc2.weight": "vision_model.vision_adapter.mlp.fc2.weight",
    "projector.weight": "multi_modal_projector.linear_1.weight",
}
# Hugging Face's tower computes every LayerNorm with torch's default epsilon, whatever ``norm_eps`` says
_HF_VISION_LN_EPS = 1e-5


def _vision_names(vision: VisionConfig) -> dict[str, str]:
    """Every vision parameter: our name (under ``vision.``) -> Hugging Face's."""
    names = {f"vision.{ours}": theirs for ours, theirs in _VISION_NAMES.items()}
    for i in range(vision.num_layers):
        for ours, theirs in _VISION_LAYER_NAMES.items():
            names[f"vision.layers.{i}.{ours}"] = f"vision_model.model.layers.{i}.{theirs}"
    return names


def _square(value: Any, what: str, refuse: Any) -> int:
    """An int from a size that may be given as ``[h, w]``; refuse non-square ones."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            refuse(f"{what}={value} (square tiles and patches only)")
        value = value[0]
    return int(value)


def vision_config_from_hf(hf_vision: Any, image_token_id: int = -1) -> VisionConfig:
    """Our ``VisionConfig`` for a Hugging Face ``Llama4VisionConfig`` (object or dict).

    Hugging Face's tower ignores ``norm_eps`` (its LayerNorms use 1e-5), ``hidden_act`` (always the exact
    GELU) and ``multi_modal_projector_bias`` (no bias), so we take what it computes, not what those say.
    """

    def refuse(reason: str) -> None:
        raise ValueError(f"cannot convert this Llama 4 vision config: {reason}")

    v = _config_dict(hf_vision)
    hidden = v.get("hidden_size", 768)
    out_dim = v.get("projector_output_dim", 4096)
    if v.get("vision_output_dim", 7680) != out_dim:
        refuse(
            f"vision_output_dim={v.get('vision_output_dim', 7680)} differs from projector_output_dim="
            f"{out_dim} (the projector reads the adapter's output: they must be equal)"
        )
    try:
        return VisionConfig(
            image_size=_square(v.get("image_size", 448), "image_size", refuse),
            patch_size=_square(v.get("patch_size", 14), "patch_size", refuse),
            num_channels=v.get("num_channels", 3),
            hidden_size=hidden,
            intermediate_size=v.get("intermediate_size", 5632),
            num_layers=v.get("num_hidden_layers", 34),
            num_heads=v.get("num_attention_heads", 16),
            pixel_shuffle_ratio=float(v.get("pixel_shuffle_ratio", 0.5)),
            projector_input_dim=v.get("projector_input_dim", 4096),
            projector_output_dim=out_dim,
            rope_theta=_rope_params(v, 10000.0)["rope_theta"],
            norm_eps=_HF_VISION_LN_EPS,
            patch_token_id=image_token_id,
        )
    except ValueError as e:  # a coupling Hugging Face leaves unchecked (its forward would fail on shapes)
        refuse(str(e))
        raise


def hf_vision_config_dict(vision: VisionConfig) -> dict[str, Any]:
    """A Hugging Face ``vision_config`` dictionary for our vision tower."""
    if vision.norm_eps != _HF_VISION_LN_EPS:
        raise ValueError(
            f"a Llama 4 checkpoint cannot express vision.norm_eps={vision.norm_eps} (its vision LayerNorms "
            f"always use {_HF_VISION_LN_EPS})"
        )
    return {
        "model_type": "llama4_vision_model",
        "hidden_size": vision.hidden_size,
        "hidden_act": "gelu",
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_heads,
        "num_channels": vision.num_channels,
        "intermediate_size": vision.intermediate_size,
        "vision_output_dim": vision.projector_output_dim,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "norm_eps": vision.norm_eps,
        "pixel_shuffle_ratio": vision.pixel_shuffle_ratio,
        "projector_input_dim": vision.projector_input_dim,
        "projector_output_dim": vision.projector_output_dim,
        "multi_modal_projector_bias": False,
        "projector_dropout": 0.0,
        "attention_dropout": 0.0,
        "vision_feature_select_strategy": "default",
        "rope_parameters": {"rope_type": "default", "rope_theta": vision.rope_theta},
    }


def config_from_hf_llama4_vision(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` (with ``vision``) for a Hugging Face multimodal ``Llama4Config`` (object or dict)."""
    c = _config_dict(hf_config)
    text = _config_dict(c.get("text_config") or {})
    if "tie_word_embeddings" in c:  # the top-level flag decides the tying of the multimodal model
        text["tie_word_embeddings"] = c["tie_word_embeddings"]
    config = config_from_hf_llama4({**text, "model_type": "llama4_text"})
    vision = vision_config_from_hf(c.get("vision_config") or {}, c.get("image_token_index", 200092))
    return dataclasses.replace(config, name="hf-llama4-vision", vision=vision)


def hf_llama4_vision_config_dict(config: ModelConfig, **special_tokens: Any) -> dict[str, Any]:
    """A ``config.json`` dictionary for ``Llama4ForConditionalGeneration`` (``llama4``) with our shapes.

    ``image_token_index`` is ``vision.patch_token_id``; ``boi/eoi_token_index`` (begin / end of image) take
    ``image_start_id`` / ``image_end_id`` from ``special_tokens`` when given.
    """
    if config.vision is None:
        raise ValueError("a text-only config: export it as Llama4ForCausalLM (llama4_text)")
    if config.vision.patch_token_id < 0:
        raise ValueError("vision.patch_token_id is not set (-1): link it from the tokenizer before exporting")
    boi, eoi = special_tokens.pop("image_start_id", None), special_tokens.pop("image_end_id", None)
    text = hf_llama4_config_dict(dataclasses.replace(config, vision=None), **special_tokens)
    text.pop("architectures")
    text.pop("torch_dtype")
    out: dict[str, Any] = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "vision_config": hf_vision_config_dict(config.vision),
        "image_token_index": config.vision.patch_token_id,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        **special_tokens,
    }
    if boi is not None:
        out["boi_token_index"] = boi
    if eoi is not None:
        out["eoi_token_index"] = eoi
    return out


def state_dict_from_hf_llama4_vision(
    hf_state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """A Hugging Face ``Llama4ForConditionalGeneration`` state dict in our names and RoPE layout."""
    prefix = "language_model."
    text = {k[len(prefix) :]: v for k, v in hf_state.items() if k.startswith(prefix)}
    out = state_dict_from_hf_llama4(text, config)
    out.update({ours: hf_state[theirs] for ours, theirs in _vision_names(config.vision).items()})
    return out


def state_dict_to_hf_llama4_vision(
    state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face ``Llama4ForConditionalGeneration`` names and RoPE layout."""
    text = {k: v for k, v in state.items() if not k.startswith("vision.")}
    out = {
        f"language_model.{k}": v
        for k, v in state_dict_to_hf_llama4(text, dataclasses.replace(config, vision=None)).items()
    }
    out.update({theirs: state[ours] for ours, theirs in _vision_names(config.vision).items()})
    return out


def _image_token_fields(vision: VisionConfig, tokenizer: Tokenizer) -> dict[str, int]:
    """``image_start_id`` / ``image_end_id`` for the exported config; refuses a tokenizer whose ``<|patch|>``
    is not the model's."""
    from lit_llm.tokenizer import IMAGE_END, IMAGE_START, PATCH

    ids = tokenizer.image_token_ids()
    if ids is None:
        raise ValueError("the model has a vision tower but its tokenizer has no image tokens")
    if ids[PATCH] != vision.patch_token_id:
        raise ValueError(
            f"the tokenizer's {PATCH} is id {ids[PATCH]} but the model's vision.patch_token_id is "
            f"{vision.patch_token_id}: export the model with the tokenizer it was trained with"
        )
    return {"image_start_id": ids[IMAGE_START], "image_end_id": ids[IMAGE_END]}


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


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our config for a Hugging Face Llama or Llama 4 text config (object or dict), by ``model_type``."""
    c = _config_dict(hf_config)
    kind = c.get("model_type")
    if kind == "llama":
        return config_from_hf_llama(c)
    if kind == "llama4" or "vision_config" in c:
        return config_from_hf_llama4_vision(c)
    if kind == "llama4_text":
        return config_from_hf_llama4(c)
    raise ValueError(f"cannot convert model_type={kind!r} (supported: llama, llama4_text, llama4)")


def state_dict_from_hf(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, model_type: str
) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict of ``model_type`` (``llama`` / ``llama4_text`` / ``llama4``) in our names."""
    if model_type == "llama":
        return state_dict_from_hf_llama(hf_state, config)
    if model_type == "llama4":
        return state_dict_from_hf_llama4_vision(hf_state, config)
    return state_dict_from_hf_llama4(hf_state, config)


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
            "eos_token_id": [tokenizer.end_id, tokenizer.eos_id],
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
        texts["tokenizer.json"] = tokenizer.to_str()
        texts.update(tokenizer.hf_files())
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
    """Load a Hugging Face Llama / Llama 4 (text or with images) folder as our ``Transformer`` (and tokenizer).

    Args:
        path: A folder with ``config.json`` and ``model.safetensors`` (or a sharded safetensors index).
        dtype: Cast the model to this dtype (default: float32).

    Returns:
        The model (eval mode) and the folder's tokenizer when it is a lit_llm tokenizer (one holding our
        special tokens), else ``None``.
    """
    from lit_llm.tokenizer import Tokenizer

    folder = Path(path)
    values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config_from_hf(values)
    model = Transformer(config)
    model.load_state_dict(state_dict_from_hf(_read_weights(folder), config, values["model_type"]))
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.load(folder)
        except ValueError:  # a foreign tokenizer without our special tokens
            tokenizer = None
    return model.eval(), tokenizer
