"""Rotary position embeddings (Su et al., 2021) with Llama-3 frequency scaling.

Convention: the "half split" layout used by Hugging Face Llama. For a head of width ``D`` the pair
``(x[i], x[i + D/2])`` is rotated by the angle ``position * inv_freq[i]``. (Meta's original code rotates
adjacent pairs ``(x[2i], x[2i+1])``; the two are the same up to a fixed permutation of the q/k weights,
which ``lit_llm/formats/hf.py`` applies where a checkpoint uses the other layout.)
"""

from __future__ import annotations

import math

import torch


def inv_frequencies(
    head_dim: int,
    theta: float = 10000.0,
    scaling_factor: float | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_seq_len: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/D)``, shape ``(D/2,)``, optionally with Llama-3 scaling.

    Llama-3 scaling divides the low frequencies (wavelength longer than ``original/low_freq_factor``) by
    ``scaling_factor``, keeps the high ones (wavelength shorter than ``original/high_freq_factor``), and
    blends linearly in between.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling_factor is None:
        return inv.float()
    low_wavelen = original_max_seq_len / low_freq_factor
    high_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv / scaling_factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / scaling_factor, blended)
    out = torch.where(wavelen < high_wavelen, inv, out)
    return out.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines for integer ``positions`` ``(B, T)``: each ``(B, T, D)`` in float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` by the angles behind ``cos``/``sin`` ``(B, T, D)``; float32 inside."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    out = xf * cos[:, None] + rotated * sin[:, None]
    return out.to(x.dtype)
