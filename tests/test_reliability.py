"""Scaling and reliability: precisions, accumulation, activation checkpointing and compile, DDP on CPU,
exact resume after SIGTERM, safe and atomic checkpoints, a NaN stopping the run."""

from __future__ import annotations

import copy
import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.checkpoint import AtomicCheckpointIO, atomic_save, load_checkpoint
from lit_llm.cli import main, run_lightning
from lit_llm.data.text import TextDataModule
from lit_llm.resumable import ResumableDataLoader, make_resumable
from lit_llm.stages import CausalLM
from lit_llm.transforms import apply_activation_checkpointing, compile_model, is_transformed

from .conftest import QUIET, ROOT

TINY = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_kv_head": 1}
SMALL = [
    "--data.tinyworld_docs",
    "200",
    "--data.seq_len",
    "64",
    "--model.model_overrides",
    str(TINY).replace("'", ""),
]
PRECISIONS = ["32-true", "bf16-mixed", "bf16-true"]


def _fit(config: str, *args: str):
    """Run ``lit-llm fit`` in this process; returns the LightningCLI (model, datamodule, trainer)."""
    return run_lightning(["fit", "--config", str(ROOT / "configs" / config), *QUIET, *args])


def _quiet_trainer(root: Path, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def _data(tmp_path, batch_size=8, **kwargs) -> TextDataModule:
    kwargs = {"tinyworld_docs": 200, "tokenizer_vocab_size": 300, **kwargs}
    dm = TextDataModule(seq_len=64, batch_size=batch_size, cache_dir=str(tmp_path / "data_cache"), **kwargs)
    return make_resumable(dm)


def _model(dm: TextDataModule, **kwargs) -> CausalLM:
    kwargs.setdefault("model_overrides", TINY)
    return CausalLM(vocab_size=dm.vocab_size, block_size=dm.seq_len, **kwargs)


# --------------------------------------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def stage_ckpts(tmp_path_factory):
    """Two-step pretrain -> SFT -> reward checkpoints (32-true), to start each stage from."""
    work = tmp_path_factory.mktemp("stages")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        two = [
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.precision",
            "32-true",
        ]
        _fit("pretrain/tiny.yaml", *two, *SMALL)
        _fit(
            "sft/tinyworld.yaml",
            *two,
            "--model.init_from",
            "checkpoints/pretrain/last.ckpt",
            "--data.tinyworld_train",
            "64",
            "--data.tinyworld_val",
            "16",
            "--data.tinyworld_eval",
            "4",
            "--data.batch_size",
            "8",
            "--data.seq_len",
            "64",
        )
        _fit(
            "reward/tinyworld.yaml",
            *two,
            "--model.init_from",
            "checkpoints/sft/last.ckpt",
            "--data.batch_size",
            "8",
            "--data.seq_len",
            "64",
        )
    finally:
        os.chdir(cwd)
    return {s: work / f"checkpoints/{s}/last.ckpt" for s in ("pretrain", "sft", "reward")}


def _stage_args(stage: str, ckpts: dict[str, Path]) -> tuple[str, list[str]]:
    two = [
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    if stage == "pretrain":
        return "pretrain/tiny.yaml", [*two, *SMALL]
    if stage == "sft":
        return "sft/tinyworld.yaml", [
            *two,
            "--model.init_from",
            str(ckpts["pretrain"]),
            "--data.tinyworld_train",
            "64",
            "--data.tinyworld_val",
            "16",
            "--data.tinyworld_eval",
            "4",
            "--data.batch_size",
            "8",
            "--data.seq_len",
            "64",
        ]
    if stage == "reward":
        return "reward/tinyworld.yaml", [
            *two,
            "--model.init_from",
            str(ckpts["sft"]),
            "--data.batch_size",
            "8",
            "--data.seq_len",
            "64",
        ]
    return "ppo/tinyworld.yaml", [
        "--trainer.limit_train_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--model.init_from",
        str(ckpts["sft"]),
        "--model.reward_model",
        str(ckpts["reward"]),
        "--data.batch_size",
        "8",
        "--data.val_prompts",
        "8",
        "--model.minibatch_size",
        "8",
        "--model.max_new_tokens",
        "4",
    ]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_stage_fits_in_every_cpu_precision(stage, precision, stage_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, args = _stage_args(stage, stage_ckpts)
    cli = _fit(config, *args, "--trainer.precision", precision)
    metrics = cli.trainer.callback_metrics
    losses = {k: float(v) for k, v in metrics.items() if k.endswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    want = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert next(cli.model.model.parameters()).dtype == want
    assert (tmp_path / f"checkpoints/{stage}/last.ckpt").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_fp16_mixed_on_gpu(stage, stage_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, args = _stage_args(stage, stage_ckpts)
    cli = _fit(config, *args, "--trainer.precision", "16-mixed", "--trainer.accelerator", "gpu")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------- accumulation, clipping
class _GradsAndWeights(Callback):
    """Records the (accumulated, unclipped) gradients before the first optimizer step and the weights after."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_accumulation_matches_the_bigger_batch(tmp_path):
    def first_step(batch_size: int, accumulate: int) -> _GradsAndWeights:
        seed_everything(0)
        dm = _data(tmp_path, batch_size=batch_size)
        rec = _GradsAndWeights()
        trainer = _quiet_trainer(
            tmp_path,
            max_steps=1,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=0.05,
            limit_val_batches=0,
            callbacks=[rec],
            precision="32-true",
            enable_checkpointing=False,
        )
        trainer.fit(_model(dm, warmup_steps=0, learning_rate=1e-2), datamodule=dm)
        return rec

    big, accumulated = first_step(8, 1), first_step(4, 2)
    for name, g in big.grads.items():  # the gradient itself (not only Adam's scale-free first step)
        torch.testing.assert_close(accumulated.grads[name], g, rtol=1e-4, atol=1e-6)
    norm = torch.cat([g.flatten() for g in big.grads.values()]).norm()
    assert norm > 0.05, "clipping must be active for this test to cover it"
    for name, w in big.weights.items():
        # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, float rounding of g shows
        torch.testing.assert_close(accumulated.weights[name], w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- activation checkpointing, compile
def _loss_and_grads(model: Transformer, x: torch.Tensor, seed: int = 0):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset,dropout", [("tiny", 0.0), ("tiny", 0.1), ("llama4-tiny", 0.0)])
def test_activation_checkpointing_gives_identical_loss_and_grads(preset, dropout):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, n_layer=2, vocab_size=97, block_size=32, dropout=dropout)
    ref = Transformer(cfg)
    ac = apply_activation_checkpointing(copy.deepcopy(ref))
    assert is_transformed(ac) == {"activation_checkpointing": True, "compile": False}
    x = torch.randint(0, 97, (3, 32))
    loss, grads = _loss_and_grads(ref, x)
    loss_ac, grads_ac = _loss_and_grads(ac, x)
    assert torch.equal(loss, loss_ac)
    for name, g in grads.items():
        assert torch.equal(g, grads_ac[name]), name
    assert ac.state_dict().keys() == ref.state_dict().keys()
    # decoding with a KV cache and evaluation are untouched
    with torch.no_grad():
        ref.eval(), ac.eval()
        torch.testing.assert_close(
            ac(x[:, :5], cache=ac.new_cache(3, 8)), ref(x[:, :5], cache=ref.new_cache(3, 8))
        )


@pytest.mark.parametrize("with_ac", [False, True])
def test_compiled_blocks_match_eager(with_ac):
    torch.manual_seed(0)
    ref = Transformer(ModelConfig.from_name("tiny", n_layer=2, vocab_size=97, block_size=32))
    model = copy.deepcopy(ref)
    if with_ac:
        apply_activation_checkpointing(model)
    compile_model(model, backend="aot_eager")  # the inductor backend is exercised in benchmarks/scaling.py
    x = torch.randint(0, 97, (2, 32))
    loss, grads = _loss_and_grads(ref, x)
    loss_c, grads_c = _loss_and_grads(model, x)
    torch.testing.assert_close(loss_c, loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="before compile"):
        apply_activation_checkpointing(compile_model(copy.deepcopy(ref), backend="eager"))


def test_stage_flags_apply_the_transforms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager"))
    cli = _fit(
        "pretrain/tiny.yaml",
        *SMALL,
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "2",
        "--trainer.precision",
        "32-true",
        "--model.compile",
        "true",
        "--model.activation_checkpointing",
        "true",
    )
    assert is_transformed(cli.model.model) == {"activation_checkpointing": True, "compile": True}
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    state = load_checkpoint(tmp_path / "checkpoints/pretrain/last.ckpt")["state_dict"]
    assert (
        state.keys()
        == CausalLM(model_overrides=TINY, vocab_size=cli.model.config.vocab_size).state_dict().keys()
    )


# ------------------------------------------------------------------------------------ safe checkpoints
@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("good")
    dm = _data(work)
    trainer = _quiet_trainer(
        work,
        max_steps=2,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=work / "ckpt", save_last=True)],
    )
    trainer.fit(_model(dm), datamodule=dm)
    return work / "ckpt/last.ckpt"


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused(good_ckpt, tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = load_checkpoint(good_ckpt)
    ckpt["callbacks"] = {"evil": _Evil(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(ValueError, match=r"refusing to load checkpoint .*evil.ckpt: .*pickled Python object"):
        load_checkpoint(evil)
    with pytest.raises(ValueError, match="refusing to load"):  # the helpers (generate, chat, init_from)
        main(["generate", "--ckpt", str(evil), "--prompt", "Alice"])
    dm = _data(tmp_path)
    with pytest.raises(ValueError, match="refusing to load"):  # resuming or validating through Lightning
        _quiet_trainer(tmp_path, limit_val_batches=1, plugins=[AtomicCheckpointIO()]).validate(
            _model(dm), datamodule=dm, ckpt_path=str(evil)
        )
    assert not marker.exists()


def test_checkpoint_with_another_tokenizer_is_refused(good_ckpt, tmp_path):
    dm = _data(tmp_path, tinyworld_docs=300)  # a BPE of the same size trained on other text
    assert dm.vocab_size == load_checkpoint(good_ckpt)["lit_llm"]["model_config"]["vocab_size"]
    assert dm.tokenizer.to_str() != load_checkpoint(good_ckpt)["lit_llm"]["tokenizer"]
    with pytest.raises(ValueError, match="different tokenizer"):
        _quiet_trainer(tmp_path, limit_val_batches=1).validate(
            _model(dm), datamodule=dm, ckpt_path=str(good_ckpt)
        )


def test_atomic_save_survives_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        OSError, match=r"disk full .* while writing checkpoint .*last.ckpt.*previous checkpoint"
    ) as info:
        atomic_save({"w": torch.zeros(3)}, target)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left


def test_full_disk_during_training_keeps_the_good_checkpoint(good_ckpt, tmp_path, monkeypatch):
    folder = good_ckpt.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "last.ckpt" in before

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    dm = _data(tmp_path)
    trainer = _quiet_trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)],
    )
    with pytest.raises(OSError, match=rf"disk full .* writing checkpoint {folder}.*\.ckpt"):
        trainer.fit(_model(dm, learning_rate=0.1), datamodule=dm)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing replaced, no temp files
    assert load_checkpoint(good_ckpt)["global_step"] == 2


def test_cli_writes_checkpoints_atomically_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        *SMALL,
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.precision",
        "32-true",
    ]
    cli = _fit("pretrain/tiny.yaml", *args)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(cli.trainer.train_dataloader, ResumableDataLoader)
    cli = _fit(
        "pretrain/tiny.yaml", *args, "--trainer.plugins", "lightning.pytorch.plugins.io.TorchCheckpointIO"
    )
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"  # the user's choice wins


# -------------------------------------------------------------------------------------------- NaN loss
class _PoisonAt(Callback):
    """Sets one weight to NaN before training step ``step`` (so the loss of that step is NaN)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.norm.weight[0] = float("nan")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    dm = _data(tmp_path)
    folder = tmp_path / "ckpt"
    trainer = _quiet_trainer(
        tmp_path,
        max_steps=10,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True), _PoisonAt(5)],
    )
    with pytest.raises(FloatingPointError, match=r"pretrain: loss is nan .* at step 5; stopping"):
        trainer.fit(_model(dm), datamodule=dm)
    last = load_checkpoint(folder / "last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


# ------------------------------------------------------------------------------ resumable data loader
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_continues_where_it_stopped(num_workers):
    data = list(range(50))
    kw = {"batch_size": 4, "shuffle": True, "seed": 3, "drop_last": True, "num_workers": num_workers}
    first = ResumableDataLoader(data, **kw)
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(5)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["samples"] == 20
    rng = torch.get_rng_state()
    rest = [b.tolist() for b in it]
    assert torch.equal(torch.get_rng_state(), rng)  # never draws from the global RNG
    second = ResumableDataLoader(data, **kw)
    second.load_state_dict(state)
    second.sampler.set_epoch(1)
    assert len(second) == len(first) == 12  # Lightning counts the full epoch
    assert [b.tolist() for b in second] == rest and len(seen) + len(rest) == 12
    assert [b.tolist() for b in second] == [*seen, *rest]  # the next epoch-1 pass is whole again


def test_resumable_sampler_splits_global_batches_over_ranks():
    from lit_llm.resumable import ResumableSampler

    data = list(range(40))
    single = list(ResumableDataLoader(data, batch_size=8, shuffle=True, seed=0))
    ranks = [
        list(ResumableDataLoader(data, 4, sampler=ResumableSampler(data, True, 0, 2, r))) for r in (0, 1)
    ]
    for step, batch in enumerate(single):  # one process with batch 8 = two ranks with batch 4, as sets
        assert sorted(batch.tolist()) == sorted(ranks[0][step].tolist() + ranks[1][step].tolist())


# ------------------------------------------------------------------------ real processes: DDP, resume
def _write_config(path: Path, **overrides) -> Path:
    """A self-contained pretraining config for the subprocess tests (CSV logs, checkpoints every 5 steps)."""
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 30,
        "precision": "32-true",
        "log_every_n_steps": 1,
        "limit_val_batches": 0,
        "check_val_every_n_epoch": None,
        "gradient_clip_val": 1.0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": "run",
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": "ckpt",
                    "every_n_train_steps": 5,
                    "save_last": True,
                    "save_top_k": -1,
                },
            }
        ],
    }
    trainer.update(overrides.pop("trainer", {}))
    model = {
        "preset": "tiny",
        "model_overrides": {**TINY, "dropout": 0.1},
        "learning_rate": 0.003,
        "warmup_steps": 5,
    }
    data = {"source": "tinyworld", "tinyworld_docs": 200, "seq_len": 64, "batch_size": 16}
    data.update(overrides.pop("data", {}))
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "lit_llm.stages.CausalLM", "init_args": model},
        "data": {"class_path": "lit_llm.data.text.TextDataModule", "init_args": data},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    return env


def _lit_llm(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lit_llm", "fit", *args]
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _train_losses(metrics_csv: Path) -> dict[int, float]:
    """``step -> train/loss`` from a CSVLogger file (steps counted from 1, as in ``global_step`` after it)."""
    with open(metrics_csv) as f:
        return {int(r["step"]) + 1: float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


class PauseAt(Callback):
    """Test helper for the subprocess runs: after step ``step`` write ``marker`` and wait to be killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_sigterm_continues_exactly(tmp_path):
    """Kill a real ``lit-llm fit`` with SIGTERM mid-epoch, resume from last.ckpt: every later step's loss is
    what the uninterrupted run logged (same batches, same dropout masks, same optimizer state)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    # 307 sequences / 16 = 19 batches per epoch: 30 steps cross an epoch boundary after the resume point
    cfg = _write_config(tmp_path / "cfg.yaml")
    _lit_llm(tmp_path / "full", "--config", str(cfg))
    full = _train_losses(tmp_path / "full/logs/lightning_logs/version_0/metrics.csv")
    assert len(full) == 30

    marker = tmp_path / "killed/paused"
    pause = {"class_path": "tests.test_reliability.PauseAt", "init_args": {"step": 12, "marker": str(marker)}}
    killed_cfg = _write_config(tmp_path / "killed.yaml")
    cfg_dict = yaml.safe_load(killed_cfg.read_text())
    cfg_dict["trainer"]["callbacks"].append(pause)
    killed_cfg.write_text(yaml.safe_dump(cfg_dict))
    cmd = [sys.executable, "-m", "lit_llm", "fit", "--config", str(killed_cfg)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path / "killed", env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the pause step"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err.decode()[-3000:]  # 128 + SIGTERM: stopped, not finished
    assert "stopped by SIGTERM at step 12" in err.decode()
    last = load_checkpoint(tmp_path / "killed/ckpt/last.ckpt")
    assert last["global_step"] == 10  # the periodic checkpoint before the kill; steps 11-12 are lost
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples"] == 10 * 16

    _lit_llm(tmp_path / "killed", "--config", str(cfg), "--ckpt_path", "ckpt/last.ckpt")
    before = _train_losses(tmp_path / "killed/logs/lightning_logs/version_0/metrics.csv")
    after = _train_losses(tmp_path / "killed/logs/lightning_logs/version_1/metrics.csv")
    assert sorted(after) == list(range(11, 31))
    for step in range(1, 13):
        assert before[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    for step in range(11, 31):
        assert after[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, after[step], full[step])
    final_full = load_checkpoint(tmp_path / "full/ckpt/last.ckpt")["state_dict"]
    final_resumed = load_checkpoint(tmp_path / "killed/ckpt/last.ckpt")["state_dict"]
    for name, w in final_full.items():
        torch.testing.assert_close(final_resumed[name], w, rtol=1e-5, atol=1e-6)


class RecordingCheckpointIO(AtomicCheckpointIO):
    """Test helper: AtomicCheckpointIO that appends ``rank path`` to ``io_calls.txt`` for every save."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open("io_calls.txt", "a") as f:
            f.write(f"{rank} {path}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """DDP (gloo, 2 processes, batch 4 each) trains exactly like 1 process with batch 8: the resumable loader
    splits every global batch over the ranks like DistributedSampler, so both see the same samples."""
    steps = 4
    trainer = {
        "max_steps": steps,
        "limit_val_batches": 2,
        "val_check_interval": steps,
        "num_sanity_val_steps": 0,
        "plugins": [{"class_path": "tests.test_reliability.RecordingCheckpointIO"}],
    }
    model_fix = {"dropout": 0.0}
    runs = {}
    for name, devices, batch in (("single", 1, 8), ("ddp", 2, 4)):
        (tmp_path / name).mkdir()
        cfg = _write_config(tmp_path / f"{name}.yaml", trainer=dict(trainer), data={"batch_size": batch})
        d = yaml.safe_load(cfg.read_text())
        d["model"]["init_args"]["model_overrides"].update(model_fix)
        cfg.write_text(yaml.safe_dump(d))
        extra = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
        _lit_llm(tmp_path / name, "--config", str(cfg), *extra)
        runs[name] = tmp_path / name

    def val_loss(run: Path) -> float:
        with open(run / "logs/lightning_logs/version_0/metrics.csv") as f:
            return next(float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss"))

    assert val_loss(runs["ddp"]) == pytest.approx(val_loss(runs["single"]), rel=1e-5)
    single = load_checkpoint(runs["single"] / "ckpt/last.ckpt")
    ddp = load_checkpoint(runs["ddp"] / "ckpt/last.ckpt")
    assert single["global_step"] == ddp["global_step"] == steps
    for name, w in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], w, rtol=1e-4, atol=1e-5)
    # only rank 0 wrote checkpoints, only rank 0 logged
    calls = (runs["ddp"] / "io_calls.txt").read_text().split("\n")
    assert {c.split()[0] for c in calls if c} == {"0"}
    assert os.listdir(runs["ddp"] / "logs/lightning_logs") == ["version_0"]


def test_fsdp_config_builds_the_sharded_strategy(monkeypatch, tmp_path):
    """The shipped FSDP config yields lit_llm's FSDP2 strategy: one data-parallel shard per process on
    whatever accelerator there is (it runs on CPU: tests/test_distributed.py)."""
    from lit_llm.cli import LitLLMCLI
    from lit_llm.strategies import FSDP2Strategy

    monkeypatch.chdir(tmp_path)
    seen = {}

    def capture(self, **kwargs):
        seen["trainer"] = self._get(self.config_init, "trainer")
        raise SystemExit(0)

    monkeypatch.setattr(LitLLMCLI, "instantiate_trainer", capture)
    with pytest.raises(SystemExit):
        run_lightning(
            ["fit", "--config", str(ROOT / "configs/pretrain/tiny-fsdp.yaml"), "--data.tinyworld_docs", "200"]
        )
    strategy = seen["trainer"]["strategy"]
    assert isinstance(strategy, FSDP2Strategy) and strategy._save_distributed_checkpoint
    assert seen["trainer"]["accelerator"] == "auto"
