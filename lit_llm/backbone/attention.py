"""Causal self-attention with grouped-query heads, RoPE and an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_llm.backbone.cache import KVCache
from lit_llm.backbone.config import ModelConfig
from lit_llm.backbone.rope import apply_rope


class Attention(nn.Module):
    """Multi-head attention where ``n_kv_head`` key/value heads are shared by groups of query heads.

    With ``n_kv_head == n_head`` this is plain multi-head attention; with ``n_kv_head == 1`` multi-query
    attention. The product runs in ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
    where the device has them).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.use_rope = config.pos == "rope"
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
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: ``(B, T, C)`` input.
            rope: ``(cos, sin)``, each ``(B, T, head_dim)``, or ``None`` for no rotation.
            attn_mask: Boolean ``(B, 1, T, S)`` (True = may attend) with ``S`` the number of keys, or
                ``None`` for plain causal attention over the ``T`` new positions without a cache.
            cache: Optional KV cache; new keys/values are appended and all cached ones attended.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None and self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.n_kv_head != self.n_head:  # share each key/value head with its group of query heads
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)
