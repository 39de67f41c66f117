"""Weight-only int8 quantization for inference: a quarter of float32's bytes per weight.

Decoding one token at a time is bound by memory traffic, not arithmetic: every step reads every weight
once. Storing each linear layer's weight as int8 with one float scale per output row,
``W ~= scale[:, None] * q`` with ``q = round(W / scale)`` in ``[-127, 127]`` and ``scale = max|W_row| / 127``,
cuts those bytes 4x against float32 (2x against bfloat16). Activations stay in the model's float dtype; on CPU
with bfloat16 activations (and an input width that is a multiple of 16) the product runs in PyTorch's fused
``_weight_int8pack_mm`` kernel, elsewhere the weight is dequantized on the fly.

Quantization changes the logits slightly (a relative error of about ``1 / 254`` per weight), so greedy
decoding can pick a different token where two logits are nearly tied: use it for serving and sampling, not
for reference numbers. Training never uses it.
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
        self.register_buffer("weight_int8", q)  # (out, in)
        self.register_buffer("scale", scale.to(dtype))  # (out,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, ``scale[:, None] * q``."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0:
            # fused int8-weight GEMM: reads int8 weights, scales the output rows (it reads its input in blocks
            # of 16: other widths crash it in torch 2.13)
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(
                flat.contiguous(), self.weight_int8, self.scale.to(x.dtype)
            )
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
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
