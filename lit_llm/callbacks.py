"""Callbacks: sample generations to TensorBoard, throughput (tokens/s, MFU), and the per-stage checkpoint
(and TensorBoard logger name) that the shared base config (``lit_llm/cli/base.yaml``) gives every stage."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_llm.transforms import gathered, is_sharded

# the validation metrics StageCheckpoint(monitor="auto") looks for, in order, with the better direction
AUTO_MONITOR = (("val/acc", "max"), ("val/loss", "min"))


class StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with the defaults every stage shares, so a stage config need not restate it.

    * ``dirpath=None``: the stage's folder, ``trainer.default_root_dir`` (``checkpoints/<stage>``), instead of
      Lightning's ``<logger dir>/version_N/checkpoints``.
    * ``auto_monitor=True`` and no ``monitor``: keep the best checkpoint by ``val/acc`` (higher is better) when
      the stage logs it, else by ``val/loss`` (lower is better); a stage that logs neither (PPO) keeps only
      ``last.ckpt``. A ``monitor`` name, or ``auto_monitor=False``, behaves as in ``ModelCheckpoint``.
      (A separate flag, not ``monitor="auto"``: jsonargparse carries init_args over when a later config swaps
      the class for a plain ``ModelCheckpoint``, which must not inherit a metric called "auto".)
    * ``filename="step{step}"``, ``save_last=True``, and ``enable_version_counter=False``: a rerun replaces
      ``last.ckpt``, which the next stage reads.

    Built on ``ModelCheckpoint``'s public interface only: until the metric is known, ``monitor`` is ``None``
    and ``save_top_k`` 0 (nothing is ranked, ``last.ckpt`` is kept as ``ModelCheckpoint`` keeps it); the
    public hooks that save (``on_train_batch_end``, ``on_train_epoch_end``, ``on_validation_end``) first look
    for the metric in ``trainer.callback_metrics`` and, once found, set ``monitor``, ``mode`` and the
    requested ``save_top_k``. ``state_key`` is built from this callback's own arguments, with "auto" for the
    metric, so it is the same before and after the metric is found and ``--ckpt_path`` restores its state.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = "step{step}",
        monitor: str | None = None,
        auto_monitor: bool = True,
        save_last: bool | None = True,
        save_top_k: int = 1,
        mode: str = "min",
        auto_insert_metric_name: bool = False,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        self.auto_monitor = auto_monitor and monitor is None
        self.requested_top_k = save_top_k
        # what state_key names (ModelCheckpoint's own key, with the triggers' defaults filled in as it does)
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_epochs, every_n_train_steps = 1, 0
        self.triggers = {
            "every_n_train_steps": every_n_train_steps or 0,
            "every_n_epochs": every_n_epochs or 0,
            "train_time_interval": train_time_interval,
        }
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            save_last=save_last,
            save_top_k=0 if self.auto_monitor else save_top_k,  # nothing to rank by until the metric is seen
            mode=mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )

    @property
    def state_key(self) -> str:
        # stable while "auto" is unresolved and after, so --ckpt_path restores this callback's state (the same
        # string as ModelCheckpoint's key with monitor and mode "auto": older checkpoints restore too)
        key = {
            "monitor": "auto" if self.auto_monitor else self.monitor,
            "mode": "auto" if self.auto_monitor else self.mode,
            **self.triggers,
        }
        return f"{type(self).__qualname__}{key!r}"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.expanduser(str(trainer.default_root_dir)))
        super().setup(trainer, pl_module, stage)

    def resolve_monitor(self, metrics: dict[str, Any]) -> bool:
        """With ``auto_monitor``: fix ``monitor`` and ``mode`` from the first ``AUTO_MONITOR`` key ``metrics``
        hold, and rank checkpoints from then on (the requested ``save_top_k``). Whether the metric is known."""
        if not self.auto_monitor or self.monitor is not None:
            return self.monitor is not None
        for key, mode in AUTO_MONITOR:
            if key in metrics:
                self.monitor, self.mode, self.save_top_k = key, mode, self.requested_top_k
                return True
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.resolve_monitor(trainer.callback_metrics)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.resolve_monitor(trainer.callback_metrics)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.resolve_monitor(trainer.callback_metrics)
        super().on_validation_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor"):  # resumed after the metric was found: rank by it from the first step
            self.resolve_monitor({state_dict["monitor"]: None})
        super().load_state_dict(state_dict)


def stage_logger_names(trainer: Trainer) -> None:
    """Name every ``TensorBoardLogger`` left at Lightning's default name (``lightning_logs``) after the stage,
    the last folder of ``trainer.default_root_dir``: ``checkpoints/sft`` logs to ``<save_dir>/sft/version_N``.
    ``lit-llm`` calls it when it builds the trainer."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger.name == "lightning_logs":
            logger._name = Path(trainer.default_root_dir).name


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N`` for the matrices a token passes through (MoE: only its ``top_k``
    experts; the embedding lookup is free, a tied output head counts) plus ``6 L T d`` for attention
    scores and values. PaLM (appendix B) counts ``12 L T d``, the full score matrix; causal attention
    computes half of it, so MFU figures here are the work actually done (PaLM's count reads higher)."""
    from lit_llm.backbone.model import count_active_parameters

    c = model.config
    n_matmul = count_active_parameters(model) - model.embed_tokens.weight.numel()
    if c.tie_embeddings:
        n_matmul += model.lm_head.weight.numel()
    if model.pos_embed is not None:
        n_matmul -= model.pos_embed.weight.numel()
    return 6 * n_matmul + 6 * c.n_layer * seq_len * c.n_head * c.head_dim


class SampleCallback(Callback):
    """Every ``every_n_steps`` training steps (and after validation), write greedy samples to TensorBoard.

    The stage provides ``sample_texts() -> [(prompt, completion), ...]``.

    Args:
        every_n_steps: How often to sample during training (0 = only after validation).
    """

    def __init__(self, every_n_steps: int = 200) -> None:
        self.every_n_steps = every_n_steps

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "sample_texts") or getattr(pl_module, "tokenizer", None) is None:
            return
        if not (trainer.is_global_zero or is_sharded(pl_module)):  # sharded: every rank joins the gathering
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with gathered(pl_module):
                samples = pl_module.sample_texts()
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        text = "\n\n".join(f"**{p}** → {c}" for p, c in samples)
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_text"):
            exp.add_text("samples", text.replace("\n", "  \n"), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._log(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)


class ThroughputMonitor(Callback):
    """Log training tokens/s and, when a peak is known, model FLOPs utilisation (MFU).

    Args:
        log_every_n_steps: Average over this many steps between logs.
        peak_flops: Peak FLOP/s of one device for MFU; ``None`` looks the device up in a small table (GPUs).
    """

    PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "4090": 165e12}

    def __init__(self, log_every_n_steps: int = 20, peak_flops: float | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self._t0: float | None = None
        self._tokens = 0

    def _peak(self) -> float | None:
        if self.peak_flops is not None:
            return self.peak_flops
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            return next((v for k, v in self.PEAKS.items() if k in name), None)
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch.get("input_ids")
        if x is None:
            return
        self._tokens += x.numel()
        if (batch_idx + 1) % self.log_every_n_steps:
            return
        dt = time.perf_counter() - self._t0
        tps = self._tokens * trainer.world_size / dt
        pl_module.log("throughput/tokens_per_sec", tps, on_step=True, prog_bar=True, rank_zero_only=True)
        peak = self._peak()
        if peak and hasattr(pl_module, "model"):
            mfu = tps * flops_per_token(pl_module.model, x.shape[-1]) / (peak * trainer.world_size)
            pl_module.log("throughput/mfu", mfu, on_step=True, rank_zero_only=True)
        self._t0, self._tokens = time.perf_counter(), 0


class VisionSampleCallback(Callback):
    """After each validation, a picture grid in TensorBoard (``IMAGES`` tab, tag ``val/samples``): held-out
    images with their question, the model's greedy answer (green when right, red when wrong) and the truth.

    The stage provides ``image_samples(examples) -> [{"tiles", "question", "answer", "reply"}, ...]``
    (``SFTModule``); the examples are the first ``n`` of the DataModule's ``val_examples``.

    Args:
        n: Images in the grid.
        columns: Images per row of the grid.
        scale: Each image is enlarged this many times (nearest neighbour) so its pixels stay visible.
    """

    def __init__(self, n: int = 8, columns: int = 4, scale: int = 4) -> None:
        self.n, self.columns, self.scale = n, columns, scale

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        exp = getattr(trainer.logger, "experiment", None)
        examples = getattr(getattr(trainer, "datamodule", None), "val_examples", None)
        if trainer.sanity_checking or exp is None or not hasattr(exp, "add_image") or not examples:
            return
        if not hasattr(pl_module, "image_samples"):
            return
        if not (trainer.is_global_zero or is_sharded(pl_module)):  # sharded: every rank joins the gathering
            return
        with gathered(pl_module):
            samples = pl_module.image_samples(examples[: self.n])
        if samples and trainer.is_global_zero:
            exp.add_image(
                "val/samples",
                sample_grid(samples, self.columns, self.scale),
                trainer.global_step,
                dataformats="HWC",
            )


def sample_grid(samples: list[dict], columns: int = 4, scale: int = 4) -> Any:
    """An ``(H, W, 3)`` uint8 array: each sample's image (its last tile: the whole image, or the global
    tile of a tiled one) enlarged ``scale`` times, with the question, the reply and the truth below it."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    side = samples[0]["tiles"].shape[-1] * scale
    width, line = max(side, 200), 12
    cells = []
    for s in samples:
        picture = Image.fromarray(s["tiles"][-1].permute(1, 2, 0).numpy()).resize(
            (side, side), Image.Resampling.NEAREST
        )
        lines = textwrap.wrap(f"Q: {s['question']}", width // 6) or [""]
        right = s["reply"].strip().lower() == s["answer"].strip().lower()
        cell = Image.new("RGB", (width, side + line * (len(lines) + 2) + 6), (255, 255, 255))
        cell.paste(picture, ((width - side) // 2, 0))
        draw = ImageDraw.Draw(cell)
        y = side + 3
        for text in lines:
            draw.text((3, y), text, fill=(0, 0, 0))
            y += line
        draw.text((3, y), f"model: {s['reply']}", fill=(0, 140, 0) if right else (200, 0, 0))
        draw.text((3, y + line), f"truth: {s['answer']}", fill=(0, 0, 0))
        cells.append(cell)
    height = max(c.height for c in cells)
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * (width + 4), rows * (height + 4)), (200, 200, 200))
    for i, c in enumerate(cells):
        grid.paste(c, ((i % columns) * (width + 4), (i // columns) * (height + 4)))
    return np.asarray(grid)
