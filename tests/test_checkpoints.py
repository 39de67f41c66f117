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


# ------------------------------------------------------------------ frozen reference and reward model
def _nbytes(state: dict[str, torch.Tensor], prefix: str = "") -> int:
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))


def _dpo_dm(sft_ckpt):
    from lit_llm.data.preference import PreferenceDataModule
    from lit_llm.resumable import make_resumable

    dm = PreferenceDataModule(
        tokenizer=str(sft_ckpt),
        pairs_for="dpo",
        seq_len=128,
        tinyworld_train=64,
        tinyworld_val=16,
        tinyworld_eval=0,
        batch_size=8,
    )
    return make_resumable(dm)


def _fit_dpo(tmp_path, sft_ckpt, ckpt_path=None, max_steps=4, **kw):
    """DPO for ``max_steps`` (from ``ckpt_path`` when given), a checkpoint every 2 steps in ``tmp_path``;
    the module and the training loss of every step it ran."""
    from lightning import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_llm.stages.dpo import DPOModule

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    module = DPOModule(init_from=str(sft_ckpt), learning_rate=1e-3, warmup_steps=1, **kw)
    trainer = Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        precision="32-true",
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            Record(),
            ModelCheckpoint(
                tmp_path, "step{step}", every_n_train_steps=2, save_top_k=-1, auto_insert_metric_name=False
            ),
        ],
    )
    trainer.fit(module, datamodule=_dpo_dm(sft_ckpt), ckpt_path=ckpt_path)
    return module, losses


def test_dpo_checkpoint_stores_the_policy_once_and_resumes_with_identical_losses(sft_ckpt, tmp_path):
    from lit_llm.checkpoint import META_KEY, load_backbone, load_checkpoint
    from lit_llm.lora import base_fingerprint

    module, full = _fit_dpo(tmp_path / "full", sft_ckpt)
    ckpt = load_checkpoint(tmp_path / "full/step2.ckpt")
    state = ckpt["state_dict"]
    assert not [k for k in state if k.startswith("ref.")]
    policy_bytes = sum(p.numel() * p.element_size() for p in module.model.state_dict().values())
    ref_bytes = sum(p.numel() * p.element_size() for p in module.ref.state_dict().values())
    assert _nbytes(state) == _nbytes(state, "model.") == policy_bytes == ref_bytes  # half of the 2x before
    frozen = ckpt[META_KEY]["frozen"]
    assert frozen == {
        "ref": {"path": str(sft_ckpt.resolve()), "sha256": base_fingerprint(load_backbone(sft_ckpt)[0])}
    }
    # resumed from step 2 (a new run rebuilds the reference from init_from): steps 3 and 4 as the full run's
    resumed, after = _fit_dpo(tmp_path / "resumed", sft_ckpt, ckpt_path=str(tmp_path / "full/step2.ckpt"))
    assert len(full) == 4 and after == full[2:]
    for (name, a), b in zip(module.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # the next stages read it as before: lit-llm export / generate load the policy
    policy, _, _ = load_backbone(tmp_path / "full/step4.ckpt")
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(v, module.model.state_dict()[k], rtol=0, atol=0)


def test_a_checkpoint_whose_reference_file_changed_is_refused(sft_ckpt, tmp_path):
    import shutil

    from lit_llm.checkpoint import load_checkpoint
    from lit_llm.errors import CheckpointError

    ref = tmp_path / "ref.ckpt"
    shutil.copy(sft_ckpt, ref)
    _fit_dpo(tmp_path / "run", sft_ckpt, max_steps=2, ref_from=str(ref))
    saved = load_checkpoint(tmp_path / "run/step2.ckpt")["lit_llm"]["frozen"]["ref"]
    assert saved["path"] == str(ref.resolve())
    # the reference file is replaced by other weights (retrained, another run's output)
    other = torch.load(ref, weights_only=False)
    other["state_dict"]["model.norm.weight"] += 0.5
    torch.save(other, ref)
    with pytest.raises(CheckpointError) as err:
        _fit_dpo(tmp_path / "again", sft_ckpt, ckpt_path=str(tmp_path / "run/step2.ckpt"), ref_from=str(ref))
    msg = str(err.value)
    assert str(ref.resolve()) in msg and saved["sha256"][:12] in msg, msg
    from lit_llm.checkpoint import load_backbone
    from lit_llm.lora import base_fingerprint

    assert base_fingerprint(load_backbone(ref)[0])[:12] in msg, msg


def _rl_checkpoint(module, fit_rl, records, path):
    trainer, _ = fit_rl(module, records)
    trainer.save_checkpoint(path)
    from lit_llm.checkpoint import load_checkpoint

    return load_checkpoint(path)


RECORDS = [
    {"prompt": p} for p in ["Where is the cat?", "Who has the apple?", "What is in the box?", "Where is Tom?"]
]


def test_ppo_and_grpo_checkpoints_hold_what_trains_and_load_back(rl_ckpts, fit_rl, tmp_path):
    from lit_llm.stages import PPOModule
    from lit_llm.stages.grpo import GRPOModule

    def ppo():
        return PPOModule(init_from=rl_ckpts["sft"], reward_model=rl_ckpts["reward"], max_new_tokens=4)

    def grpo():
        return GRPOModule(
            init_from=rl_ckpts["sft"], reward_model=rl_ckpts["reward"], max_new_tokens=4, group_size=2
        )

    for build, trained in ((ppo, {"model", "critic"}), (grpo, {"model"})):
        torch.manual_seed(0)
        module = build()
        ckpt = _rl_checkpoint(module, fit_rl, RECORDS, tmp_path / "rl.ckpt")
        state = ckpt["state_dict"]
        assert {k.split(".")[0] for k in state} == trained
        assert set(ckpt["lit_llm"]["frozen"]) == {"ref", "rm"}
        full = module.state_dict()
        assert _nbytes(full) - _nbytes(state) == _nbytes(full, "ref.") + _nbytes(full, "rm.")
        # what a resume does: rebuild, check, put the frozen weights back, load strictly
        again = build()
        again.on_load_checkpoint(ckpt)
        again.load_state_dict(ckpt["state_dict"], strict=True)
        for k, v in again.state_dict().items():
            torch.testing.assert_close(v, full[k], rtol=0, atol=0, msg=k)
