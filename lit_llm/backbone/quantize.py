"""Weight-only int8 and 4-bit quantization for inference: a quarter (an eighth) of float32's bytes per weight.

Decoding one token at a time is bound by memory traffic, not arithmetic: every step reads every weight
once. Storing each linear layer's weight as int8 with one float scale per output row,
``W ~= scale[:, None] * q`` with ``q = round(W / scale)`` in ``[-127, 127]`` and ``scale = max|W_row| / 127``,
cuts those bytes 4x against float32 (2x against bfloat16). Activations stay in the model's float dtype; on CPU
with bfloat16 activations (and an input width that is a multiple of 16) the product runs in PyTorch's fused
``_weight_int8pack_mm`` kernel, elsewhere the weight is dequantized on the fly.

Quantization changes the logits slightly (a relative error of about ``1 / 254`` per weight), so greedy
decoding can pick a different token where two logits are nearly tied: use it for serving and sampling, not
for reference numbers. Training never uses it.

The 4-bit path (:func:`quantize_int4`) follows llama.cpp's Q4_1: each group of 32 consecutive input weights of
a row has its own scale and minimum, ``W ~= min + scale * q`` with ``q`` in ``[0, 15]`` and
``scale = (max - min) / 15``. The product runs in PyTorch's fused ``_weight_int4pack_mm_for_cpu`` kernel, which
unpacks the nibbles inside the matrix product (bfloat16 activations). Its error is about 16x int8's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 quantization of a ``(out, in)`` weight: ``(q int8, scale float32)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored as int8 plus one scale per output feature.

    Args:
        linear: The float layer to quantize (its weight and bias are copied, it is left unchanged).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        dtype = linear.weight.dtype
        self.fused = self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.register_buffer("weight_int8", q)  # (out, in)
        self.register_buffer("scale", scale.to(dtype))  # (out,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, ``scale[:, None] * q``."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.fused:
            # fused int8-weight GEMM: reads int8 weights, scales the output rows (it works in tiles of 16
            # inputs and 16 outputs: other shapes crash it in torch 2.13, e.g. a vocabulary of 97)
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(
                flat.contiguous(), self.weight_int8, self.scale.to(x.dtype)
            )
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            # dequantize the weight first: Inductor rewrites ``linear(x, q) * scale`` into the fused kernel
            # above, whatever the shape, and that crashes on the shapes the kernel does not take
            y = F.linear(x, self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("router",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`Int8Linear`; returns ``model``.

    Args:
        model: Typically a :class:`~lit_llm.backbone.model.Transformer` in eval mode, already cast to its
            inference dtype (``model.to(torch.bfloat16)`` is the fast path on CPU).
        skip: Layers whose name ends with one of these stay float (MoE routers by default: a rounding error
            there changes which experts a token visits).

    A tied output head gets its own int8 copy; the embedding table stays float (a lookup reads one row per
    token). Routed MoE experts are stacked parameters, not ``nn.Linear``, and stay float too.
    """
    if model.training:
        raise ValueError(
            "quantize_int8 is for inference: call model.eval() first (int8 weights cannot train)"
        )
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(skip)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module))
    return model


INT4_GROUP = 32  # input weights per (scale, minimum) pair, as llama.cpp's Q4_0 / Q4_1 blocks


def quantize_weight_int4(
    weight: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantization of a ``(out, in)`` weight in groups of ``group`` inputs.

    Returns ``(q, scale, minimum)``: ``q`` int32 ``(out, in)`` in ``[0, 15]``, ``scale`` and ``minimum`` float32
    ``(out, in // group)``, with ``W ~= minimum + scale * q`` group by group.
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out_f, in_f), scale, lo


def int4_supported(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
    """Whether the fused CPU kernel takes this layer: whole groups per row and rows in tiles of 16."""
    return linear.in_features % group == 0 and linear.out_features % 16 == 0


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored as packed 4-bit groups (see :func:`quantize_weight_int4`).

    The kernel computes ``x @ (q - 8) * scale + zero`` per group, so the minimum is stored as the zero point
    ``minimum + 8 * scale``. Inputs are cast to bfloat16, outputs back to the input's dtype.

    Args:
        linear: The float layer to quantize (left unchanged); see :func:`int4_supported` for its shape.
        group: Input weights per group.
    """

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        if not int4_supported(linear, group):
            raise ValueError(
                f"4-bit needs in_features % {group} == 0 and out_features % 16 == 0, got "
                f"({linear.out_features}, {linear.in_features})"
            )
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        q, scale, lo = quantize_weight_int4(linear.weight, group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = lo + 8.0 * scale
        # the kernel's layout: (in // group, out, 2) holding (scale, zero) of each group of each output
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``(out, in)`` weight this layer computes with (through the kernel, on an identity)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group, self.scales_zeros)
        return w.t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group, self.scales_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"


def quantize_int4(model: nn.Module, skip: tuple[str, ...] = ("router",)) -> nn.Module:
    """4-bit weights (:class:`Int4Linear`) for every ``nn.Linear`` the kernel takes, int8 for the rest.

    The output head stays int8 (llama.cpp's Q4 files keep it at higher precision too: one weight there moves
    a logit directly), as does any layer whose shape the kernel refuses. Returns ``model`` (changed in place).
    """
    if model.training:
        raise ValueError(
            "quantize_int4 is for inference: call model.eval() first (4-bit weights cannot train)"
        )
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(skip)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        four = int4_supported(module) and child != "lm_head"
        setattr(parent, child, Int4Linear(module) if four else Int8Linear(module))
    return model
