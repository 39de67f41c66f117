"""Supervised fine-tuning: the masked next-token loss on assistant tokens."""

from __future__ import annotations

import torch

from lit_llm.errors import UserError
from lit_llm.losses import masked_lm_loss
from lit_llm.stages.base import Stage


class SFTModule(Stage):
    """Instruction tuning from a pretraining checkpoint (``init_from``).

    Logs the masked loss, response-token accuracy and, when the DataModule provides held-out prompts and a
    gold scorer (``eval_prompts()`` and ``gold_reward``; tinyworld does: is the answer right?), the mean gold
    score of greedy replies as ``val/exact_match``, the figure later stages improve on.

    Args:
        eval_max_new_tokens: Reply length limit when scoring held-out prompts.
        (all other arguments: see ``Stage``)
    """

    stage_name = "sft"

    def __init__(self, *args, eval_max_new_tokens: int = 48, **kwargs) -> None:
        kwargs.setdefault("learning_rate", 1e-3)
        kwargs.setdefault("warmup_steps", 20)
        super().__init__(*args, **kwargs)
        if self.hparams.init_from is None:
            raise UserError("SFT starts from a pretrained model: set --model.init_from path/to/pretrain.ckpt")
        self.eval_max_new_tokens = eval_max_new_tokens
        self._samples: list[tuple[str, str]] = []

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self.model(batch["input_ids"], batch.get("positions"), batch.get("attn_mask"))  # (B, T, V)
        loss, acc = masked_lm_loss(logits, batch["labels"])
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        self.log(f"{stage}/token_acc", acc, on_step=on_step, on_epoch=not on_step)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_gold_score(self.eval_max_new_tokens)

    def sample_texts(self) -> list[tuple[str, str]]:
        return self._samples
