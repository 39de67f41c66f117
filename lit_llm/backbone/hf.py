"""Conversion between our ``Transformer`` and Hugging Face ``LlamaForCausalLM`` weights.

Our parameter names follow Hugging Face's Llama closely (``layers.{i}.attn.q_proj`` etc.), and both use
the half-split RoPE layout, so the conversion is a renaming. A Hugging Face config we cannot express
(biases in the MLP, another RoPE scaling type, ...) is refused with the reason, never approximated.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.model import Transformer

_BLOCK_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _rope_params(hf_config: Any) -> dict[str, Any]:
    params = dict(
        getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    )
    params.setdefault(
        "rope_theta", getattr(hf_config, "rope_theta", None) or params.get("rope_theta", 10000.0)
    )
    return params


def config_from_hf_llama(hf_config: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``LlamaConfig`` (refuses what we cannot express)."""

    def refuse(reason: str) -> None:
        raise ValueError(f"cannot convert this Llama config: {reason}")

    if getattr(hf_config, "attention_bias", False):
        refuse("attention_bias=True (our Llama flavour has no attention biases)")
    if getattr(hf_config, "mlp_bias", False):
        refuse("mlp_bias=True")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf_config.hidden_act!r} (SwiGLU needs silu)")
    rope = _rope_params(hf_config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling: dict[str, Any] = {}
    if rope_type == "llama3":
        scaling = dict(
            rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        refuse(f"rope type {rope_type!r} (supported: default, llama3)")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return ModelConfig(
        name="hf-llama",
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.max_position_embeddings,
        n_layer=hf_config.num_hidden_layers,
        n_embd=hf_config.hidden_size,
        n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        **scaling,
    )


def state_dict_from_hf_llama(
    hf_state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face Llama state dict to ours."""
    out = {
        "embed_tokens.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
    }
    out["lm_head.weight"] = hf_state.get("lm_head.weight", out["embed_tokens.weight"])
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


def _check_llama_expressible(config: ModelConfig) -> None:
    bad = []
    if config.norm != "rmsnorm":
        bad.append(f"norm={config.norm!r}")
    if config.mlp != "swiglu":
        bad.append(f"mlp={config.mlp!r}")
    if config.pos != "rope":
        bad.append(f"pos={config.pos!r}")
    if config.bias:
        bad.append("bias=True")
    if bad:
        raise ValueError(f"a Llama checkpoint cannot express {', '.join(bad)}")


def hf_llama_config_dict(config: ModelConfig, **special_tokens: int) -> dict[str, Any]:
    """A ``config.json`` dictionary for ``LlamaForCausalLM`` with our shapes."""
    _check_llama_expressible(config)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_factor is not None:
        rope = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_seq_len,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
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
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **special_tokens,
    }


def from_hf_llama(hf_model: Any) -> Transformer:
    """Our ``Transformer`` holding the weights of a Hugging Face ``LlamaForCausalLM`` instance."""
    config = config_from_hf_llama(hf_model.config)
    model = Transformer(config)
    model.load_state_dict(state_dict_from_hf_llama(hf_model.state_dict(), config))
    return model
