"""Speed and memory variants of the backbone, applied from outside the model (``backbone/`` never sees them).

* :func:`apply_activation_checkpointing` recomputes each block's activations in the backward pass instead of
  keeping them (``torch.utils.checkpoint``, non-reentrant): memory per block drops from all intermediate
  activations to the block's input, for about one extra forward pass of compute.
* :func:`compile_model` compiles each block's training forward with ``torch.compile`` (one compiled function
  shared by all blocks of the same structure, as torchtitan does).

LoRA adapters, the third transform applied from outside the model, live in :mod:`lit_llm.lora` (they change
which parameters train and what checkpoints hold, not how a block runs); apply them first.

Both act only on the training path (no KV cache): decoding with a cache stays eager, so generation during
training (samples, PPO rollouts) neither recompiles for every length nor recomputes. Parameter names, and so
state dicts and checkpoints, are unchanged. Stages switch them on with ``compile: true`` and
``activation_checkpointing: true``; Lightning applies them in ``configure_model``::

    model = Transformer(config)
    apply_activation_checkpointing(model)  # first ...
    compile_model(model)  # ... then compile (the compiled function contains the checkpoint)
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_llm.backbone.model import Block

_AC = "_lit_llm_activation_checkpointing"
_COMPILED = "_lit_llm_compiled"
_TRAIN_FORWARD = "_lit_llm_train_forward"


def _eager_train_forward(block: Block, x, rope, attn_mask, positions):
    return type(block).forward(block, x, rope, attn_mask, None, positions)


def _checkpointed_train_forward(block: Block, x, rope, attn_mask, positions):
    if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
        return type(block).forward(block, x, rope, attn_mask, None, positions)
    return checkpoint(type(block).forward, block, x, rope, attn_mask, None, positions, use_reentrant=False)


def _transformed_forward(self: Block, x, rope, attn_mask, cache, positions=None):
    """``Block.forward`` with the training-path variant; decoding with a KV cache stays eager."""
    if cache is not None:
        return type(self).forward(self, x, rope, attn_mask, cache, positions)
    return self.__dict__[_TRAIN_FORWARD](self, x, rope, attn_mask, positions)


def _blocks(model: nn.Module) -> list[Block]:
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to transform")
    return blocks


def _install(block: Block, train_forward: Any) -> None:
    block.__dict__[_TRAIN_FORWARD] = train_forward
    block.forward = types.MethodType(_transformed_forward, block)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every transformer block's activations during backward (in place; returns ``model``).

    Loss and gradients are the same as without it (the same operations run again on the same inputs; with
    dropout, the RNG state is replayed). Apply before :func:`compile_model`. Applying it twice is a no-op.
    """
    for block in _blocks(model):
        if block.__dict__.get(_AC):
            continue
        if block.__dict__.get(_COMPILED):
            raise ValueError("apply activation checkpointing before compile_model, not after")
        block.__dict__[_AC] = True
        _install(block, _checkpointed_train_forward)
    return model


def compile_model(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile the training forward of every transformer block with ``torch.compile`` (in place).

    Args:
        model: A ``Transformer`` (or any module holding ``Block``s).
        compile_kwargs: Passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).

    One compiled function serves all blocks (Dynamo guards on their structure, so identical blocks share the
    compiled code and a model compiles about as fast as one block). Applying it twice is a no-op.
    """
    fns: dict[Any, Any] = {}
    for block in _blocks(model):
        if block.__dict__.get(_COMPILED):
            continue
        base = _checkpointed_train_forward if block.__dict__.get(_AC) else _eager_train_forward
        if base not in fns:
            fns[base] = torch.compile(base, **compile_kwargs)
        block.__dict__[_COMPILED] = True
        _install(block, fns[base])
    return model


def is_transformed(model: nn.Module) -> dict[str, bool]:
    """Which transforms ``model`` carries: ``{"activation_checkpointing": ..., "compile": ...}``."""
    blocks = _blocks(model)
    return {
        "activation_checkpointing": all(b.__dict__.get(_AC, False) for b in blocks),
        "compile": all(b.__dict__.get(_COMPILED, False) for b in blocks),
    }
