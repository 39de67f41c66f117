"""Several processes on one CPU (gloo): the sharded strategy (FSDP2) against DDP and one process, its
checkpoints (folders of shards: saved, resumed bit-exactly, resharded onto another world size, gathered
into one file), and the stages under both strategies.

Every run is a real ``lit-llm fit`` in a subprocess (Lightning launches the second process itself), with
dropout off and fp32, so that 2 processes with batch ``b`` and 1 process with batch ``2 b`` take the same
steps up to float summation order.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from lit_llm.checkpoint import is_sharded_checkpoint, load_backbone, load_checkpoint
from tests.test_reliability import _lit_llm, _write_config

FSDP2 = {"class_path": "lit_llm.strategies.FSDP2Strategy"}


def _pretrain_config(path: Path, devices: int, batch: int, strategy=None, **trainer) -> Path:
    settings = {
        "devices": devices,
        "max_steps": 4,
        "limit_val_batches": 2,
        "val_check_interval": 4,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": None,  # clipping is tested under DDP; FSDP2 clips DTensors the same way
        **trainer,
    }
    if strategy is not None:
        settings["strategy"] = strategy
    cfg = _write_config(path, trainer=settings, data={"batch_size": batch})
    d = yaml.safe_load(cfg.read_text())
    d["model"]["init_args"]["model_overrides"].update(dropout=0.0, n_layer=2)  # two FSDP units + the root
    # checkpoints every 2 steps, all kept: step 2 is the resume point
    d["trainer"]["callbacks"][0]["init_args"].update(
        every_n_train_steps=2, filename="step{step}", auto_insert_metric_name=False
    )
    cfg.write_text(yaml.safe_dump(d))
    return cfg


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["state_dict"]


def _val_loss(run: Path) -> float:
    with open(run / "logs/lightning_logs/version_0/metrics.csv") as f:
        return next(float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss"))


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_trains_saves_resumes_and_gathers(tmp_path):
    """FSDP2 on 2 gloo processes (batch 4 each) reaches the weights of 1 process with batch 8; its checkpoint
    is a folder of shards that resumes bit-exactly on 2 processes, reshards onto 1, and gathers into the one
    file that generate / export / init_from read."""
    runs = {}
    for name, devices, batch, strategy in (("single", 1, 8, None), ("fsdp", 2, 4, FSDP2)):
        (tmp_path / name).mkdir()
        cfg = _pretrain_config(tmp_path / f"{name}.yaml", devices, batch, strategy)
        _lit_llm(tmp_path / name, "--config", str(cfg))
        runs[name] = tmp_path / name
    single, fsdp = tmp_path / "single/ckpt", tmp_path / "fsdp/ckpt"
    assert is_sharded_checkpoint(fsdp / "step4.ckpt") and not (fsdp / "step4.ckpt.partial").exists()
    assert sorted(p.name for p in (fsdp / "step4.ckpt").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # one shard per process
    assert _val_loss(runs["fsdp"]) == pytest.approx(_val_loss(runs["single"]), rel=1e-5)
    want = _weights(single / "last.ckpt")
    got = _weights(fsdp / "last.ckpt")  # gathered from the shards
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5)
    # each shard holds half of a weight matrix (FSDP2 splits dim 0)
    shard_bytes = sum(p.stat().st_size for p in (fsdp / "step4.ckpt").glob("__0_*.distcp"))
    whole_bytes = sum(w.numel() * w.element_size() for w in got.values())
    assert shard_bytes < 0.75 * (3 * whole_bytes)  # weights + 2 AdamW moments, about half on each rank

    # resume from the step-2 folder on 2 processes: the same weights as the uninterrupted run, bit for bit
    (tmp_path / "resumed").mkdir()
    cfg = _pretrain_config(tmp_path / "resumed.yaml", 2, 4, FSDP2)
    _lit_llm(tmp_path / "resumed", "--config", str(cfg), "--ckpt_path", str(fsdp / "step2.ckpt"))
    resumed = _weights(tmp_path / "resumed/ckpt/last.ckpt")
    for name, w in got.items():
        assert torch.equal(resumed[name], w), name
    assert load_checkpoint(tmp_path / "resumed/ckpt/last.ckpt")["global_step"] == 4

    # the same folder on 1 process (batch 8: the same global batch): the shards are re-split on load
    (tmp_path / "one").mkdir()
    cfg = _pretrain_config(tmp_path / "one.yaml", 1, 8, FSDP2)
    _lit_llm(tmp_path / "one", "--config", str(cfg), "--ckpt_path", str(fsdp / "step2.ckpt"))
    for name, w in _weights(tmp_path / "one/ckpt/last.ckpt").items():
        torch.testing.assert_close(w, got[name], rtol=1e-4, atol=1e-5)

    # gathered into one file, and read directly: the same backbone
    from lit_llm.cli.export import main as export

    export(["--ckpt", str(fsdp / "last.ckpt"), "--format", "ckpt", "--out", str(tmp_path / "whole.ckpt")])
    whole = torch.load(tmp_path / "whole.ckpt", weights_only=True)
    assert "optimizer_states" not in whole and whole["lit_llm"]["stage"] == "pretrain"
    from_file, tok, _ = load_backbone(tmp_path / "whole.ckpt")
    from_folder, _, _ = load_backbone(fsdp / "last.ckpt")
    for (n, a), (_, b) in zip(from_file.state_dict().items(), from_folder.state_dict().items()):
        assert torch.equal(a, b), n
    assert from_file.config.n_layer == 2 and tok.vocab_size == from_file.config.vocab_size


def test_a_sharded_folder_resumed_without_the_sharded_strategy_is_refused(tmp_path):
    """Resuming a folder of shards with another strategy names the strategy that reads it."""
    from lit_llm.checkpoint import AtomicCheckpointIO
    from lit_llm.errors import CheckpointError

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    torch.save({"lit_llm": {}}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match="FSDP2Strategy.*export --format ckpt"):
        AtomicCheckpointIO().load_checkpoint(folder)
