"""Reward modelling: a scalar head on the SFT backbone, trained with the Bradley-Terry loss."""

from __future__ import annotations

import torch
from torchmetrics.classification import BinaryAccuracy

from lit_llm.backbone.heads import new_value_head, pool_last, sequence_hidden
from lit_llm.errors import UserError
from lit_llm.losses import bradley_terry_loss, masked_lm_loss
from lit_llm.stages.base import Stage


class RewardModule(Stage):
    """Bradley-Terry reward model from an SFT checkpoint (``init_from``).

    The model is the backbone plus ``value_head``, a linear map of the final hidden state at the last real
    token to a scalar score. The objective is the Bradley-Terry loss, plus ``lm_coef`` times the SFT loss on
    the chosen replies, which keeps the backbone predicting good replies (GRM: Yang et al., 2024,
    "Regularizing Hidden States Enables Learning Generalizable Reward Model for LLMs").
    Load a trained one with ``lit_llm.evaluation.RewardModel.load``.

    Args:
        margin: Required score gap in the loss (0 = plain Bradley-Terry).
        center_coef: Weight of the reward-centering term.
        lm_coef: Weight of the next-token loss on the chosen replies (0 = pure Bradley-Terry).
        (all other arguments: see ``Stage``)
    """

    stage_name = "reward"

    def __init__(
        self, *args, margin: float = 0.0, center_coef: float = 0.01, lm_coef: float = 0.0, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.hparams.init_from is None:
            raise UserError(
                "the reward model starts from an SFT model: set --model.init_from path/to/sft.ckpt"
            )
        if lm_coef < 0:
            raise UserError(f"lm_coef must be >= 0, got {lm_coef}")
        self.margin, self.center_coef, self.lm_coef = margin, center_coef, lm_coef
        self.value_head = new_value_head(self.model.config.n_embd)
        self.val_acc = BinaryAccuracy()

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        hidden = sequence_hidden(self.model, batch["input_ids"], batch["valid"])  # (2B, T, C)
        scores = self.value_head(pool_last(hidden, batch["valid"])).squeeze(-1).float()  # (2B,)
        rc, rr = scores.chunk(2)
        loss = bradley_terry_loss(rc, rr, self.margin, self.center_coef)
        on_step = stage == "train"
        log = dict(on_step=on_step, on_epoch=not on_step, batch_size=rc.shape[0])
        if self.lm_coef:
            labels = batch["chosen_labels"]  # (B, T)
            lm_loss, _ = masked_lm_loss(self.model.lm_head(hidden[: labels.shape[0]]), labels)
            self.log(f"{stage}/bt_loss", loss, **log)
            self.log(f"{stage}/lm_loss", lm_loss, **log)
            loss = loss + self.lm_coef * lm_loss
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        self.log(f"{stage}/margin", (rc - rr).mean(), **log)
        self.log(f"{stage}/reward_mean", scores.mean(), **log)
        self.log(f"{stage}/reward_std", scores.std(), **log)
        if on_step:
            self.log("train/acc", (rc > rr).float().mean(), on_step=True, batch_size=rc.shape[0])
        else:
            self.val_acc((rc - rr).sigmoid(), torch.ones_like(rc, dtype=torch.long))
            self.log(f"{stage}/acc", self.val_acc, prog_bar=True, on_epoch=True, batch_size=rc.shape[0])
        return loss
