"""Direct preference optimisation: the policy learns from chosen/rejected pairs against a frozen reference.

DPO (Rafailov et al., 2023) optimises the RLHF objective without a reward model or sampling: the implicit
reward of a reply is ``beta * (log pi(reply | prompt) - log ref(reply | prompt))``, and the Bradley-Terry
loss on the implicit rewards of the chosen and rejected replies trains the policy directly. The math lives
in :func:`lit_llm.losses.sequence_logprobs` and :func:`lit_llm.losses.dpo_loss`; this module only runs the
two models and logs.
"""

from __future__ import annotations

from typing import Any, get_args

import torch

from lit_llm.checkpoint import load_backbone
from lit_llm.errors import CheckpointError, UserError
from lit_llm.losses import DPOLossType, dpo_loss, masked_lm_loss, sequence_logprobs
from lit_llm.stages.base import Stage


class DPOModule(Stage):
    """DPO and its variants on a chat policy from an SFT checkpoint (``init_from``).

    The policy and the frozen reference both start from ``init_from`` (the reference from ``ref_from`` when
    given); the reference stays in eval mode with gradients off for the whole run. A reply's log-prob is the
    sum of its tokens' log-probs (its ``<|end|>`` included; prompt and padding are never scored), so the
    batches must come from ``PreferenceDataModule(pairs_for="dpo")``, whose chosen and rejected rows share
    exactly the same prompt tokens.

    Logs, for train and val: ``loss``, ``acc`` (share of pairs whose chosen reply has the higher implicit
    reward), ``margin``, ``reward_chosen`` / ``reward_rejected`` (the implicit rewards
    ``beta * (logp - ref_logp)``), ``logp_chosen`` / ``logp_rejected`` (the policy's log-probs) and, with
    ``nll_coef``, ``nll``. When the DataModule provides held-out prompts and a gold scorer (tinyworld does),
    the mean gold score of greedy replies is ``val/exact_match``, as in SFT.

    Args:
        beta: Strength of the implicit KL constraint to the reference (IPO: the target log-ratio gap is
            ``1 / (2 beta)``).
        loss_type: ``sigmoid`` (DPO), ``robust`` (robust DPO, Chowdhury et al. 2024), ``hinge`` (SLiC-HF) or
            ``ipo`` (Azar et al. 2023); see :func:`lit_llm.losses.dpo_loss`.
        label_smoothing: Assumed share of flipped preference labels, in ``[0, 0.5)``: conservative DPO
            (cDPO, Mitchell 2023) with ``sigmoid``, or robust DPO's noise rate with ``robust``.
        nll_coef: Weight of the next-token loss on the chosen replies added to the preference loss (RPO,
            Pang et al. 2024), which keeps the chosen replies likely while their margin grows.
        average_logprobs: Score a reply by its mean token log-prob instead of the sum. ``None`` (default):
            averaged for ``ipo``, as IPO's published form uses, summed for the other losses (DPO's form).
        ref_from: Checkpoint of the reference model; ``None``: ``init_from``. It must use the policy's
            tokenizer.
        eval_max_new_tokens: Reply length limit when scoring held-out prompts.
        (all other arguments: see ``Stage``)
    """

    stage_name = "dpo"

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        nll_coef: float = 0.0,
        average_logprobs: bool | None = None,
        ref_from: str | None = None,
        eval_max_new_tokens: int = 48,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("learning_rate", 3e-4)
        kwargs.setdefault("warmup_steps", 20)
        super().__init__(*args, **kwargs)
        if self.hparams.init_from is None:
            raise UserError("DPO starts from an SFT model: set --model.init_from path/to/sft.ckpt")
        if beta <= 0:
            raise UserError(f"beta must be > 0, got {beta}")
        if loss_type not in get_args(DPOLossType):
            raise UserError(f"loss_type must be one of {get_args(DPOLossType)}, got {loss_type!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise UserError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type not in ("sigmoid", "robust"):
            raise UserError(f"label_smoothing applies to loss_type sigmoid or robust, not {loss_type!r}")
        if nll_coef < 0:
            raise UserError(f"nll_coef must be >= 0, got {nll_coef}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.nll_coef = nll_coef
        self.average_logprobs = loss_type == "ipo" if average_logprobs is None else average_logprobs
        self.eval_max_new_tokens = eval_max_new_tokens
        # frozen, not stored in checkpoints: named by path and weight hash, rebuilt by a resumed run
        if ref_from is None:
            # a frozen copy of the policy, or with LoRA the policy itself with its adapters off
            self.set_frozen("ref", self.frozen_reference(), self.hparams.init_from, "reference")
        else:
            ref, ref_tok, _ = load_backbone(ref_from)
            if ref_tok.to_str() != self.tokenizer.to_str():
                raise CheckpointError(
                    f"the reference {ref_from} uses a different tokenizer than the policy {self.hparams.init_from}: "
                    "DPO compares both models' log-probs of the same token ids"
                )
            self.set_frozen("ref", ref.eval(), ref_from, "reference")
        self._samples: list[tuple[str, str]] = []

    def train(self, mode: bool = True) -> DPOModule:
        """Switch the policy's mode (Lightning calls this around validation); the reference stays in eval."""
        super().train(mode)
        self.ref.eval()
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        pairs_for = self.data_hook("pairs_for", "dpo")
        if pairs_for != "dpo":
            raise UserError(
                f"DPO needs pairs that share their prompt tokens, but the data gives pairs_for={pairs_for!r} "
                "pairs: set --data.pairs_for dpo"
            )

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if "labels" not in batch:
            raise UserError("DPO batches need reply labels: use PreferenceDataModule(pairs_for='dpo')")
        ids, labels = batch["input_ids"], batch["labels"]  # (2B, T): chosen rows, then rejected rows
        B = ids.shape[0] // 2
        # the rows are right-padded, so causal attention alone keeps real tokens from seeing padding
        logits = self.model(ids)  # (2B, T, V)
        policy = sequence_logprobs(logits, labels, self.average_logprobs)  # (2B,) log p(reply | prompt)
        with torch.no_grad():
            ref = sequence_logprobs(self.ref(ids), labels, self.average_logprobs)  # (2B,)
        loss, stats = dpo_loss(
            policy[:B], policy[B:], ref[:B], ref[B:], self.beta, self.loss_type, self.label_smoothing
        )
        on_step = stage == "train"
        log = dict(on_step=on_step, on_epoch=not on_step, batch_size=B)
        if self.nll_coef:
            nll, _ = masked_lm_loss(logits[:B], labels[:B])
            self.log(f"{stage}/pref_loss", loss, **log)
            self.log(f"{stage}/nll", nll, **log)
            loss = loss + self.nll_coef * nll
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        self.log(f"{stage}/acc", stats["acc"], prog_bar=not on_step, **log)
        for name in ("margin", "reward_chosen", "reward_rejected"):
            self.log(f"{stage}/{name}", stats[name], **log)
        self.log(f"{stage}/logp_chosen", policy[:B].detach().mean(), **log)
        self.log(f"{stage}/logp_rejected", policy[B:].detach().mean(), **log)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_gold_score(self.eval_max_new_tokens)

    def sample_texts(self) -> list[tuple[str, str]]:
        return self._samples
