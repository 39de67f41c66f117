"""Training speed and loss of the ``small`` preset under different precisions, compile, and 1 vs 2 processes.

Every configuration is a real ``lit-llm fit`` run (a subprocess) on tinyworld with a BPE tokenizer, the same
seed, data order and global batch, so the final validation losses are comparable. Tokens/s is the median of
the ``ThroughputMonitor`` windows after the first (which holds start-up and, with ``compile``, compilation);
with ``--repeats``, the median over repetitions (run in rotated order) and the range.

    python benchmarks/scaling.py                       # all configurations (about 1 minute each on 2 cores)
    python benchmarks/scaling.py --only fp32 bf16      # some of them
    python benchmarks/scaling.py --steps 6 --docs 2000  # smoke test

Prints a Markdown table and writes ``<workdir>/scaling.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

# name -> (precision, compile, processes, threads per process). One thread per process by default: on a
# 2-core machine shared with other work, two OpenMP threads in one process thrash whenever the other core is
# busy (see BENCHMARKS.md), which would hide the precision and compile effects.
CONFIGS = {
    "fp32": ("32-true", False, 1, 1),
    "bf16": ("bf16-mixed", False, 1, 1),
    "fp32-compile": ("32-true", True, 1, 1),
    "bf16-compile": ("bf16-mixed", True, 1, 1),
    "fp32-2threads": ("32-true", False, 1, 2),
    "fp32-ddp2": ("32-true", False, 2, 1),
}


def write_config(path: Path, args: argparse.Namespace, precision: str, compile: bool, procs: int) -> Path:
    every = max(1, args.steps // 6)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": procs,
            "strategy": "ddp" if procs > 1 else "auto",
            "max_steps": args.steps,
            "precision": precision,
            "log_every_n_steps": every,
            "val_check_interval": args.steps,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 8,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 1.0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "run",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lit_llm.callbacks.ThroughputMonitor",
                    "init_args": {"log_every_n_steps": every},
                }
            ],
        },
        "model": {
            "class_path": "lit_llm.stages.CausalLM",
            "init_args": {
                "preset": args.preset,
                "learning_rate": 1e-3,
                "warmup_steps": max(1, args.steps // 10),
                "compile": compile,
            },
        },
        "data": {
            "class_path": "lit_llm.data.text.TextDataModule",
            "init_args": {
                "source": "tinyworld",
                "tokenizer_kind": "bpe",
                "tokenizer_vocab_size": args.vocab,
                "tinyworld_docs": args.docs,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size // procs,
                "cache_dir": str(args.workdir / "data_cache"),
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(run: Path) -> tuple[list[float], float | None, float | None]:
    rows = list(csv.DictReader(open(next(run.glob("logs/lightning_logs/version_*/metrics.csv")))))
    tps = [float(r["throughput/tokens_per_sec"]) for r in rows if r.get("throughput/tokens_per_sec")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    return tps, train[-1] if train else None, val[-1] if val else None


def run_one(name: str, args: argparse.Namespace) -> dict:
    precision, compile, procs, threads = CONFIGS[name]
    run = args.workdir / name
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)
    cfg = write_config(run / "config.yaml", args, precision, compile, procs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("LOCAL_RANK", None)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lit_llm", "fit", "--config", str(cfg)],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    tps, train_loss, val_loss = read_metrics(run)
    steady = tps[1:] or tps
    return {
        "name": name,
        "precision": precision,
        "compile": compile,
        "processes": procs,
        "threads": threads,
        "tokens_per_sec": statistics.median(steady),
        "first_window_tokens_per_sec": tps[0] if tps else None,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=8, help="global batch (split over processes)")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048, help="BPE target size (tinyworld saturates earlier)")
    p.add_argument("--docs", type=int, default=20000, help="tinyworld training documents")
    p.add_argument("--repeats", type=int, default=1, help="run every configuration this many times")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lit_llm_scaling"))
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for rep in range(args.repeats):  # rotate the order each repetition: load from other users spreads out
        k = rep % len(args.only)
        for name in args.only[k:] + args.only[:k]:
            r = run_one(name, args)
            runs[name].append(r)
            print(json.dumps(r), flush=True)
    results = []
    for rs in runs.values():
        speeds = sorted(r["tokens_per_sec"] for r in rs)
        results.append({**rs[-1], "tokens_per_sec": statistics.median(speeds), "all_tokens_per_sec": speeds})
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    (args.workdir / "scaling.json").write_text(
        json.dumps(
            {"machine": machine, "args": vars(args) | {"workdir": str(args.workdir)}, "results": results},
            indent=2,
        )
    )
    base = next((r["tokens_per_sec"] for r in results if r["name"] == "fp32"), None)
    print(
        f"\n{args.preset}, seq_len {args.seq_len}, global batch {args.batch_size}, {args.steps} steps; {machine}\n"
    )
    print(
        "| config | precision | compile | processes x threads | tokens/s | vs fp32 | train loss | val loss | wall s |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        rel = f"{r['tokens_per_sec'] / base:.2f}x" if base else "-"
        spread = r["all_tokens_per_sec"]
        rng = f" ({spread[0]:,.0f}-{spread[-1]:,.0f})" if len(spread) > 1 else ""
        print(
            f"| {r['name']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['processes']} x "
            f"{r['threads']} | {r['tokens_per_sec']:,.0f}{rng} | {rel} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
            f"{r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
