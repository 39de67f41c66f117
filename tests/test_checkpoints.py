"""Checkpoints: StageCheckpoint on Lightning's public interface (auto monitor, only last.ckpt when nothing
ranks, a stable state key for --ckpt_path), and stages that store only what trains (the frozen reference and
reward model are named by path and weight hash, rebuilt and checked on resume)."""

from __future__ import annotations

import pytest
import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader

from lit_llm.callbacks import StageCheckpoint


class _Logs(LightningModule):
    """A one-weight module whose validation logs ``metric`` with the values ``values`` in turn."""

    def __init__(self, metric: str | None, values: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.metric, self.values, self.n_val = metric, values, 0

    def training_step(self, batch, batch_idx):
        return (self.w - batch.float().mean()).square().sum()

    def validation_step(self, batch, batch_idx):
        if self.metric is not None:
            self.log(self.metric, self.values[min(self.n_val, len(self.values) - 1)])
        self.log("val/other", 1.0)

    def on_validation_epoch_end(self):
        self.n_val += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, module, ckpt, max_steps=6, ckpt_path=None):
    trainer = Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[ckpt],
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(torch.arange(64), batch_size=4)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data, ckpt_path=ckpt_path)
    return sorted(p.name for p in tmp_path.glob("*.ckpt"))


@pytest.mark.parametrize(
    "metric, values, best, mode",
    [
        ("val/acc", [0.2, 0.9, 0.5], "step4.ckpt", "max"),  # higher is better
        ("val/loss", [0.2, 0.9, 0.5], "step2.ckpt", "min"),  # lower is better
    ],
)
def test_auto_monitor_keeps_the_best_by_the_metric_the_stage_logs(tmp_path, metric, values, best, mode):
    ckpt = StageCheckpoint()
    assert _fit(tmp_path, _Logs(metric, values), ckpt) == sorted([best, "last.ckpt"])
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k) == (metric, mode, 1)
    assert ckpt.best_model_path.endswith(best) and ckpt.dirpath == str(tmp_path.resolve())


def test_a_stage_that_logs_neither_keeps_only_last(tmp_path):
    ckpt = StageCheckpoint()
    assert _fit(tmp_path, _Logs(None, [0.0]), ckpt) == ["last.ckpt"]
    assert ckpt.monitor is None
    # a named monitor, or auto_monitor off, behaves as ModelCheckpoint
    named = StageCheckpoint(monitor="val/other", mode="max")
    named.resolve_monitor({"val/acc": 1.0})
    assert (named.monitor, named.mode, named.save_top_k) == ("val/other", "max", 1)
    off = StageCheckpoint(auto_monitor=False)
    assert not off.resolve_monitor({"val/acc": 1.0}) and off.monitor is None and off.save_top_k == 1


def test_state_key_is_stable_and_resume_restores_the_ranking(tmp_path):
    first = StageCheckpoint()
    key = first.state_key
    _fit(tmp_path, _Logs("val/acc", [0.2, 0.9]), first, max_steps=4)
    assert first.state_key == key  # unchanged by resolving "auto"
    # the key ModelCheckpoint would build for monitor/mode "auto" (checkpoints written before keep restoring)
    assert key == (
        "StageCheckpoint{'monitor': 'auto', 'mode': 'auto', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
        "'train_time_interval': None}"
    )
    stored = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert list(stored) == [key] and stored[key]["monitor"] == "val/acc"
    resumed = StageCheckpoint()
    # the resumed run logs a worse val/acc: the best (step 4) is kept, not replaced by a fresh ranking
    _fit(tmp_path, _Logs("val/acc", [0.1]), resumed, max_steps=6, ckpt_path=str(tmp_path / "last.ckpt"))
    assert (resumed.monitor, resumed.mode) == ("val/acc", "max")
    assert resumed.best_model_path.endswith("step4.ckpt") and float(
        resumed.best_model_score
    ) == pytest.approx(0.9)
    assert StageCheckpoint(every_n_train_steps=5).state_key != key
