"""Llama 4 in Hugging Face's format: the text model (``Llama4ForCausalLM``, ``model_type: llama4_text``) and
the model with images (``Llama4ForConditionalGeneration``, ``model_type: llama4``).

- **Text.** Hugging Face rotates *adjacent* pairs ``(x[2i], x[2i+1])`` while our RoPE rotates
  ``(x[i], x[i + D/2])``. The conversion permutes the rows of every RoPE layer's ``q_proj`` and ``k_proj``
  inside each head (even rows first, then odd rows), which is exact: rotations act on the same pairs, and
  attention scores, QK-norm and the values are unchanged by a permutation shared by queries and keys. NoPE
  layers are copied as they are. The stacked experts have the same layout on both sides
  (``gate_up_proj (E, C, 2H)``, ``down_proj (E, H, C)``).
- **With images.** The text model converts as above under the prefix ``language_model.``; the vision tower
  and the projector are a renaming (``vision_model.*``, ``multi_modal_projector.linear_1``): the vision RoPE
  rotates the same adjacent pairs on both sides, so no permutation there. ``image_token_index`` is our
  ``vision.patch_token_id``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from lit_llm.backbone.config import ModelConfig, VisionConfig
from lit_llm.formats.llama import (
    _ATTN_NAMES,
    _DENSE_NAMES,
    _MOE_NAMES,
    _common_dict,
    _common_fields,
    _config_dict,
    _every_nth,
    _llama_blockers,
    _outer_from_hf,
    _permute_rows,
    _rope_fields,
    _rope_params,
    _rope_permutation,
)

if TYPE_CHECKING:
    from lit_llm.tokenizer import Tokenizer

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
