"""``lit-llm pipeline``: pretraining -> SFT -> reward model -> PPO on tinyworld, then one summary table.

Each stage is the same ``lit-llm fit --config configs/<stage>/...`` a user would type, started from the
previous stage's ``last.ckpt``. Outputs land in ``<workdir>/checkpoints/`` (TensorBoard logs under
``checkpoints/logs``). The summary compares the SFT and the PPO policy on the *same* held-out prompts
with tinyworld's gold reward (is the answer right?), which PPO never saw as a training signal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "reward", "ppo")
CONFIGS = {
    "pretrain": "pretrain/tiny.yaml",
    "sft": "sft/tinyworld.yaml",
    "reward": "reward/tinyworld.yaml",
    "ppo": "ppo/tinyworld.yaml",
}
# each stage starts from the previous stage's checkpoint (PPO: the SFT policy plus the reward model)
INIT = {
    "pretrain": [],
    "sft": ["--model.init_from", "checkpoints/pretrain/last.ckpt"],
    "reward": ["--model.init_from", "checkpoints/sft/last.ckpt"],
    "ppo": [
        "--model.init_from",
        "checkpoints/sft/last.ckpt",
        "--model.reward_model",
        "checkpoints/reward/last.ckpt",
    ],
}
QUIET = ["--trainer.enable_model_summary", "false"]
# --fast: a smoke run of the whole chain in well under a minute (used by the tests)
FAST = {
    "pretrain": [
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "20",
        "--trainer.limit_val_batches",
        "2",
        "--data.tinyworld_docs",
        "400",
        "--data.seq_len",
        "128",
        "--model.model_overrides",
        "{n_layer: 1, n_embd: 64, n_head: 2, n_kv_head: 1}",
    ],
    "sft": [
        "--trainer.max_steps",
        "10",
        "--trainer.val_check_interval",
        "10",
        "--data.tinyworld_train",
        "320",
        "--data.tinyworld_val",
        "32",
        "--data.tinyworld_eval",
        "8",
    ],
    "reward": [
        "--trainer.max_steps",
        "10",
        "--trainer.val_check_interval",
        "10",
        "--data.tinyworld_train",
        "320",
        "--data.tinyworld_val",
        "32",
    ],
    "ppo": [
        "--trainer.limit_train_batches",
        "3",
        "--trainer.val_check_interval",
        "3",
        "--data.batch_size",
        "16",
        "--data.val_prompts",
        "16",
    ],
}


def find_configs(explicit: str | None) -> Path:
    """The ``configs/`` folder: as given, in the working directory, or next to the package (editable install)."""
    for cand in (explicit, "configs", Path(__file__).resolve().parents[2] / "configs"):
        if cand is not None and (Path(cand) / CONFIGS["pretrain"]).is_file():
            return Path(cand).resolve()
    raise FileNotFoundError("cannot find the configs/ folder; pass --configs path/to/configs")


def _metric(cli: Any, key: str) -> float | None:
    value = cli.trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def main(argv: Sequence[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="lit-llm pipeline",
        description="Run pretraining -> SFT -> reward model -> PPO on tinyworld and print a summary table.",
    )
    p.add_argument("--workdir", default=".", help="where checkpoints/ and data_cache/ go (default: here)")
    p.add_argument("--configs", default=None, help="the configs/ folder (default: ./configs or the repo's)")
    p.add_argument("--seed", type=int, default=0, help="seed_everything for every stage")
    p.add_argument("--fast", action="store_true", help="a smoke run with tiny settings (under a minute)")
    p.add_argument("--eval_prompts", type=int, default=300, help="held-out prompts scored by the gold reward")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=STAGES, help="reuse existing last.ckpt of these stages"
    )
    p.add_argument(
        "--reward_long",
        action="store_true",
        help="the accurate tinyworld reward model instead of the 1-minute one: configs/reward/"
        "tinyworld-person.yaml, then tinyworld-long.yaml from it (about 37 minutes on 2 cores; --reward_args "
        "apply to the second step)",
    )
    for stage in STAGES:
        p.add_argument(
            f"--{stage}_args", default="", help=f"extra CLI overrides for the {stage} stage (one string)"
        )
    a = p.parse_args(argv)

    import shlex

    import torch

    from lit_llm.checkpoint import load_backbone
    from lit_llm.cli.lightning import run_lightning
    from lit_llm.data import tinyworld
    from lit_llm.evaluation import gold_score

    configs = find_configs(a.configs)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    rows: dict[str, Any] = {"minutes": {}}
    try:
        for stage in STAGES:
            ckpt = Path(f"checkpoints/{stage}/last.ckpt")
            if stage in a.skip:
                if not ckpt.is_file():
                    raise FileNotFoundError(f"--skip {stage}: {ckpt} does not exist")
                continue
            config, init = CONFIGS[stage], INIT[stage]
            fast = FAST[stage] if a.fast else []
            common = ["--seed_everything", str(a.seed), *QUIET]
            t0 = time.perf_counter()
            if stage == "reward" and a.reward_long:  # step 1 of 2: whom a reply is about
                args = [
                    "fit",
                    "--config",
                    str(configs / "reward/tinyworld-person.yaml"),
                    *common,
                    *init,
                    *fast,
                ]
                print(f"\n=== reward, step 1: lit-llm {' '.join(args)}", flush=True)
                run_lightning(args)
                config, init = (
                    "reward/tinyworld-long.yaml",
                    ["--model.init_from", "checkpoints/reward-person/last.ckpt"],
                )
            args = ["fit", "--config", str(configs / config), *common, *init, *fast]
            args += shlex.split(getattr(a, f"{stage}_args"))
            print(f"\n=== {stage}: lit-llm {' '.join(args)}", flush=True)
            cli = run_lightning(args)
            rows["minutes"][stage] = (time.perf_counter() - t0) / 60
            if stage == "pretrain":
                rows["pretrain_val_loss"] = _metric(cli, "val/loss")
            elif stage == "sft":
                rows["sft_val_loss"] = _metric(cli, "val/loss")
            elif stage == "reward":
                rows["reward_val_acc"] = _metric(cli, "val/acc")
            else:
                rows["ppo_kl"] = _metric(cli, "ppo/kl")
                rows["ppo_rm_score"] = _metric(cli, "ppo/rm_score")
        records = tinyworld.rl_prompts(8 if a.fast else a.eval_prompts, "test")
        for name in ("sft", "ppo"):
            model, tok, _ = load_backbone(f"checkpoints/{name}/last.ckpt")
            rows[f"{name}_gold"], _ = gold_score(model, tok, records, tinyworld.gold_score)
            torch.manual_seed(a.seed)
            rows[f"{name}_gold_sampled"], _ = gold_score(
                model, tok, records, tinyworld.gold_score, temperature=1.0
            )
        Path("checkpoints/pipeline_summary.json").write_text(json.dumps(rows, indent=2))
    finally:
        os.chdir(cwd)
    print_summary(rows)
    return rows


def print_summary(rows: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, pct: bool = False) -> str:
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")

    m = rows["minutes"]
    t = Table(title="lit-llm pipeline on tinyworld")
    t.add_column("stage")
    t.add_column("result")
    t.add_column("minutes", justify="right")
    t.add_row("pretrain", f"val loss {fmt(rows.get('pretrain_val_loss'))}", f"{m.get('pretrain', 0):.1f}")
    t.add_row(
        "sft",
        f"val loss {fmt(rows.get('sft_val_loss'))}; exact answer (gold) {fmt(rows['sft_gold'], True)}",
        f"{m.get('sft', 0):.1f}",
    )
    t.add_row(
        "reward",
        f"held-out pairwise accuracy {fmt(rows.get('reward_val_acc'), True)}",
        f"{m.get('reward', 0):.1f}",
    )
    t.add_row(
        "ppo",
        f"gold {fmt(rows['ppo_gold'], True)} (SFT {fmt(rows['sft_gold'], True)}); sampled at T=1: "
        f"{fmt(rows['ppo_gold_sampled'], True)} (SFT {fmt(rows['sft_gold_sampled'], True)}); "
        f"KL to SFT {fmt(rows.get('ppo_kl'))}",
        f"{m.get('ppo', 0):.1f}",
    )
    t.add_row(
        "total",
        f"gold reward change: {100 * (rows['ppo_gold'] - rows['sft_gold']):+.1f} points",
        f"{sum(m.values()):.1f}",
    )
    Console().print(t)
