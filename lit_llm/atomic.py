"""Atomic file writes: a file is either replaced whole or left as it was.

Every writer of lit_llm (checkpoints, exported model folders, tokenizers, token caches) goes through
:func:`atomic_save_many`: each file is written in full to a temporary file next to its target, ``fsync``\\ ed,
and only then renamed over the target (``os.replace``, atomic on POSIX and Windows). A crash, a kill or a
full disk during a write therefore never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    atomic_save(raw, path, lambda b, f: f.write(b))


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
