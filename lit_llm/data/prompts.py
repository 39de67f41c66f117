"""Prompts for RL: each record is ``{"prompt": str, ...}``, optionally with fields a scorer reads (tinyworld
adds ``answer``). Batches are plain lists of records; the RL stage renders and samples them."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from lit_llm.data import tinyworld
from lit_llm.data.base import BUILTIN, RecordDataModule, prompt_record
from lit_llm.errors import DataError


class PromptDataModule(RecordDataModule):
    """Prompts for RL rollouts, and held-out prompts scored by the gold reward at each validation.

    Args:
        source: ``tinyworld`` (prompts with a gold answer), or a local file / ``hf:<dataset>`` whose records
            have a ``prompt`` (or a conversation whose first user turn is used).
        tokenizer: Linked from ``model.init_from`` (the SFT checkpoint).
        batch_size: Prompts per rollout (per device).
        train_prompts: Number of tinyworld training prompts.
        val_prompts: Number of held-out tinyworld prompts scored at each validation.
        val_split: tinyworld split of the held-out prompts (``val`` during training, ``test`` for reports).
        val_fraction: Held-out share of a local/HF dataset.
        skip_bad_records: Skip (and count) records without a prompt instead of stopping.
        gold_fn: Scorer ``"module:function"`` of replies, ``(record, reply) -> float``, logged (never
            optimised unless also the stage's ``reward_fn``); tinyworld's exact-answer check by default there.
        seed: Seed of the tinyworld generator.
        chat_template: A Jinja file replacing the tokenizer's chat template (see ``RecordDataModule``).
    """

    kind = "prompts"

    def __init__(
        self,
        source: str = BUILTIN,
        tokenizer: str | None = None,
        batch_size: int = 32,
        train_prompts: int = 4000,
        val_prompts: int = 200,
        val_split: str = "val",
        val_fraction: float = 0.1,
        skip_bad_records: bool = False,
        gold_fn: str | None = None,
        seed: int = 0,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(
            source, tokenizer, batch_size, val_fraction, skip_bad_records, gold_fn, seed, 0, chat_template
        )
        self.train_prompts, self.val_prompts, self.val_split = train_prompts, val_prompts, val_split

    @property
    def seq_len(self) -> None:
        return None

    def builtin_items(self) -> tuple[list, list]:
        return (
            tinyworld.rl_prompts(self.train_prompts, "train", self.world),
            tinyworld.rl_prompts(self.val_prompts, self.val_split, self.world),
        )

    def convert_record(self, record: dict[str, Any]) -> list:
        return [prompt_record(record)]

    def eval_prompts(self) -> list[dict[str, Any]]:
        """The validation prompts (validation batches are these too)."""
        return self.val_examples

    def train_dataloader(self) -> DataLoader:
        # every rollout has batch_size prompts: a short last batch would change the group statistics
        if len(self.train_examples) < self.batch_size:
            raise DataError(
                f"{self.source}: {len(self.train_examples)} training prompts, fewer than one rollout of "
                f"batch_size={self.batch_size}: lower --data.batch_size or add prompts"
            )
        return self._loader(self.train_examples, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, shuffle=False, batch_size=max(self.batch_size, 64))
