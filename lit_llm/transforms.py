"""Speed and memory variants of the backbone, applied from outside the model (``backbone/`` never sees them).

* :func:`apply_activation_checkpointing` recomputes each block's activations in the backward pass instead of
  keeping them (``torch.utils.checkpoint``, non-reentrant): memory per block drops from all intermediate
  activations to the block's input, for about one extra forward pass of compute.
* :func:`compile_model` compiles each block's training forward with ``torch.compile`` (one compiled function
  shared by all blocks of the same structure, as torchtitan does).

* :func:`shard_stage` shards a stage's trainable models over the processes with FSDP2 (``fully_shard``): each
  transformer block is one unit, gathered for its forward and backward and freed after; gradients are
  reduce-scattered, so each process keeps and updates only its share of the weights and optimizer state.
  :func:`gathered` keeps a sharded model whole for a while (decoding).

LoRA adapters, the fourth transform applied from outside the model, live in :mod:`lit_llm.lora` (they change
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

import contextlib
import types
from collections.abc import Iterator
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


# ----------------------------------------------------------------------------------------------- sharding
# methods that stages call on a model instead of forward (Transformer.hidden, ScalarHeadModel.values)
ENTRY_POINTS = ("hidden", "values")


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` (a ``Transformer``, or a module holding one) over ``mesh`` with FSDP2, in place.

    Every ``Block`` is its own unit (all-gathered just before its forward and backward, freed after), the
    rest (embeddings, final norm, head, vision tower, a scalar head) is the root unit, kept gathered from the
    forward to the backward as FSDP2 does for a root. The methods called instead of ``forward``
    (:data:`ENTRY_POINTS`: a Transformer's ``hidden`` for decoding and scalar heads, a critic's ``values``)
    are registered as further forwards, so calling them gathers the root as ``forward`` does.
    Apply after LoRA, activation checkpointing and compile (torchtitan's order).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for entry in ENTRY_POINTS:
        if callable(getattr(model, entry, None)):
            register_fsdp_forward_method(model, entry)
    return model


def shard_stage(stage: nn.Module, mesh: Any) -> list[str]:
    """Shard every child of ``stage`` that trains (the policy, a critic, a value head) over ``mesh``.

    Children holding transformer blocks are sharded block by block (:func:`shard_model`), other trainable
    children (a ``Linear`` head) as one unit. Frozen children (the reference of DPO / PPO / GRPO, a reward
    model) stay whole on every process: they need no gradient reduction, and decoding or scoring with them
    needs no communication. Returns the names of the sharded children.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    sharded = []
    for name, child in stage.named_children():
        if isinstance(child, FSDPModule) or not any(p.requires_grad for p in child.parameters()):
            continue
        if any(isinstance(m, Block) for m in child.modules()):
            shard_model(child, mesh)
        else:
            fully_shard(child, mesh=mesh)
        sharded.append(name)
    return sharded


def is_sharded(module: nn.Module) -> bool:
    """Whether any part of ``module`` is sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Keep the FSDP2-sharded parts of ``module`` whole inside the block, then shard them again.

    For decoding: a sharded block gathers its weights at every call, a collective that every process must
    join, but processes decode different prompts for different numbers of steps. Gathered once up front,
    the weights stay put and each process decodes on its own (the memory of a whole model for that while).
    A module without sharded parts passes through unchanged.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    roots = {id(m) for m in units if not any(m is not u and m in set(u.modules()) for u in units)}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield module
    finally:
        for unit in units:
            unit.reshard()
            # blocks free their weights after each forward again; roots never do (as fully_shard set them)
            unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)
