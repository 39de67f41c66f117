"""Reading and writing lit_llm checkpoints safely.

Every stage stores, under ``checkpoint["lit_llm"]``, the ``ModelConfig`` (as a plain dict), the tokenizer
(as its JSON text) and the stage name, so the next stage needs only the ``.ckpt`` file.

* Reading: ``torch.load(weights_only=True)``: plain tensors and containers only, never pickled code. A file
  that holds a pickled Python object is refused, naming the object.
* Writing: :func:`atomic_save` writes to a temporary file in the same folder, ``fsync``\\ s it and renames it
  over the target (``os.replace``, atomic on POSIX and Windows), so a crash, a kill or a full disk during a
  save leaves the previous checkpoint intact. :class:`AtomicCheckpointIO` makes Lightning save this way; the
  ``lit-llm`` CLI installs it by default. (Lightning's own ``TorchCheckpointIO`` stages the file in the system
  temp folder and *moves* it, which is a copy, not atomic, when that folder is on another file system.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

META_KEY = "lit_llm"


def _torch_load(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"refusing to load checkpoint {path}: it contains a pickled Python object{what}, which could run "
            "code when loaded. lit_llm reads checkpoints with torch.load(weights_only=True): tensors and plain "
            "containers only. If you trust the file, load it with torch.load(path, weights_only=False) and "
            "save its tensors again."
        ) from err


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) with a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return _torch_load(path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the likely cause
        raise ValueError(
            f"could not read checkpoint {path} (truncated or not a torch checkpoint?): {err}"
        ) from err


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike, save: Callable[[Any, Any], None] | None = None) -> None:
    """``save(obj, file)`` (default ``torch.save``) to ``path`` atomically: temp file in the same folder,
    fsync, ``os.replace``.

    Either the new file is complete at ``path`` or ``path`` is as it was: a crash, kill or full disk during
    the write never leaves a truncated checkpoint behind. A full disk raises ``OSError(ENOSPC)`` naming the
    file; other write errors are re-raised with the file name added.
    """
    atomic_save_many([(obj, path, save)])


def atomic_save_many(items: list[tuple[Any, str | os.PathLike, Callable[[Any, Any], None] | None]]) -> None:
    """:func:`atomic_save` for several files that belong together (an exported model folder).

    Every file is first written in full to a temp file next to its target; only when all of them are written
    are they renamed into place. A full disk or another write error therefore leaves every target as it was
    (the renames themselves do not allocate space).
    """
    staged: list[tuple[Path, Path]] = []
    path = Path(items[0][1]) if items else Path()
    try:
        for obj, target, save in items:
            save = save or torch.save
            path = Path(target)  # the file being written, named by any error below
            path.parent.mkdir(parents=True, exist_ok=True)
            # a unique name next to the target (same file system, so the rename is atomic); mode
            # 0o666 & ~umask, as for any new file (tempfile.mkstemp would make it private to this user)
            tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                save(obj, f)
                f.flush()
                os.fsync(f.fileno())
    except BaseException as err:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous checkpoint there is untouched" if path.exists() else "nothing was written"
            raise OSError(
                err.errno,
                f"disk full (no space left on device) while writing checkpoint {path}; {kept}. Free space "
                "or save elsewhere (ModelCheckpoint dirpath / trainer.default_root_dir)",
                str(path),
            ) from err
        if isinstance(err, OSError):
            raise OSError(
                err.errno, f"could not write checkpoint {path}: {err.strerror or err}", str(path)
            ) from err
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    for folder in {path.parent for _, path in staged}:
        _fsync_dir(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that never leaves a half-written checkpoint in place of a good one.

    Local paths are written with :func:`atomic_save`; remote ``fsspec`` URLs (``s3://`` ...) fall back to
    Lightning's own writer. Loading uses ``weights_only=True`` unless the caller asks otherwise, with the
    clear refusal of :func:`load_checkpoint` for a file holding pickled objects.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return _torch_load(path, map_location, weights_only=True if weights_only is None else weights_only)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` (a Trainer argument: ``None``, one plugin or a list) plus :class:`AtomicCheckpointIO`,
    unless a ``CheckpointIO`` is already there (the user's choice wins)."""
    from lightning.fabric.plugins import CheckpointIO

    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in items):
        items.append(AtomicCheckpointIO())
    return items
