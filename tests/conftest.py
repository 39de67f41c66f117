"""Shared fixtures; every test leaves global torch state as it found it."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_state():
    rng = torch.get_rng_state()
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled()
    yield
    torch.set_rng_state(rng)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


def pytest_configure(config):
    # The test models are tiny: one thread avoids OpenMP oversubscription, which on a busy 2-core machine
    # made the suite many times slower.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit_in(work, config: str, *args: str) -> None:
    """``lit-llm fit --config configs/<config>`` quietly, run in ``work`` (its ``checkpoints/`` go there)."""
    import os

    from lit_llm.cli import main

    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(["fit", "--config", str(ROOT / "configs" / config), *QUIET, *args])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def pretrain_ckpt(tmp_path_factory):
    """A quickly pretrained tiny tinyworld model (one layer, 30 steps), shared by the stage tests."""
    work = tmp_path_factory.mktemp("pretrain")
    fit_in(
        work,
        "pretrain/tiny.yaml",
        "--trainer.max_steps",
        "30",
        "--trainer.val_check_interval",
        "30",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.precision",
        "32-true",
        "--data.tinyworld_docs",
        "600",
        "--data.seq_len",
        "128",
        "--model.model_overrides",
        "{n_layer: 1, n_embd: 64, n_head: 2, n_kv_head: 1}",
    )
    return work / "checkpoints/pretrain/last.ckpt"


@pytest.fixture(scope="session")
def sft_ckpt(pretrain_ckpt, tmp_path_factory):
    """A quick SFT of ``pretrain_ckpt`` on tinyworld (shared by the reward and PPO tests)."""
    work = tmp_path_factory.mktemp("sft")
    fit_in(
        work,
        "sft/tinyworld.yaml",
        "--model.init_from",
        str(pretrain_ckpt),
        "--trainer.max_steps",
        "40",
        "--trainer.val_check_interval",
        "20",
        "--trainer.precision",
        "32-true",
        "--data.tinyworld_train",
        "640",
        "--data.tinyworld_val",
        "64",
        "--data.tinyworld_eval",
        "16",
        "--model.learning_rate",
        "0.003",
    )
    return work / "checkpoints/sft/last.ckpt"


@pytest.fixture
def fit_rl(tmp_path):
    """``fit(module, records, batches=1, batch_size=4)``: run ``batches`` iterations of an RL stage (PPO,
    GRPO) on ``records`` with a bare Trainer; returns the trainer and the stats of every ``_update`` call."""
    from lightning import Trainer
    from torch.utils.data import DataLoader

    def fit(module, records, batches=1, batch_size=4):
        calls = []
        update = module._update

        def recording_update(mb):
            stats = update(mb)
            calls.append(stats)
            return stats

        module._update = recording_update
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        rows = (list(records) * batches)[: batches * batch_size]
        trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=batch_size, collate_fn=list))
        return trainer, calls

    return fit


def _variant(src, dst, stage=None, dropout=None):
    """A copy of checkpoint ``src``: relabelled as ``stage`` (a reward model gets a value head), or with
    ``dropout`` in its model config."""
    ckpt = torch.load(src, weights_only=False, map_location="cpu")
    meta = ckpt["lit_llm"]
    if dropout is not None:
        meta["model_config"]["dropout"] = dropout
    if stage == "reward":
        meta["stage"] = "reward"
        n_embd = meta["model_config"]["n_embd"]
        g = torch.Generator().manual_seed(0)
        ckpt["state_dict"]["value_head.weight"] = torch.randn(1, n_embd, generator=g) / math.sqrt(n_embd)
        ckpt["state_dict"]["value_head.bias"] = torch.tensor([0.3])
    torch.save(ckpt, dst)
    return str(dst)


@pytest.fixture(scope="session")
def rl_ckpts(sft_ckpt, tmp_path_factory):
    """The SFT checkpoint, a reward model made from it (a fixed random value head) and a copy with dropout
    0.3: what the PPO and GRPO internals tests start from."""
    d = tmp_path_factory.mktemp("rl_ckpts")
    return {
        "sft": str(sft_ckpt),
        "reward": _variant(sft_ckpt, d / "reward.ckpt", stage="reward"),
        "sft_dropout": _variant(sft_ckpt, d / "sft_dropout.ckpt", dropout=0.3),
    }
