"""Supervised fine-tuning data: conversations -> chat-template tokens + labels on assistant tokens only.

Each conversation is rendered with the tokenizer's chat template (``Tokenizer.render_chat``). The loss mask
is True on every assistant reply and the ``<|end|>`` closing it; labels elsewhere are ``-100`` (ignored).
With ``pack=True`` several conversations share one row: an attention mask keeps them from seeing each
other and positions restart at 0 for each, so the packed loss equals the unpacked loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_llm.data import tinyworld
from lit_llm.data.common import read_records
from lit_llm.data.formats import Format, RecordError, to_conversations
from lit_llm.tokenizer import Tokenizer

IGNORE = -100
Example = tuple[list[int], list[int]]  # (input ids, labels) of one conversation, already shifted


def tokenize_conversation(tok: Tokenizer, conv: list[dict]) -> Example:
    """Inputs ``ids[:-1]`` and next-token labels ``ids[1:]`` (``-100`` where the target is not trained)."""
    ids, mask = tok.render_chat(conv)
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``labels`` ``(B, T)``."""
    T = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
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

    The mask is block-diagonal causal: a token sees earlier tokens of its own conversation only. Filler at
    the end of a row attends to itself (no NaN) and has no label.
    """
    B, T = len(rows), seq_len
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, (x, y) in enumerate(row):
            n = len(x)
            ids[b, start : start + n] = torch.tensor(x)
            labels[b, start : start + n] = torch.tensor(y)
            positions[b, start : start + n] = torch.arange(n)
            segment[b, start : start + n] = s
            start += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    real = (segment >= 0)[:, None, :]
    mask = (causal & same & real) | torch.eye(T, dtype=torch.bool)
    return {"input_ids": ids, "labels": labels, "positions": positions, "attn_mask": mask[:, None]}


class SFTDataModule(LightningDataModule):
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
        tinyworld_train: Number of tinyworld training instructions.
        tinyworld_val: Number of tinyworld validation instructions.
        tinyworld_eval: Held-out tinyworld prompts scored by exact answer (greedy generation) each validation.
        seed: Seed of the tinyworld generator.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        source: str = "tinyworld",
        tokenizer: str | None = None,
        format: Format = "auto",
        seq_len: int = 256,
        batch_size: int = 32,
        pack: bool = False,
        too_long: Literal["drop", "truncate"] = "drop",
        skip_bad_records: bool = False,
        val_fraction: float = 0.1,
        system_prompt: str | None = None,
        tinyworld_train: int = 4000,
        tinyworld_val: int = 200,
        tinyworld_eval: int = 100,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.tokenizer_path, self.format = source, tokenizer, format
        self.seq_len, self.batch_size, self.pack = seq_len, batch_size, pack
        self.too_long, self.skip_bad_records, self.val_fraction = too_long, skip_bad_records, val_fraction
        self.system_prompt, self.seed, self.num_workers = system_prompt, seed, num_workers
        self.tinyworld_sizes = (tinyworld_train, tinyworld_val, tinyworld_eval)
        self.kind = "conversations"
        self._tokenizer: Tokenizer | None = None
        self.stats: dict[str, int] = {}
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError(
                    "this stage needs the tokenizer of the model it starts from: set --model.init_from to a "
                    "checkpoint (the CLI passes it on as --data.tokenizer) or --data.tokenizer to a tokenizer.json"
                )
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ------------------------------------------------------------------------------------------ records
    def conversations(self) -> tuple[list[list[dict]], list[list[dict]]]:
        """(train, validation) conversations, malformed records handled by ``skip_bad_records``."""
        if self.source == "tinyworld":
            n_train, n_val, _ = self.tinyworld_sizes
            world = tinyworld.WorldConfig(seed=self.seed)

            def convs(split: str, n: int) -> list[list[dict]]:
                return [
                    [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["response"]},
                    ]
                    for r in tinyworld.instructions(n, split, world)
                ]

            return convs("train", n_train), convs("val", n_val)
        return self._split_records(lambda rec: to_conversations(rec, self.format))

    def _split_records(self, convert: Callable[[dict], list]) -> tuple[list, list]:
        """Convert every record of ``source`` (a record may give several items) and split train/validation.

        Malformed records stop with an error naming the record, or are skipped and counted when
        ``skip_bad_records`` is set.
        """
        records = read_records(self.source)
        out: list = []
        bad = 0
        for i, rec in enumerate(records):
            try:
                out.extend(convert(rec))
            except (RecordError, KeyError, TypeError) as err:
                if not self.skip_bad_records:
                    raise RecordError(
                        f"{self.source}, record {i}: {err} (pass --data.skip_bad_records true to skip such records)"
                    ) from err
                bad += 1
        self.stats["bad_records_skipped"] = bad
        if len(out) < 2:
            raise ValueError(f"{self.source}: {len(out)} usable {self.kind}; need at least 2 (train + val)")
        n_val = max(1, int(len(out) * self.val_fraction))
        return out[:-n_val], out[-n_val:]

    def eval_prompts(self) -> list[dict[str, Any]]:
        """Held-out prompts with a gold answer (tinyworld only): ``[{"prompt", "answer"}, ...]``."""
        if self.source != "tinyworld":
            return []
        return tinyworld.rl_prompts(self.tinyworld_sizes[2], "val", tinyworld.WorldConfig(seed=self.seed))

    def _tokenize(self, convs: list[list[dict]], split: str) -> list[Example]:
        tok, out = self.tokenizer, []
        dropped = truncated = 0
        for conv in convs:
            if self.system_prompt and conv[0]["role"] != "system":
                conv = [{"role": "system", "content": self.system_prompt}, *conv]
            x, y = tokenize_conversation(tok, conv)
            if len(x) > self.seq_len:
                if self.too_long == "drop":
                    dropped += 1
                    continue
                x, y = x[: self.seq_len], y[: self.seq_len]
                if all(t == IGNORE for t in y):
                    dropped += 1
                    continue
                truncated += 1
            out.append((x, y))
        self.stats[f"{split}_too_long_dropped"] = dropped
        self.stats[f"{split}_truncated"] = truncated
        if not out:
            raise ValueError(
                f"no {split} conversation fits seq_len={self.seq_len}; raise seq_len or use too_long=truncate"
            )
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        train, val = self.items()
        self.train_examples = self._tokenize(train, "train")
        self.val_examples = self._tokenize(val, "val")
        rank_zero_info(
            f"{type(self).__name__}: {len(self.train_examples)} train / {len(self.val_examples)} val {self.kind}; "
            + ", ".join(f"{k}={v}" for k, v in self.stats.items())
        )

    def items(self) -> tuple[list, list]:
        """(train, validation) items to tokenize: conversations here."""
        return self.conversations()

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_id
        if self.pack:
            rows = pack(examples, self.seq_len)
            return DataLoader(
                rows,
                self.batch_size,
                shuffle=shuffle,
                num_workers=self.num_workers,
                collate_fn=lambda b: collate_packed(b, self.seq_len, pad),
            )
        return DataLoader(
            examples,
            self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=lambda b: collate_padded(b, pad),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, shuffle=False)
