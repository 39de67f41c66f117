"""The files a tokenizer ships as, in Hugging Face's layout: read from a folder, kept as texts, written back.

A model folder holds ``tokenizer.json`` (the ``tokenizers`` model: vocabulary, merges, pre-tokenizer,
added tokens) and beside it ``tokenizer_config.json`` (special tokens, ``add_bos_token``, often the
``chat_template``), sometimes ``chat_template.jinja`` (the template on its own; it wins over the config's),
``special_tokens_map.json`` and the model's ``generation_config.json`` (its stop ids, ``eos_token_id``, may
be a list). :class:`~lit_llm.tokenizer.Tokenizer` keeps these texts as they were read, so an export writes
the model's own files back unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_tokenizer_files(folder: str | os.PathLike) -> dict[str, str]:
    """The tokenizer files present in ``folder`` (``tokenizer.json`` required), as ``{name: text}``."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        extra = ""
        if "tokenizer.model" in found:
            extra = (
                " (it has a SentencePiece tokenizer.model only: save it once with transformers' "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder) to write tokenizer.json)"
            )
        raise FileNotFoundError(f"tokenizer not found: {folder / 'tokenizer.json'}{extra}")
    return {
        name: (folder / name).read_text(encoding="utf-8")
        for name in TOKENIZER_FILES
        if (folder / name).is_file()
    }


def token_text(value: Any) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_json(files: dict[str, str], name: str) -> dict[str, Any]:
    """A JSON file of ``files`` as a dict (``{}`` when absent); a clear error when it is not valid JSON."""
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must hold a JSON object, got {type(value).__name__}")
    return value


def config_template(config: dict[str, Any]) -> str | None:
    """The chat template in a ``tokenizer_config.json``: a string, or the ``default`` of a named list."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value.strip() else None


def id_list(value: Any) -> list[int]:
    """``eos_token_id`` of a generation config (an int, a list of ints, or absent) as a list."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
