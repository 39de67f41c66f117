"""Several processes on one CPU (gloo): the sharded strategy (FSDP2) against DDP and one process, its
checkpoints (folders of shards: saved, resumed bit-exactly, resharded onto another world size, gathered
into one file), and the stages under both strategies.

Every run is a real ``lit-llm fit`` in a subprocess (Lightning launches the second process itself), with
dropout off and fp32, so that 2 processes with batch ``b`` and 1 process with batch ``2 b`` take the same
steps up to float summation order.
"""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback

from lit_llm.checkpoint import is_sharded_checkpoint, load_backbone, load_checkpoint
from tests.test_reliability import ROOT, _lit_llm, _write_config

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


@pytest.mark.slow
def test_fsdp2_composes_with_activation_checkpointing_and_compile(tmp_path, monkeypatch):
    """FSDP2 over blocks that are checkpointed and compiled (2 processes, batch 4 each) takes the steps of one
    eager process with batch 8; the compiler really ran (its cache is filled)."""
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # the subprocesses inherit it
    runs = {}
    for name, devices, batch, strategy in (("single", 1, 8, None), ("fsdp", 2, 4, FSDP2)):
        (tmp_path / name).mkdir()
        cfg = _pretrain_config(tmp_path / f"{name}.yaml", devices, batch, strategy)
        if name == "fsdp":
            d = yaml.safe_load(cfg.read_text())
            d["model"]["init_args"].update(activation_checkpointing=True, compile=True)
            cfg.write_text(yaml.safe_dump(d))
        _lit_llm(tmp_path / name, "--config", str(cfg))
        runs[name] = tmp_path / name
    assert cache.exists() and any(p.is_file() for p in cache.rglob("*"))
    got = load_checkpoint(tmp_path / "fsdp/ckpt/last.ckpt")
    assert got["hyper_parameters"]["compile"] and got["hyper_parameters"]["activation_checkpointing"]
    assert _val_loss(runs["fsdp"]) == pytest.approx(_val_loss(runs["single"]), rel=1e-5)
    for name, w in _weights(tmp_path / "single/ckpt/last.ckpt").items():
        torch.testing.assert_close(got["state_dict"][name], w, rtol=1e-4, atol=2e-5, msg=name)


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


# ------------------------------------------------------------------------------------------ every stage
QUIET = [
    "--seed_everything",
    "0",
    "--trainer.accelerator",
    "cpu",
    "--trainer.precision",
    "32-true",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.num_sanity_val_steps",
    "0",
]
# per stage: its config, the settings of a short run, and the per-process batch of the 2-process runs
STAGES = {
    "sft": (
        "sft/tinyworld.yaml",
        [
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.val_check_interval",
            "3",
            "--data.tinyworld_train",
            "96",
            "--data.tinyworld_val",
            "16",
            "--data.tinyworld_eval",
            "4",
        ],
        4,
    ),
    "reward": (
        "reward/tinyworld.yaml",
        [
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.val_check_interval",
            "3",
            "--data.tinyworld_train",
            "96",
            "--data.tinyworld_val",
            "16",
        ],
        4,
    ),
    "dpo": (
        "dpo/tinyworld.yaml",
        [
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.val_check_interval",
            "3",
            "--data.tinyworld_train",
            "96",
            "--data.tinyworld_val",
            "16",
            "--data.tinyworld_eval",
            "4",
        ],
        4,
    ),
}
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp2": ["--trainer.strategy", "fsdp2"],
}


def _fit(cwd: Path, *args: str) -> None:
    _lit_llm(cwd, *QUIET, *args, timeout=600)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A tiny pretrained model, its SFT policy and a reward model, trained in one process (no dropout)."""
    root = tmp_path_factory.mktemp("chain")
    from lit_llm.cli.pipeline import FAST

    _fit(
        root,
        "--config",
        str(ROOT / "configs/pretrain/tiny.yaml"),
        *FAST["pretrain"],
        "--model.model_overrides",
        "{n_layer: 2, n_embd: 64, n_head: 2, n_kv_head: 1, dropout: 0.0}",
        "--trainer.max_steps",
        "10",
    )
    _fit(root, "--config", str(ROOT / "configs/sft/tinyworld.yaml"), *FAST["sft"], "--trainer.max_steps", "5")
    _fit(
        root,
        "--config",
        str(ROOT / "configs/reward/tinyworld.yaml"),
        *FAST["reward"],
        "--trainer.max_steps",
        "3",
    )
    return root


def _single_ddp_fsdp2(tmp_path: Path, args: list[str], batch: int) -> dict[str, dict]:
    """``lit-llm fit args`` on 1 process with batch ``2 batch`` and on 2 processes with ``batch`` each, under
    DDP and FSDP2 (the same global batch): ``{"single" | "ddp" | "fsdp2": last checkpoint}``."""
    runs = {}
    for name, devices, strategy in (
        ("single", 1, []),
        ("ddp", 2, STRATEGIES["ddp"]),
        ("fsdp2", 2, STRATEGIES["fsdp2"]),
    ):
        out = tmp_path / "out" / name
        size = ["--data.batch_size", str(batch * (3 - devices))]
        _fit(
            tmp_path,
            *args,
            "--trainer.devices",
            str(devices),
            *strategy,
            *size,
            "--trainer.default_root_dir",
            str(out),
        )
        runs[name] = load_checkpoint(out / "last.ckpt")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_on_two_processes_matches_one_under_ddp_and_fsdp2(chain, tmp_path, stage):
    """SFT, reward model and DPO on 2 processes (batch b each), under DDP and under FSDP2, reach the weights
    of 1 process with batch 2b: both strategies split the data and reduce the gradients as the math says."""
    config, settings, batch = STAGES[stage]
    common = ["--config", str(ROOT / "configs" / config), *settings]
    for name in ("checkpoints", "data_cache"):
        (tmp_path / name).symlink_to(chain / name)
    runs = _single_ddp_fsdp2(tmp_path, common, batch)
    want = runs["single"]["state_dict"]
    trained = [k for k in want if not k.startswith(("ref.", "rm."))]
    for name in ("ddp", "fsdp2"):
        got = runs[name]["state_dict"]
        assert runs[name]["global_step"] == 3
        for (
            k
        ) in trained:  # the gradients are averaged in another order: Adam's first steps magnify it to ~2e-5
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=5e-5), (
                name,
                k,
                (got[k] - want[k]).abs().max(),
            )
    for k in trained:  # both strategies sum the same gradients in the same order
        assert torch.allclose(runs["fsdp2"]["state_dict"][k], runs["ddp"]["state_dict"][k], atol=1e-6), k
    moved = max(
        (
            runs["single"]["state_dict"][k]
            - load_checkpoint(chain / "checkpoints/sft/last.ckpt")["state_dict"].get(k, want[k])
        )
        .abs()
        .max()
        for k in trained
        if k.startswith("model.")
    )
    assert moved > 1e-4  # the steps changed the weights: equal results are not equal starting points


@pytest.mark.slow
def test_lora_sft_of_a_hugging_face_model_on_two_processes_matches_one(tmp_path):
    """A real-format model (a tiny random Llama folder written by transformers, its own tokenizer and chat
    template) fine-tuned with LoRA on 2 processes, under DDP and under FSDP2 (the frozen base sharded with the
    adapters), reaches the adapters of 1 process with the same global batch."""
    pytest.importorskip("transformers")
    from tests.hf_fixtures import make_hf_llama

    folder = make_hf_llama(tmp_path / "hf", "llama3")
    config = ROOT / "configs/sft/smollm2-tinyworld.yaml"
    args = ["--config", str(config), "--model.init_from", str(folder), "--trainer.precision", "32-true"]
    runs = _single_ddp_fsdp2(tmp_path, [*args, *STAGES["sft"][1]], 4)
    want = runs["single"]["state_dict"]
    adapters = [k for k in want if "lora" in k]
    assert adapters and len(adapters) == len(want)  # the single file holds the adapters only
    for name in ("ddp", "fsdp2"):
        got = runs[name]["state_dict"]
        assert runs[name]["global_step"] == 3
        for k in adapters:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=5e-5), (
                name,
                k,
                (got[k] - want[k]).abs().max(),
            )
    assert max(want[k].abs().max() for k in adapters if "lora_b" in k.lower()) > 1e-5  # B left zero: trained


@pytest.mark.slow
def test_muon_under_ddp_and_fsdp2_updates_like_one_process(tmp_path):
    """Muon orthogonalises whole matrices: under FSDP2 each rank holds only some rows of a matrix, so it
    gathers the momentum, orthogonalises the whole (as every DDP rank does) and keeps its rows. All three
    reach the same weights after 4 steps; orthogonalising the local rows alone would not."""
    runs = {}
    for name, devices, batch, strategy in (
        ("single", 1, 8, None),
        ("ddp", 2, 4, "ddp"),
        ("fsdp2", 2, 4, "fsdp2"),
    ):
        (tmp_path / name).mkdir()
        cfg = _pretrain_config(tmp_path / f"{name}.yaml", devices, batch, strategy)
        _lit_llm(tmp_path / name, "--config", str(cfg), "--model.optimizer", "muon")
        runs[name] = _weights(tmp_path / name / "ckpt/last.ckpt")
    start = _weights(tmp_path / "single/ckpt/step2.ckpt")
    for k, w in runs["ddp"].items():  # FSDP2's gathered-matrix Muon is DDP's update (measured: bit-identical)
        assert torch.allclose(runs["fsdp2"][k], w, atol=1e-6), (k, (runs["fsdp2"][k] - w).abs().max())
    for k, w in runs["single"].items():
        # Newton-Schulz runs in bfloat16: the last-bit differences of a gradient averaged over 2 ranks flip
        # roundings there (measured 4e-4 after 4 steps, for a step-2-to-4 movement of 5e-3)
        assert torch.allclose(runs["ddp"][k], w, atol=2e-3), (k, (runs["ddp"][k] - w).abs().max())
    q = "model.layers.0.attn.q_proj.weight"
    assert (runs["single"][q] - start[q]).abs().max() > 1e-3  # Muon moved the matrices


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, cfg: Path, *args: str) -> None:
    """Launch ``lit-llm fit`` as two torchrun "nodes" of one process each on localhost (own working folders,
    as on two machines with local disks; the checkpoint folder is shared), and wait for both."""
    import subprocess
    import sys

    from tests.test_reliability import _env

    port = str(_free_port())
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "-m",
            "lit_llm",
            "fit",
            "--config",
            str(cfg),
            "--trainer.devices",
            "1",
            "--trainer.num_nodes",
            "2",
            *args,
        ]
        log = open(cwd / "torchrun.log", "w")  # a file, not a pipe: a full pipe would block the node
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    # wait for both; the first that fails stops the other (which would wait for its peer) and is reported
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    failed = [node for node, p in enumerate(procs) if p.poll() not in (None, 0)]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for node in failed + [0, 1]:  # the node that failed by itself first
        text = (tmp_path / f"node{node}" / "torchrun.log").read_text()
        code = procs[node].returncode
        assert code == 0, f"node {node} exited with {code}:\n{text[-3000:]}"


@pytest.mark.slow
def test_two_nodes_under_torchrun_train_and_resume(tmp_path):
    """``torchrun --nnodes 2`` (two launches on localhost, one process each) trains like one process with the
    same global batch, and resumes from its checkpoint."""
    (tmp_path / "single").mkdir()
    cfg = _pretrain_config(tmp_path / "single.yaml", 1, 8)
    _lit_llm(tmp_path / "single", "--config", str(cfg))
    want = _weights(tmp_path / "single/ckpt/last.ckpt")

    cfg = _pretrain_config(tmp_path / "nodes.yaml", 1, 4, "ddp")
    d = yaml.safe_load(cfg.read_text())
    d["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")  # the shared file system
    cfg.write_text(yaml.safe_dump(d))
    _two_nodes(tmp_path, cfg)
    got = _weights(tmp_path / "ckpt/last.ckpt")
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5, msg=k)
    assert not (tmp_path / "node1/logs").exists()  # only global rank 0 (node 0) logs

    (tmp_path / "ckpt/last.ckpt").unlink()
    _two_nodes(tmp_path, cfg, "--ckpt_path", str(tmp_path / "ckpt/step2.ckpt"))
    resumed = load_checkpoint(tmp_path / "ckpt/last.ckpt")
    assert resumed["global_step"] == 4
    for k, w in got.items():
        assert torch.equal(resumed["state_dict"][k], w), k


def test_token_weight_makes_the_ranks_average_the_global_token_mean():
    """GRPO's token-level loss on 2 ranks with unequal reply lengths: with ``token_weight`` the average of the
    ranks' losses (what DDP / FSDP average the gradients of) is the loss of one process over all replies;
    without it, a token of the rank with fewer tokens would weigh more."""
    import types

    from lit_llm.rl import grpo_loss
    from lit_llm.stages.base import RLStage

    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 1, 4, 5, 2])  # rank 0: rows 0-2 (7 tokens), rank 1: rows 3-5 (11 tokens)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    old = torch.randn(6, 5)
    logp = (old + 0.1 * torch.randn(6, 5)).requires_grad_()
    adv = torch.randn(6)
    whole, _ = grpo_loss(logp, old, adv, mask, 0.2)
    (want,) = torch.autograd.grad(whole, logp)
    ranks = (slice(0, 3), slice(3, 6))
    counts = torch.stack([mask[r].sum() for r in ranks])
    fake = types.SimpleNamespace(reduce=lambda x, op: counts.mean() if op == "mean" else counts.sum())

    def averaged(weighted: bool) -> torch.Tensor:
        losses = []
        for r in ranks:
            loss, _ = grpo_loss(logp[r], old[r], adv[r], mask[r], 0.2)
            losses.append(loss * (RLStage.token_weight(fake, mask[r]) if weighted else 1.0))
        (grad,) = torch.autograd.grad(torch.stack(losses).mean(), logp)
        return grad

    torch.testing.assert_close(averaged(weighted=True), want)
    assert not torch.allclose(averaged(weighted=False), want, atol=1e-4)


class DieAt(Callback):
    """Test helper: the process of global rank ``rank`` kills itself (SIGKILL) after training step ``step``."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_process_that_dies_stops_the_others_with_a_clear_error(tmp_path, strategy):
    """Rank 1 is killed after step 3: rank 0 stops at its next collective with an error that says so and how
    to resume, and the checkpoint of step 2 stays whole and loadable."""
    import subprocess
    import sys

    from tests.test_reliability import _env

    cfg = _pretrain_config(tmp_path / "cfg.yaml", 2, 4, strategy, max_steps=8)
    d = yaml.safe_load(cfg.read_text())
    d["trainer"]["callbacks"].append({"class_path": "tests.test_distributed.DieAt", "init_args": {"step": 3}})
    cfg.write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-m", "lit_llm", "fit", "--config", str(cfg)]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: another process of this run stopped at step 3" in out.stderr, out.stderr[-3000:]
    assert "--ckpt_path last" in out.stderr
    last = load_checkpoint(tmp_path / "ckpt/last.ckpt")
    assert last["global_step"] == 2 and last["state_dict"]


RL = {
    "grpo": (
        "grpo/tinyworld.yaml",
        [
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.batch_size",
            "2",
            "--data.val_prompts",
            "4",
            "--model.group_size",
            "4",
            "--model.minibatch_size",
            "4",
            "--model.max_new_tokens",
            "12",
        ],
    ),
    "ppo": (
        "ppo/tinyworld.yaml",
        [
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.batch_size",
            "4",
            "--data.val_prompts",
            "4",
            "--model.minibatch_size",
            "2",
            "--model.max_new_tokens",
            "12",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "strategy"), [("grpo", "ddp"), ("grpo", "fsdp2"), ("ppo", "ddp"), ("ppo", "fsdp2")]
)
def test_rl_stage_on_two_processes(chain, tmp_path, stage, strategy):
    """PPO and GRPO on 2 processes: every rank samples its own prompts' replies (decoding different lengths
    while sharded), the updates change the policy, validation runs, and the checkpoint holds the trained
    policy (a folder of shards under FSDP2) that generation reads. Not compared with 1 process: each
    process samples from its own random stream (docs/scaling.md)."""
    config, settings = RL[stage]
    for name in ("checkpoints", "data_cache"):
        (tmp_path / name).symlink_to(chain / name)
    out = tmp_path / "out"
    _fit(
        tmp_path,
        "--config",
        str(ROOT / "configs" / config),
        *settings,
        "--trainer.devices",
        "2",
        *STRATEGIES[strategy],
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "logs"),
    )
    assert is_sharded_checkpoint(out / "last.ckpt") == (strategy == "fsdp2")
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["global_step"] >= 2 and ckpt["lit_llm"]["stage"] == stage
    sft = load_checkpoint(chain / "checkpoints/sft/last.ckpt")["state_dict"]
    moved = max(
        (ckpt["state_dict"][k] - w).abs().max().item() for k, w in sft.items() if k.startswith("model.")
    )
    assert moved > 1e-6
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val/gold_reward") for r in rows) and any(
        r.get(f"{stage}/reward_mean" if stage == "grpo" else "train/score") for r in rows
    )
    from lit_llm.backbone.generate import generate

    model, tok, _ = load_backbone(out / "last.ckpt")
    assert generate(model.eval(), [tok.encode("Alice")], 4).sequences.shape[1] > 1


@pytest.mark.slow
def test_vision_sft_sharded_matches_one_process(tmp_path):
    """The early-fusion image model (vision tower in the root FSDP unit) under FSDP2 on 2 processes: the
    weights of 1 process at the same global batch (Muon's bfloat16 Newton-Schulz: to 2e-3, see above)."""
    runs = {}
    fast = [
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--data.shapes_train",
        "64",
        "--data.shapes_val",
        "16",
    ]
    for name, devices, strategy in (("single", 1, []), ("fsdp2", 2, STRATEGIES["fsdp2"])):
        out = tmp_path / name
        _fit(
            tmp_path,
            "--config",
            str(ROOT / "configs/vision/shapes.yaml"),
            *fast,
            "--trainer.devices",
            str(devices),
            *strategy,
            "--data.batch_size",
            str(16 // devices),
            "--trainer.default_root_dir",
            str(out),
        )
        runs[name] = load_checkpoint(out / "last.ckpt")["state_dict"]
    assert any(k.startswith("model.vision") for k in runs["single"])
    for k, w in runs["single"].items():
        assert torch.allclose(runs["fsdp2"][k], w, atol=2e-3), (k, (runs["fsdp2"][k] - w).abs().max())
