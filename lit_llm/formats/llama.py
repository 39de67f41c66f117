"""The Llama family in Hugging Face's format (``LlamaForCausalLM``, ``model_type: llama``): Llama 2, Llama 3
(``llama3`` RoPE scaling), SmolLM, TinyLlama and every other checkpoint of that shape.

Our parameter names follow Hugging Face's closely (``layers.{i}.attn.q_proj`` etc.) and both use the
half-split RoPE layout, so the conversion is a renaming. Also here: the helpers the other families share
(config dicts, RoPE fields, the row permutation between RoPE layouts).
"""

from __future__ import annotations

from typing import Any

import torch

from lit_llm.backbone.config import ModelConfig

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
