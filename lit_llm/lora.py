"""LoRA (Hu et al., 2021, "Low-Rank Adaptation of Large Language Models"), applied from outside the model.

:func:`apply_lora` freezes every parameter of a ``Transformer`` and swaps the targeted ``nn.Linear`` layers of
its blocks for :class:`LoRALinear`: the same ``weight`` (and ``bias``) parameters under the same names, plus
two small trainable matrices ``lora_a (r, in)`` and ``lora_b (out, r)``::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

``lora_b`` starts at zero, so the adapted model starts as exactly the base model. Base state-dict keys stay
what they were (``layers.0.attn.q_proj.weight``), so checkpoints, ``lit_llm.formats.hf`` conversion and the other
transforms (activation checkpointing, compile: apply LoRA first) keep working; the adapters add
``layers.0.attn.q_proj.lora_a`` / ``lora_b``.

Targets are module names matched on their last components within the blocks: ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj`` (attention), ``gate_proj``, ``up_proj``, ``down_proj`` (dense MLP, and the shared
expert of a MoE layer, whose linears have the same names; ``shared_expert.gate_proj`` targets only the
shared expert's). The routed experts of a MoE layer are stacked ``(E, in, out)`` parameters, not linears,
and are not adapted (they stay frozen); nor are the router, the embeddings and the output head.

Also here: :func:`merge_lora` / :func:`unmerge_lora` (fold the update into ``weight`` and back),
:func:`adapters_disabled` (a context in which the model is its base, used as the frozen reference of the RL
stages instead of a second copy: :class:`AdaptersOff`), :func:`fold_lora` (a plain model with the update
merged), :func:`base_fingerprint` (the hash by which an adapter checkpoint names its base). The PEFT adapter
export is :mod:`lit_llm.formats.peft`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """What LoRA adapts and how.

    Args:
        rank: Rank ``r`` of the update ``B A`` (``A: (r, in)``, ``B: (out, r)``).
        alpha: The update is scaled by ``alpha / rank``.
        dropout: Dropout on the adapter's input (training only; the base path never sees it).
        targets: Linear layers to adapt, by name within each block: ``q_proj``, ``k_proj``, ``v_proj``,
            ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` (a MoE layer's shared expert included;
            ``shared_expert.gate_proj`` etc. for the shared expert alone). Routed experts are not adapted.
        train_modules: Modules of the model trained in full beside the adapters, e.g. ``[embed_tokens,
            lm_head]`` (PEFT's ``modules_to_save``): rows of tokens the base never learned, such as the chat
            template's special tokens, cannot be reached by adapters on the blocks. Stored in the adapter
            checkpoint; not expressible in a PEFT export (export merged instead).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [*ATTENTION_TARGETS, *MLP_TARGETS])
    train_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from lit_llm.errors import UserError

        if int(self.rank) != self.rank or self.rank < 1:
            raise UserError(f"lora.rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = list(self.targets)
        if not self.targets:
            raise UserError("lora.targets is empty: name at least one layer, e.g. [q_proj, v_proj]")
        self.rank = int(self.rank)
        self.train_modules = (
            [self.train_modules] if isinstance(self.train_modules, str) else list(self.train_modules)
        )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_any(cls, value: LoRAConfig | dict[str, Any] | None) -> LoRAConfig | None:
        """``None``, a ``LoRAConfig`` or its dict (as YAML and checkpoints hold it) -> a ``LoRAConfig``."""
        if value is None or isinstance(value, LoRAConfig):
            return value
        return cls(**dict(value))


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update; it holds the *same* ``weight`` / ``bias`` parameters as the
    linear it replaces (no copy, same names) and adds ``lora_a`` / ``lora_b``.

    Attributes:
        scaling: ``alpha / rank``.
        merged: The update is folded into ``weight`` (the adapter path is then skipped).
        disabled: The adapter path is skipped (the layer computes the base linear).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        # A as nn.Linear initialises its weight (and as PEFT does); B = 0 makes the start exactly the base
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.merged = False
        self.disabled = False

    def delta(self) -> torch.Tensor:
        """The update of the weight, ``scaling * B A`` ``(out, in)``."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        # (.., in) -> (.., r) -> (.., out): never forms the (out, in) update
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scaling={self.scaling:g}"


def _block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """``(qualified name, parent, attribute, linear)`` for every ``nn.Linear`` inside ``model.layers``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no transformer blocks (model.layers) to adapt")
    for name, parent in layers.named_modules(prefix="layers"):
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                yield f"{name}.{attr}", parent, attr, child


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze ``model`` and put LoRA adapters on the targeted linears of its blocks (in place).

    Args:
        model: A ``Transformer``.
        config: Rank, alpha, dropout and targets.

    Returns:
        The qualified names of the adapted layers (``layers.0.attn.q_proj``, ...).

    Raises:
        UserError: a target names no layer of this model (the available names are listed), or the model
            already carries adapters.
    """
    from lit_llm.errors import UserError

    if lora_layers(model):
        raise UserError("the model already carries LoRA adapters")
    candidates = [c for c in _block_linears(model) if not c[0].endswith("router")]
    for target in config.targets:
        if not any(_matches(name, target) for name, *_ in candidates):
            names = sorted({name.split(".", 2)[2] for name, *_ in candidates})
            raise UserError(f"lora target {target!r} names no linear layer of this model; it has {names}")
    trained = []
    for name in config.train_modules:
        try:
            trained.append(model.get_submodule(name))
        except AttributeError:
            top = [n for n, _ in model.named_children()]
            raise UserError(
                f"lora train_modules: {name!r} is no module of this model; it has {top}"
            ) from None
    model.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)
    adapted = []
    for name, parent, attr, linear in candidates:
        if any(_matches(name, t) for t in config.targets):
            setattr(parent, attr, LoRALinear(linear, config.rank, config.alpha, config.dropout))
            adapted.append(name)
    return adapted


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its ``weight`` (in place); forward is then one matmul per layer."""
    with torch.no_grad():
        for m in lora_layers(model).values():
            if not m.merged:
                m.weight.add_(m.delta().to(m.weight.dtype))
                m.merged = True
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (in place): subtract the update again (exact up to float rounding)."""
    with torch.no_grad():
        for m in lora_layers(model).values():
            if m.merged:
                m.weight.sub_(m.delta().to(m.weight.dtype))
                m.merged = False
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes its base model (adapters skipped; nothing is copied)."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise ValueError("adapters are merged into the weights: unmerge_lora(model) before disabling them")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.disabled = was


class AdaptersOff:
    """A model with its adapters switched off, usable where a frozen reference model is called.

    Calling it runs the base model in eval mode without gradients (the modes of the model's modules are
    restored afterwards). It is not an ``nn.Module``: it holds no weights of its own, so it adds nothing to
    the state dict, the optimizer or memory.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return self.model(*args, **kwargs)
        finally:
            for m, mode in modes:
                m.training = mode

    def eval(self) -> AdaptersOff:
        return self


def fold_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain ``nn.Linear`` layers back (in place): a model without LoRA."""
    merge_lora(model)
    for name, m in lora_layers(model).items():
        parent_name, attr = name.rsplit(".", 1)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        setattr(model.get_submodule(parent_name), attr, linear)
    return model


def adapter_keys(state: dict[str, Any]) -> list[str]:
    """The keys of a state dict that belong to adapters."""
    return [k for k in state if k.endswith((".lora_a", ".lora_b"))]


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the base model's parameters (names, shapes and float32 values; adapters excluded).

    An adapter checkpoint stores it to name its base; the same weights give the same hash whatever their
    dtype or device.
    """
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError("adapters are merged into the weights: unmerge_lora(model) first")
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(remove_duplicate=False)):
        if name.endswith((".lora_a", ".lora_b")):
            continue
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
