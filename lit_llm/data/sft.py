"""Supervised fine-tuning data: conversations -> chat-template tokens + labels on assistant tokens only.

Each conversation is rendered with the tokenizer's chat template (``Tokenizer.render_chat``). The loss mask
is True on every assistant reply and the ``<|end|>`` closing it; labels elsewhere are ``-100`` (ignored).
With ``pack=True`` several conversations share one row: an attention mask keeps them from seeing each
other and positions restart at 0 for each, so the packed loss equals the unpacked loss.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from lit_llm.backbone.masks import packed_mask, positions_from_segments
from lit_llm.data import tinyworld
from lit_llm.data.base import BUILTIN, RecordDataModule
from lit_llm.data.formats import Format, to_conversations
from lit_llm.errors import DataError
from lit_llm.losses import IGNORE_INDEX
from lit_llm.tokenizer import Tokenizer

Example = tuple[list[int], list[int]]  # (input ids, labels) of one conversation, already shifted


def tokenize_conversation(tok: Tokenizer, conv: list[dict], train_on_prompt: bool = False) -> Example:
    """Inputs ``ids[:-1]`` and next-token labels ``ids[1:]`` (``-100`` where the target is not trained: every
    token outside the assistant replies, unless ``train_on_prompt``, which trains on the whole conversation)."""
    ids, mask = tok.render_chat(conv)
    labels = [t if m or train_on_prompt else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``labels`` ``(B, T)``."""
    T = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "labels": labels}


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Greedy first-fit packing of examples into rows of at most ``seq_len`` tokens (order kept per row)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex[0])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(ex)
                room[r] -= n
                break
        else:
            rows.append([ex])
            room.append(seq_len - n)
    return rows


def collate_packed(rows: list[list[Example]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: ``input_ids``, ``labels``, ``positions`` ``(B, T)`` and ``attn_mask`` ``(B, 1, T, T)``.

    The mask is block-diagonal causal (:func:`~lit_llm.backbone.masks.packed_mask`): a token sees earlier
    tokens of its own conversation only, and positions restart at 0 with each conversation. Filler at the
    end of a row attends to itself (no NaN) and has no label.
    """
    B, T = len(rows), seq_len
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, (x, y) in enumerate(row):
            n = len(x)
            ids[b, start : start + n] = torch.tensor(x)
            labels[b, start : start + n] = torch.tensor(y)
            segments[b, start : start + n] = s
            start += n
    return {
        "input_ids": ids,
        "labels": labels,
        "positions": positions_from_segments(segments),
        "attn_mask": packed_mask(segments),
    }


class SFTDataModule(RecordDataModule):
    """Instruction / chat data for SFT.

    Args:
        source: ``tinyworld`` (built in), a local ``.jsonl``/``.json``/``.parquet`` file, or ``hf:<dataset>``.
        tokenizer: The tokenizer (normally linked from ``model.init_from``: the pretraining checkpoint).
        format: Record format; ``auto`` detects messages / alpaca / prompt_completion / hh per record.
        seq_len: Longest example in tokens (and the row length when packing).
        batch_size: Rows per batch.
        pack: Pack several conversations into each row (block-diagonal attention, positions restart).
        too_long: ``drop`` conversations longer than ``seq_len`` or ``truncate`` them (kept only if an
            assistant token survives). The count is printed, never hidden.
        skip_bad_records: Skip (and count) malformed records instead of stopping at the first one.
        val_fraction: Held-out share of a local/HF dataset.
        system_prompt: Optional system message put before every conversation without one.
        train_on_prompt: Train on every token of the conversation (system and user turns and the template's
            markup too), not only on the assistant replies: the prompt mask off, for comparison.
        gold_fn: Scorer ``"module:function"`` of held-out replies, ``(record, reply) -> float``; on tinyworld
            the exact-answer check (logged as ``val/exact_match``). With a file source, the held-out
            conversations' first user turns are the prompts and their records go to the scorer.
        tinyworld_train: Number of tinyworld training instructions.
        tinyworld_val: Number of tinyworld validation instructions.
        tinyworld_eval: Held-out prompts scored by ``gold_fn`` (greedy generation) at each validation.
        seed: Seed of the tinyworld generator.
        num_workers: DataLoader workers.
        chat_template: A Jinja file replacing the tokenizer's chat template (see ``RecordDataModule``).
    """

    kind = "conversations"

    def __init__(
        self,
        source: str = BUILTIN,
        tokenizer: str | None = None,
        format: Format = "auto",
        seq_len: int = 256,
        batch_size: int = 32,
        pack: bool = False,
        too_long: Literal["drop", "truncate"] = "drop",
        skip_bad_records: bool = False,
        val_fraction: float = 0.1,
        system_prompt: str | None = None,
        train_on_prompt: bool = False,
        gold_fn: str | None = None,
        tinyworld_train: int = 4000,
        tinyworld_val: int = 200,
        tinyworld_eval: int = 100,
        seed: int = 0,
        num_workers: int = 0,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(
            source,
            tokenizer,
            batch_size,
            val_fraction,
            skip_bad_records,
            gold_fn,
            seed,
            num_workers,
            chat_template,
        )
        self.format, self.seq_len, self.pack, self.too_long = format, seq_len, pack, too_long
        self.system_prompt, self.train_on_prompt = system_prompt, train_on_prompt
        self.tinyworld_sizes = (tinyworld_train, tinyworld_val)
        self.n_eval = tinyworld_eval

    def builtin_items(self) -> tuple[list, list]:
        n_train, n_val = self.tinyworld_sizes

        def convs(split: str, n: int) -> list[list[dict]]:
            return [
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
                for r in tinyworld.instructions(n, split, self.world)
            ]

        return convs("train", n_train), convs("val", n_val)

    def convert_record(self, record: dict[str, Any]) -> list:
        return to_conversations(record, self.format)

    def tokenize(self, items: list[list[dict]], split: str) -> list[Example]:
        tok, out = self.tokenizer, []
        dropped = truncated = 0
        for conv in items:
            if self.system_prompt and conv[0]["role"] != "system":
                conv = [{"role": "system", "content": self.system_prompt}, *conv]
            x, y = tokenize_conversation(tok, conv, self.train_on_prompt)
            if len(x) > self.seq_len:
                if self.too_long == "drop":
                    dropped += 1
                    continue
                x, y = x[: self.seq_len], y[: self.seq_len]
                if all(t == IGNORE_INDEX for t in y):
                    dropped += 1
                    continue
                truncated += 1
            out.append((x, y))
        self.stats[f"{split}_too_long_dropped"] = dropped
        self.stats[f"{split}_truncated"] = truncated
        if not out:
            raise DataError(
                f"no {split} conversation fits seq_len={self.seq_len}; raise seq_len or use too_long=truncate"
            )
        return out

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate_padded(examples, self.tokenizer.pad_id)

    def _loader(self, examples: list, shuffle: bool, **kwargs: Any) -> DataLoader:
        if not self.pack:
            return super()._loader(examples, shuffle, **kwargs)
        collate = partial(collate_packed, seq_len=self.seq_len, pad_id=self.tokenizer.pad_id)
        rows = pack(examples, self.seq_len)
        return DataLoader(
            rows, self.batch_size, shuffle=shuffle, num_workers=self.num_workers, collate_fn=collate
        )
