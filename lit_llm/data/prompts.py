"""Prompts for RL: each record is ``{"prompt": str, ...}``, optionally with fields a gold reward reads
(tinyworld adds ``answer``). Batches are plain lists of records; the PPO stage renders and samples them."""

from __future__ import annotations

from typing import Any

from lightning import LightningDataModule
from torch.utils.data import DataLoader

from lit_llm.data import tinyworld
from lit_llm.data.common import read_records
from lit_llm.data.formats import RecordError, detect_format, to_conversations
from lit_llm.tokenizer import Tokenizer


def _prompt_of(record: dict[str, Any]) -> dict[str, Any]:
    if isinstance(record.get("prompt"), str):
        return record
    if detect_format(record) in ("messages", "hh", "alpaca"):
        conv = to_conversations(record)[0]
        users = [m["content"] for m in conv if m["role"] == "user"]
        return {**record, "prompt": users[0]}
    raise RecordError("no prompt")


class PromptDataModule(LightningDataModule):
    """Prompts for PPO rollouts.

    Args:
        source: ``tinyworld`` (prompts with a gold answer), or a local file / ``hf:<dataset>`` whose records
            have a ``prompt`` (or a conversation whose first user turn is used).
        tokenizer: Linked from ``model.init_from`` (the SFT checkpoint).
        batch_size: Prompts per rollout (per device).
        train_prompts: Number of tinyworld training prompts.
        val_prompts: Number of held-out tinyworld prompts scored at each validation.
        val_split: tinyworld split of the held-out prompts (``val`` during training, ``test`` for reports).
        val_fraction: Held-out share of a local/HF dataset.
        seed: Seed of the tinyworld generator.
    """

    def __init__(
        self,
        source: str = "tinyworld",
        tokenizer: str | None = None,
        batch_size: int = 32,
        train_prompts: int = 4000,
        val_prompts: int = 200,
        val_split: str = "val",
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.tokenizer_path, self.batch_size = source, tokenizer, batch_size
        self.train_prompts, self.val_prompts, self.val_split = train_prompts, val_prompts, val_split
        self.val_fraction, self.seed = val_fraction, seed
        self._tokenizer: Tokenizer | None = None
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError("PPO needs the policy's tokenizer: set --model.init_from path/to/sft.ckpt")
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> None:
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        if self.source == "tinyworld":
            world = tinyworld.WorldConfig(seed=self.seed)
            self.train_records = tinyworld.rl_prompts(self.train_prompts, "train", world)
            self.val_records = tinyworld.rl_prompts(self.val_prompts, self.val_split, world)
            return
        records = []
        for i, r in enumerate(read_records(self.source)):
            try:
                records.append(_prompt_of(r))
            except (RecordError, KeyError, TypeError) as err:
                raise RecordError(f"{self.source}, record {i}: {err}") from err
        if len(records) < 2:
            raise ValueError(f"{self.source}: need at least 2 prompts")
        n_val = max(1, int(len(records) * self.val_fraction))
        self.train_records, self.val_records = records[:-n_val], records[-n_val:]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_records, self.batch_size, shuffle=True, drop_last=True, collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_records, max(self.batch_size, 64), shuffle=False, collate_fn=list)
