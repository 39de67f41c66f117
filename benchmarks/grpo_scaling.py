"""GRPO weak scaling on CPU processes: rollouts/s of 1 process against 2 (DDP and FSDP2), one thread each.

Every configuration is a real ``lit-llm fit --config configs/grpo/tinyworld.yaml`` (a subprocess; Lightning
starts the second process) from an SFT checkpoint, fp32, ``--prompts`` prompts *per process* and iteration
(each sampled ``group_size`` times, then ``ppo_epochs`` of updates): 2 processes do twice the work per
iteration. A probe callback times the iterations after the first; rollouts/s counts the replies of all
processes (prompts x group_size x processes per iteration) over the whole iteration (sampling, scoring,
reference log-probs, updates), and the sampling share says how much of it is decoding.

    python benchmarks/grpo_scaling.py --sft checkpoints/sft/last.ckpt
    python benchmarks/grpo_scaling.py --sft /tmp/lit_llm_checkpoint_sizes/checkpoints/sft/last.ckpt --steps 6

Prints a Markdown table and writes ``<workdir>/grpo_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from lightning import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.sharding, run as a script
from benchmarks.sharding import CONFIGS, ROOT, run_all  # noqa: E402


class IterationProbe(Callback):
    """Writes ``probe-rank<r>.json``: the wall time of every GRPO iteration and of its sampling."""

    def __init__(self, out: str) -> None:
        self.out, self.ends, self.sampling = out, [], []

    def on_train_start(self, trainer, pl_module) -> None:
        rollout = pl_module.rollout

        def timed(*args, **kwargs):  # the stage's sampling + scoring step, timed around
            t0 = time.perf_counter()
            result = rollout(*args, **kwargs)
            self.sampling.append(time.perf_counter() - t0)
            return result

        pl_module.rollout = timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"rank": trainer.global_rank, "ends": self.ends, "sampling": self.sampling}
        Path(self.out, f"probe-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_one(name: str, args: argparse.Namespace) -> dict:
    devices, strategy = CONFIGS[name]
    run = args.workdir / name
    subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)
    bench = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": strategy,
            "precision": "32-true",
            "limit_train_batches": args.steps,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
            "callbacks+": [
                {"class_path": "benchmarks.grpo_scaling.IterationProbe", "init_args": {"out": str(run)}}
            ],
        },
        "model": {"init_args": {"init_from": str(args.sft.resolve()), "group_size": args.group_size}},
        "data": {"init_args": {"batch_size": args.prompts}},
    }
    (run / "bench.yaml").write_text(yaml.safe_dump(bench))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "lit_llm", "fit", "--config", str(ROOT / "configs/grpo/tinyworld.yaml")]
    t0 = time.perf_counter()
    out = subprocess.run(
        [*cmd, "--config", str(run / "bench.yaml")], cwd=run, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    probes = [json.loads(p.read_text()) for p in sorted(run.glob("probe-rank*.json"))]
    if out.returncode or len(probes) != devices:
        tail = out.stderr.strip().splitlines()[-3:]
        return {"name": name, "failed": True, "why": " / ".join(tail)[-400:], "wall_s": wall}
    ends = probes[0]["ends"]  # ends[0]: the first iteration's start; ends[i]: iteration i's end
    steady = ends[-1] - ends[1]  # iterations 2.. (the first one warms up)
    iterations = len(ends) - 2
    sampling = max(sum(p["sampling"][1:]) for p in probes)
    per_iteration = args.prompts * args.group_size * devices
    return {
        "name": name,
        "processes": devices,
        "strategy": strategy,
        "iterations": iterations,
        "s_per_iteration": steady / iterations,
        "rollouts_per_sec": per_iteration * iterations / steady,
        "sampling_share": sampling / steady,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", type=Path, required=True, help="the SFT checkpoint GRPO starts from")
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=5, help="GRPO iterations (the first is not timed)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per process and iteration")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lit_llm_grpo_scaling"))
    args = p.parse_args()
    if not args.sft.exists():
        p.error(f"--sft {args.sft}: not found (run `lit-llm pipeline --fast` or pass an SFT last.ckpt)")
    if args.steps < 3:
        p.error("--steps must be at least 3: the first iteration is not timed")
    results, machine = run_all(run_one, args, "grpo_scaling.json")
    base = next((r for r in results if r["name"] == "1proc" and not r.get("failed")), None)
    print(f"\nGRPO {args.prompts} prompts x {args.group_size} replies per process and iteration, {machine}\n")
    print("| config | s / iteration | rollouts/s | vs 1 process | sampling share |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if r.get("failed"):
            print(f"| {r['name']} | failed: {r['why']} | | | |")
            continue
        ratio = f"{r['rollouts_per_sec'] / base['rollouts_per_sec']:.2f}x" if base else ""
        print(
            f"| {r['name']} | {r['s_per_iteration']:.2f} | {r['rollouts_per_sec']:.1f} | {ratio} | "
            f"{r['sampling_share']:.0%} |"
        )


if __name__ == "__main__":
    main()
