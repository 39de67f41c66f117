"""Sharded (FSDP2) vs DDP on CPU processes: memory per process and tokens/s, and weak scaling 1 -> 2 processes.

Every configuration is a real ``lit-llm fit`` (a subprocess; Lightning starts the second process) of a
pretraining preset on tinyworld, fp32, one thread per process, ``--batch_size`` sequences *per process*
(weak scaling: 2 processes do twice the work per step). A probe callback records on every rank, after the
last step: the bytes of the parameters, gradients and optimizer state that the process holds (its shards
under FSDP2), its peak resident memory, and the steady tokens/s (all processes, steps after the first).

    python benchmarks/sharding.py                               # tiny: 1 proc, DDP x2, FSDP2 x2
    python benchmarks/sharding.py --preset llama-125m --steps 4 --batch_size 1 --seq_len 256
    python benchmarks/sharding.py --preset llama-125m --overrides '{"n_layer": 24, "n_embd": 1024, "n_head": 16}' \
        --steps 2 --batch_size 1 --only ddp2 fsdp2 --data_limit_gb 4           # DDP cannot fit, FSDP2 trains

``--data_limit_gb`` caps each process's data segment (``RLIMIT_DATA``: heap and private mappings, where
torch's tensors live) to show a model that DDP cannot train in that memory and FSDP2 can.
Prints a Markdown table and writes ``<workdir>/sharding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from lightning import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"1proc": (1, "auto"), "ddp2": (2, "ddp"), "fsdp2": (2, "fsdp2")}


def _local_bytes(t: torch.Tensor | None) -> int:
    """Bytes of the part of ``t`` this process holds (a DTensor's local shard)."""
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class MemoryProbe(Callback):
    """Writes ``probe-rank<r>.json``: state bytes held by this process, peak RSS, steady tokens/s."""

    def __init__(self, out: str) -> None:
        self.out, self.times, self.tokens = out, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["input_ids"]
        self.tokens = x.numel()  # per process and step
        if trainer.global_step < trainer.max_steps:
            return
        params = [p for p in pl_module.parameters()]
        opt = trainer.optimizers[0]
        state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        steps = len(self.times) - 1
        dt = self.times[-1] - self.times[0]
        record = {
            "rank": trainer.global_rank,
            "params_bytes": sum(_local_bytes(p) for p in params),
            "grads_bytes": sum(_local_bytes(p.grad) for p in params),
            "optimizer_bytes": state,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_sec": self.tokens * trainer.world_size * steps / dt if steps else None,
        }
        Path(self.out, f"probe-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def write_config(run: Path, args: argparse.Namespace, devices: int, strategy: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": strategy,
            "max_steps": args.steps,
            "precision": "32-true",
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(run),
            "callbacks": [{"class_path": "benchmarks.sharding.MemoryProbe", "init_args": {"out": str(run)}}],
        },
        "model": {
            "class_path": "lit_llm.stages.CausalLM",
            "init_args": {
                "preset": args.preset,
                "model_overrides": args.overrides,
                "learning_rate": 1e-4,
                "warmup_steps": 1,
            },
        },
        "data": {
            "class_path": "lit_llm.data.text.TextDataModule",
            "init_args": {
                "source": "tinyworld",
                "tokenizer_kind": "bpe",
                "tokenizer_vocab_size": 512,
                "tinyworld_docs": args.docs,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "cache_dir": str(args.workdir / "data_cache"),
            },
        },
    }
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_one(name: str, args: argparse.Namespace) -> dict:
    devices, strategy = CONFIGS[name]
    run = args.workdir / name
    subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)
    cfg = write_config(run, args, devices, strategy)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    limit = int(args.data_limit_gb * 2**30) if args.data_limit_gb else None

    def cap() -> None:  # in the child, before exec: inherited by the process Lightning starts
        if limit:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lit_llm", "fit", "--config", str(cfg)],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=cap,
    )
    wall = time.perf_counter() - t0
    probes = [json.loads(p.read_text()) for p in sorted(run.glob("probe-rank*.json"))]
    if out.returncode or len(probes) != devices:
        tail = out.stderr.strip().splitlines()[-3:]
        return {"name": name, "failed": True, "why": " / ".join(tail)[-400:], "wall_s": wall}
    worst = max(probes, key=lambda r: r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"])
    return {
        "name": name,
        "processes": devices,
        "strategy": strategy,
        "state_mb": (worst["params_bytes"] + worst["grads_bytes"] + worst["optimizer_bytes"]) / 2**20,
        "params_mb": worst["params_bytes"] / 2**20,
        "grads_mb": worst["grads_bytes"] / 2**20,
        "optimizer_mb": worst["optimizer_bytes"] / 2**20,
        "peak_rss_mb": max(r["peak_rss_bytes"] for r in probes) / 2**20,
        "tokens_per_sec": probes[0]["tokens_per_sec"],
        "wall_s": wall,
    }


def run_all(run_one, args: argparse.Namespace, json_name: str) -> tuple[list[dict], str]:
    """``run_one(name, args)`` for every name of ``args.only`` (printed as it ends), written with the machine
    and the arguments to ``<workdir>/<json_name>``: ``(results, machine)``."""
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only:
        results.append(run_one(name, args))
        print(json.dumps(results[-1]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per process"
    meta = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.workdir / json_name).write_text(json.dumps(meta))
    return results, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--overrides", type=json.loads, default=None, help="model_overrides as JSON, e.g. '{\"n_layer\": 24}'"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per process and step")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--docs", type=int, default=4000, help="tinyworld training documents")
    p.add_argument("--data_limit_gb", type=float, default=None, help="RLIMIT_DATA of every process")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lit_llm_sharding"))
    args = p.parse_args()
    results, machine = run_all(run_one, args, "sharding.json")
    limit = f", RLIMIT_DATA {args.data_limit_gb} GB per process" if args.data_limit_gb else ""
    print(
        f"\n{args.preset} {args.overrides or ''}, seq_len {args.seq_len}, batch {args.batch_size} per process, {args.steps} steps{limit}"
    )
    print(f"{machine}\n")
    print("| config | state per process MB (params + grads + optimizer) | peak RSS MB | tokens/s | wall s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if r.get("failed"):
            print(f"| {r['name']} | failed: {r['why']} | | | {r['wall_s']:.0f} |")
            continue
        print(
            f"| {r['name']} | {r['state_mb']:,.1f} ({r['params_mb']:,.1f} + {r['grads_mb']:,.1f} + "
            f"{r['optimizer_mb']:,.1f}) | {r['peak_rss_mb']:,.0f} | {r['tokens_per_sec']:,.0f} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
