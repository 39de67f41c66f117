"""Conversation formats users bring, all turned into one list of ``{role, content}`` messages.

* ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (multi-turn, optional system)
* ``alpaca``: ``{"instruction", "input", "output"}`` (also the seed-task form with ``instances``)
* ``prompt_completion``: ``{"prompt", "completion"}`` (or ``"response"``)
* ``hh``: hh-rlhf conversation strings ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (field ``chosen`` or ``text``)
"""

from __future__ import annotations

import re
from typing import Any, Literal

from lit_llm.errors import DataError

Format = Literal["auto", "messages", "alpaca", "prompt_completion", "hh"]
Message = dict[str, str]

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class RecordError(DataError):
    """A record that cannot be turned into a conversation; the message names the record."""


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    if isinstance(record.get("chosen"), str) or isinstance(record.get("text"), str):
        return "hh"
    raise RecordError(
        f"unknown format (fields {sorted(record)}); expected messages, alpaca, prompt/completion or hh"
    )


def parse_hh(text: str) -> list[Message]:
    """Split an hh-rlhf dialogue into messages (Human -> user, Assistant -> assistant)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RecordError("not an hh-rlhf dialogue (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def to_conversations(record: dict[str, Any], fmt: Format = "auto") -> list[list[Message]]:
    """The conversations in one record (alpaca seed tasks may hold several instances)."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        convs = [[{"role": m.get("role"), "content": m.get("content")} for m in record["messages"]]]
    elif fmt == "alpaca":
        instances = record.get("instances") or [
            {"input": record.get("input", ""), "output": record.get("output")}
        ]
        convs = []
        for inst in instances:
            user = record["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
            convs.append(
                [{"role": "user", "content": user}, {"role": "assistant", "content": inst.get("output")}]
            )
    elif fmt == "prompt_completion":
        reply = record.get("completion", record.get("response"))
        convs = [[{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": reply}]]
    elif fmt == "hh":
        convs = [parse_hh(record.get("chosen") if isinstance(record.get("chosen"), str) else record["text"])]
    else:
        raise RecordError(f"unknown format {fmt!r}")
    for conv in convs:
        validate(conv)
    return convs


def validate(conv: list[Message]) -> None:
    """Raise ``RecordError`` for a missing role, non-text content, or no non-empty assistant turn."""
    if not conv:
        raise RecordError("empty conversation")
    for i, m in enumerate(conv):
        if m.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"message {i} has role {m.get('role')!r} (need system, user or assistant)")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"message {i} has no text content")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"message {i}: empty assistant turn")
    if not any(m["role"] == "assistant" for m in conv):
        raise RecordError("no assistant turn to learn from")
