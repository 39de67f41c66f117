"""Reward modelling: a scalar head on the SFT backbone, trained with the Bradley-Terry loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAccuracy

from lit_llm.backbone.heads import ScalarHeadModel
from lit_llm.checkpoint import load_checkpoint
from lit_llm.data.preference import collate_pairs, render_pair
from lit_llm.stages.base import Stage, load_backbone
from lit_llm.stages.sft import masked_lm_loss
from lit_llm.tokenizer import Tokenizer


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0, center_coef: float = 0.0
) -> torch.Tensor:
    """``mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``.

    The centering term (Eisenstein et al., 2023) pins the reward's mean near zero, which the pairwise loss
    alone leaves free.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


class RewardModel(ScalarHeadModel):
    """A trained reward model, usable on its own: ``RewardModel.load(ckpt).score(tok, prompts, responses)``."""

    @classmethod
    def load(cls, path: str) -> tuple[RewardModel, Tokenizer]:
        backbone, tok, meta = load_backbone(path)
        if meta.get("stage") != "reward":
            raise ValueError(f"{path} is a {meta.get('stage')!r} checkpoint, not a reward model")
        rm = cls(backbone)
        state = load_checkpoint(path)["state_dict"]
        rm.value_head.load_state_dict(
            {k.split("value_head.", 1)[1]: v for k, v in state.items() if "value_head." in k}
        )
        return rm.eval(), tok

    @torch.no_grad()
    def score(
        self, tok: Tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int | None = None
    ) -> torch.Tensor:
        """Rewards ``(N,)`` of (prompt, response) pairs, rendered with the chat template."""
        max_len = max_len or self.model.config.block_size
        seqs = [
            render_pair(tok, [{"role": "user", "content": p}], r, max_len)[:2]
            for p, r in zip(prompts, responses)
        ]
        device = self.value_head.weight.device
        batch = collate_pairs([(s, s, m) for s, m in seqs], tok.pad_id)  # reuse the pair collate: first half
        n = len(seqs)
        return self(batch["input_ids"][:n].to(device), batch["valid"][:n].to(device))


class RewardModule(Stage):
    """Bradley-Terry reward model from an SFT checkpoint (``init_from``).

    The objective is the Bradley-Terry loss, plus ``lm_coef`` times the SFT loss on the chosen replies: the
    backbone keeps predicting good replies, as in GRM (Yang et al., 2024, "Regularizing Hidden States Enables
    Learning Generalizable Reward Model for LLMs"). On tinyworld it sharpens the arithmetic checks; it does not
    by itself teach the wrong-person pairs (that is step 1, ``configs/reward/tinyworld-person.yaml``), and on
    hh-rlhf it made no difference. benchmarks/BENCHMARKS.md has the figures.

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
            raise ValueError(
                "the reward model starts from an SFT model: set --model.init_from path/to/sft.ckpt"
            )
        if lm_coef < 0:
            raise ValueError(f"lm_coef must be >= 0, got {lm_coef}")
        self.margin, self.center_coef, self.lm_coef = margin, center_coef, lm_coef
        self.scorer = ScalarHeadModel(self.model)
        self.value_head = self.scorer.value_head
        self.val_acc = BinaryAccuracy()

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        hidden = self.scorer.hidden(batch["input_ids"], batch["valid"])  # (2B, T, C)
        scores = self.scorer.pool(hidden, batch["valid"])  # (2B,)
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
