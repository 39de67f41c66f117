"""Pieces shared by the DataModules: reading local files and Hugging Face datasets, cache keys, the
train/validation rule, importing user functions."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_llm.errors import DataError, UserError


def read_text_file(path: Path) -> str:
    """The UTF-8 text of a file, with clear errors for a missing, non-UTF-8 or empty file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}); convert it, e.g. with iconv"
        ) from err
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    return text


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Records from a local ``.jsonl``/``.json``/``.parquet`` (``.gz`` allowed) file or ``hf:<dataset>``.

    Args:
        source: A file path, or ``hf:<name>`` (optionally ``hf:<name>:<config>``) for ``datasets.load_dataset``.
        split: Split name for Hugging Face datasets.
    """
    if source.startswith("hf:"):
        import datasets

        name, _, config = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:  # noqa: BLE001 - offline machines fail here; say what to do instead
            raise RuntimeError(
                f"could not load the Hugging Face dataset {name!r} ({err}); offline, pass a local file instead"
            ) from err
        return [dict(r) for r in ds]
    path = Path(source)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = read_text_file(path)
    if kind == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg})") from err
        return records
    if kind == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    raise ValueError(
        f"unsupported data file type {path.name!r}: use .jsonl, .json, .parquet (or .txt for text)"
    )


def fingerprint(*parts: Any) -> str:
    """A short stable hash of the arguments (for cache folder names)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_stamp(source: str) -> Any:
    """Size and modification time of a local file (so an edited file invalidates its cache)."""
    p = Path(source)
    return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else source


def split_train_val(
    items: list, val_fraction: float, source: str, what: str = "records"
) -> tuple[list, list]:
    """The one train/validation rule of every record dataset: the last ``max(1, int(n * val_fraction))``
    items are held out, the rest train. Reproducible (no shuffling) and never leaves either side empty.

    Raises:
        DataError: With fewer than two items (naming the source and what was counted).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(items) < 2:
        raise DataError(f"{source}: {len(items)} usable {what}; need at least 2 (train + validation)")
    n_val = max(1, int(len(items) * val_fraction))
    return items[:-n_val], items[-n_val:]


def import_function(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (reward functions, gold scorers)."""
    module, _, name = spec.partition(":")
    if not name:
        raise UserError(f"a function must be given as 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import function {spec!r}: {err}") from err
