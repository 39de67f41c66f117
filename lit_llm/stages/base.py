"""What every stage shares: building the backbone (from a preset or a previous stage's checkpoint),
storing config and tokenizer in checkpoints, AdamW with weight-decay groups, warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.checkpoint import META_KEY, load_backbone
from lit_llm.errors import CheckpointError
from lit_llm.tokenizer import Tokenizer

RNG_KEY = "lit_llm_rng"


class Stage(LightningModule):
    """Base of the four stages. Subclasses implement ``_step(batch, stage) -> loss`` and may add heads.

    Args:
        preset: Named model preset (see ``ModelConfig.from_name``); ignored with ``init_from``.
        model_overrides: Field overrides for the preset, e.g. ``{n_layer: 2, mlp: gelu}``.
        vocab_size: Linked from the data's tokenizer by the CLI; never typed by hand.
        block_size: Linked from the data's sequence length by the CLI (at least that long).
        init_from: Start from this lit_llm checkpoint (weights, config and tokenizer come with it).
        learning_rate: Peak AdamW learning rate.
        weight_decay: Decoupled weight decay on matrices (not on norms, biases).
        betas: AdamW betas.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Final learning rate of the cosine schedule, as a fraction of the peak.
        compile: Compile each block's training forward with ``torch.compile`` (see ``lit_llm.transforms``).
        activation_checkpointing: Recompute each block's activations in the backward pass instead of storing
            them: less memory for about one more forward pass of compute; same loss and gradients.
    """

    stage_name = "base"

    def __init__(
        self,
        preset: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        block_size: int | None = None,
        init_from: str | None = None,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        if init_from is not None:
            self.model, self.tokenizer, _ = load_backbone(init_from)
            cfg = self.model.config
            if vocab_size is not None and vocab_size != cfg.vocab_size:
                raise CheckpointError(
                    f"the data's tokenizer has {vocab_size} tokens but {init_from} was trained with "
                    f"{cfg.vocab_size}: use the checkpoint's tokenizer (data.tokenizer={init_from})"
                )
            if block_size is not None and block_size > cfg.block_size and cfg.pos == "learned":
                raise CheckpointError(
                    f"seq_len {block_size} exceeds the checkpoint's block_size {cfg.block_size}"
                )
        else:
            overrides = dict(model_overrides or {})
            if vocab_size is not None:
                overrides["vocab_size"] = vocab_size
            if block_size is not None:
                overrides["block_size"] = max(block_size, overrides.get("block_size", 0))
            self.model = Transformer(ModelConfig.from_name(preset, **overrides))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def configure_model(self) -> None:
        """Apply the speed/memory transforms chosen by ``activation_checkpointing`` and ``compile``."""
        from lit_llm.transforms import apply_activation_checkpointing, compile_model

        if self.hparams.get("activation_checkpointing"):
            apply_activation_checkpointing(
                self.model
            )  # before compile: the compiled code holds the checkpoint
        if self.hparams.get("compile"):
            compile_model(self.model)

    # ------------------------------------------------------------------------------------ tokenizer plumbing
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.tokenizer is None and dm is not None and hasattr(dm, "tokenizer"):
            self.tokenizer = dm.tokenizer
        if self.tokenizer is not None and self.tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens, model has vocab_size={self.config.vocab_size}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {
            "model_config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None,
            "stage": self.stage_name,
            "backbone_prefix": "model.",
        }
        # the RNG state (dropout, sampling) so that a resumed run draws what the uninterrupted one would have
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint[RNG_KEY]["cuda"] = torch.cuda.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY)
        if meta is None:
            raise CheckpointError(
                "not a lit_llm checkpoint (no 'lit_llm' entry); was it written by another program?"
            )
        theirs = ModelConfig.from_dict(meta["model_config"])
        diff = self.config.diff(theirs)
        if diff:
            lines = ", ".join(f"{k}: run has {a!r}, checkpoint has {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint was written by a different model config ({lines})")
        if (
            meta.get("tokenizer")
            and self.tokenizer is not None
            and meta["tokenizer"] != self.tokenizer.to_str()
        ):
            raise CheckpointError(
                "checkpoint was written with a different tokenizer than this run's data uses"
            )
        if meta.get("tokenizer") and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_str(meta["tokenizer"])
        self._rng_to_restore = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        """On resume, continue the RNG stream where the checkpoint left it (just before the next step)."""
        state, self._rng_to_restore = self._rng_to_restore, None
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        # decided together, so that a NaN on one rank stops every rank (instead of leaving the others waiting)
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            ckpt = Path(self.trainer.default_root_dir)
            raise FloatingPointError(
                f"{self.stage_name}: loss is {loss.item()} (on this or another rank) at step {self.global_step}; "
                f"stopping. The last good checkpoint (if any, under {ckpt}) was not overwritten. Lower the "
                "learning rate or check the data."
            )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(
            param_groups(self.named_parameters(), hp.weight_decay), lr=hp.learning_rate, betas=tuple(hp.betas)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler(opt), "interval": "step"}}

    def lr_scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at the run's last step."""
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, max(total - 1, 0))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup, total, hp.min_lr_ratio))

    def data_hook(self, name: str, default: Any = None) -> Any:
        """What the DataModule provides for this stage (``eval_prompts``, ``gold_reward``, ...), or ``default``.

        Dataset knowledge (held-out prompts, gold scorers, sample texts) lives with the data, so a stage runs
        on any dataset that provides it.
        """
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return getattr(dm, name, default) if dm is not None else default


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (``ndim >= 2``), none on norms, biases and other vectors.

    Frozen parameters are left out; a parameter shared by several modules (a tied embedding) appears once.
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for _, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
