"""Reading and writing what a lit_llm checkpoint carries besides weights.

Every stage stores, under ``checkpoint["lit_llm"]``, the ``ModelConfig`` (as a plain dict), the tokenizer
(as its JSON text) and the stage name, so the next stage needs only the ``.ckpt`` file. Checkpoints are
read with ``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

META_KEY = "lit_llm"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) with a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the likely cause
        raise ValueError(f"could not read checkpoint {path}: {err}") from err


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``lit_llm`` metadata of a checkpoint: ``model_config``, ``tokenizer``, ``stage``."""
    ckpt = load_checkpoint(path)
    if META_KEY not in ckpt:
        raise ValueError(f"{path} is not a lit_llm checkpoint (no '{META_KEY}' entry)")
    return ckpt[META_KEY]


def model_state(ckpt: dict[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The backbone weights of a Lightning checkpoint (keys under ``prefix``, prefix stripped)."""
    state = ckpt["state_dict"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
