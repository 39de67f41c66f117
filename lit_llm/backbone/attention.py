"""Causal self-attention with grouped-query heads, RoPE, an optional KV cache, and Llama 4's layer kinds.

Llama 4 ("iRoPE") mixes two kinds of attention layer:

- *local* layers use RoPE, may RMS-normalise queries and keys (``qk_norm``), and may restrict each query to
  its own chunk of positions (``attention_chunk_size``) or to a sliding window (``sliding_window``); the
  restriction itself arrives as the boolean mask the model builds (see ``lit_llm.backbone.masks.local_mask``);
- *global* NoPE layers (every ``nope_every``-th) have no position encoding at all and see the whole causal
  context; their queries may be sharpened with position (``attn_temperature_tuning``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_llm.backbone.cache import KVCache
from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.rope import apply_rope


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, no weight, float32 inside.

    Llama 4's "L2 norm" of queries and keys: a weightless RMSNorm, so a head vector gets norm ``sqrt(D)``
    rather than 1 (the softmax scale ``1/sqrt(D)`` then keeps the logits in ``[-1, 1] * sqrt(D)``).
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4 query scales ``log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1``, ``(B, T)`` float32.

    The scale is 1 for the first ``floor_scale - 1`` positions and then grows like the logarithm of the
    position (Nakanishi, 2025: "Scalable-Softmax"), which keeps attention peaked in very long contexts.
    """
    steps = torch.floor((positions.to(torch.float32) + 1.0) / floor_scale)
    return torch.log1p(steps) * attn_scale + 1.0


class Attention(nn.Module):
    """Multi-head attention where ``n_kv_head`` key/value heads are shared by groups of query heads.

    With ``n_kv_head == n_head`` this is plain multi-head attention; with ``n_kv_head == 1`` multi-query
    attention. The product runs in ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
    where the device has them).

    Attributes:
        use_rope: Rotate queries and keys (False on NoPE layers and with learned positions).
        is_local: This layer's mask is restricted to a chunk / sliding window (the model passes it).
        qk_norm: RMS-normalise queries and keys after RoPE (local layers, when configured).
        temperature_tuning: Scale queries by :func:`temperature_scales` (NoPE layers, when configured).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        nope = config.is_nope_layer(layer_idx)
        self.use_rope = config.pos == "rope" and not nope
        self.is_local = config.is_local_layer(layer_idx)
        self.qk_norm = config.qk_norm and not nope
        self.temperature_tuning = config.attn_temperature_tuning and nope
        self.norm_eps = config.norm_eps
        self.floor_scale, self.attn_scale = config.attn_floor_scale, config.attn_scale
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: ``(B, T, C)`` input.
            rope: ``(cos, sin)``, each ``(B, T, head_dim)``, or ``None`` for no rotation.
            attn_mask: Boolean ``(B, 1, T, S)`` (True = may attend) with ``S`` the number of keys, or
                ``None`` for plain causal attention over the ``T`` new positions without a cache. On a local
                layer the caller passes the mask already restricted to the chunk / window.
            cache: Optional KV cache; new keys/values are appended and all cached ones attended.
            positions: Query positions ``(B, T)``, used by temperature tuning; defaults to the cache length
                plus ``arange(T)``.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None and self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.qk_norm:
            q, k = rms_normalize(q, self.norm_eps), rms_normalize(k, self.norm_eps)
        if self.temperature_tuning:
            if positions is None:
                start = cache.length if cache is not None else 0
                positions = torch.arange(start, start + T, device=x.device).expand(B, T)
            scales = temperature_scales(positions, self.floor_scale, self.attn_scale)  # (B, T)
            q = (q * scales[:, None, :, None]).to(q.dtype)
        out_dtype = q.dtype
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
            # attend in the cache's dtype: casting one query is cheaper than casting every cached key, and
            # generate keeps CPU caches in float32 (CPU's bfloat16 attention kernel is slow for one query)
            q = q.to(k.dtype)
        # enable_gqa: each key/value head serves its group of n_head / n_kv_head query heads, without copies
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hd)
        y = y.to(out_dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)
