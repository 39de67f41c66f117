"""Normalisation layers: RMSNorm (Llama) and LayerNorm (GPT-2)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32.

    No mean subtraction and no bias (Zhang & Sennrich, 2019). The statistic is taken in float32 and the
    result cast back, as the Llama reference does, so bf16 training stays stable.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """``rmsnorm`` or ``layernorm`` of width ``dim``."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)
