"""Preference pairs for the reward model: one prompt, a chosen and a rejected response.

Formats: ``prompt``/``chosen``/``rejected`` strings, or hh-rlhf full dialogues where chosen and rejected
share every turn up to the last assistant reply (the shared part becomes the prompt). Both responses are
rendered with the same chat template as SFT. Too-long sequences keep their *end* (the response being
judged); the number touched is reported, as is the number of identical pairs dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_llm.data import tinyworld
from lit_llm.data.base import BUILTIN, RecordDataModule
from lit_llm.data.formats import Message, RecordError, parse_hh
from lit_llm.errors import DataError
from lit_llm.losses import IGNORE_INDEX
from lit_llm.tokenizer import Tokenizer

Pair = tuple[list[int], list[int], list[bool]]  # chosen ids, rejected ids, chosen's trained-on mask


def split_pair(record: dict[str, Any]) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a record in either format."""
    if "prompt" in record:
        prompt = record["prompt"]
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return msgs, record["chosen"], record["rejected"]
    chosen, rejected = parse_hh(record["chosen"]), parse_hh(record["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("both dialogues must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("chosen and rejected do not share the dialogue before the last assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def render_pair(
    tok: Tokenizer, prompt: list[Message], response: str, max_len: int
) -> tuple[list[int], list[bool], bool]:
    """Chat-template ids of prompt + response and, per token, whether SFT would train on it (assistant
    text and its ``<|end|>``), both cut to the last ``max_len`` tokens; and whether they were cut."""
    ids, mask = tok.render_chat([*prompt, {"role": "assistant", "content": response}])
    cut = len(ids) > max_len
    return ids[-max_len:], mask[-max_len:], cut


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded.

    Returns:
        ``input_ids`` and ``valid`` ``(2B, T)``; ``chosen_labels`` ``(B, T)``: the next token of each chosen
        row where it is an assistant token (the SFT labels of the chosen reply), ``-100`` elsewhere.
    """
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        valid[i, : len(s)] = True
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (c, _, mask) in enumerate(pairs):
        labels[i, : len(c) - 1] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(c[1:], mask[1:])])
    return {"input_ids": ids, "valid": valid, "chosen_labels": labels}


class PreferenceDataModule(RecordDataModule):
    """Chosen/rejected pairs for reward modelling (and preference optimisation).

    Args:
        source: ``tinyworld``, a local ``.jsonl``/``.json``/``.parquet`` (``.gz`` allowed) or ``hf:<dataset>``.
        tokenizer: Linked from ``model.init_from`` (the SFT checkpoint).
        seq_len: Longest sequence; longer ones keep their last ``seq_len`` tokens.
        batch_size: Pairs per batch.
        skip_bad_records: Skip and count malformed records instead of stopping.
        val_fraction: Held-out share of a local/HF dataset.
        tinyworld_train: Number of tinyworld training pairs.
        tinyworld_val: Number of tinyworld validation pairs.
        tinyworld_wrong_person: Share of tinyworld *training* pairs whose rejected reply is another person's
            true fact (``tinyworld.preference_pairs(wrong_person_rate=...)``); validation pairs are always
            drawn as usual, so accuracies stay comparable. ``1.0`` trains on those pairs only (the first step of
            ``configs/reward/tinyworld-person.yaml``).
        seed: Seed of the tinyworld generator.
        num_workers: DataLoader workers.
    """

    kind = "pairs"

    def __init__(
        self,
        source: str = BUILTIN,
        tokenizer: str | None = None,
        seq_len: int = 256,
        batch_size: int = 32,
        skip_bad_records: bool = False,
        val_fraction: float = 0.1,
        tinyworld_train: int = 4000,
        tinyworld_val: int = 400,
        tinyworld_wrong_person: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            source, tokenizer, batch_size, val_fraction, skip_bad_records, None, seed, num_workers
        )
        if not 0.0 <= tinyworld_wrong_person <= 1.0:
            raise ValueError(f"tinyworld_wrong_person must be in [0, 1], got {tinyworld_wrong_person}")
        self.seq_len, self.wrong_person = seq_len, tinyworld_wrong_person
        self.tinyworld_sizes = (tinyworld_train, tinyworld_val)

    def builtin_items(self) -> tuple[list, list]:
        """(train, validation) lists of (prompt messages, chosen, rejected)."""
        n_train, n_val = self.tinyworld_sizes

        def get(split: str, n: int, wrong_person: float = 0.0) -> list[tuple]:
            pairs = tinyworld.preference_pairs(n, split, self.world, wrong_person)
            return [([{"role": "user", "content": p["prompt"]}], p["chosen"], p["rejected"]) for p in pairs]

        return get("train", n_train, self.wrong_person), get("val", n_val)

    def convert_record(self, record: dict[str, Any]) -> list:
        return [split_pair(record)]

    def tokenize(self, items: list[tuple], split: str) -> list[Pair]:
        tok, out = self.tokenizer, []
        identical = cut = 0
        for prompt, chosen, rejected in items:
            if chosen.strip() == rejected.strip():
                identical += 1
                continue
            c, c_mask, cut_c = render_pair(tok, prompt, chosen, self.seq_len)
            r, _, cut_r = render_pair(tok, prompt, rejected, self.seq_len)
            cut += cut_c or cut_r
            out.append((c, r, c_mask))
        self.stats[f"{split}_identical_dropped"] = identical
        self.stats[f"{split}_truncated"] = cut
        if not out:
            raise DataError(f"no usable {split} pairs in {self.source}")
        return out

    def collate(self, examples: list[Pair]) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, self.tokenizer.pad_id)
