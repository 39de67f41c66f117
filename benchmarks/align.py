"""PPO, GRPO and DPO side by side on tinyworld: the same SFT checkpoint, the same held-out test prompts.

Needs a workdir where ``lit-llm pipeline`` has already trained pretraining, SFT and the reward model
(``checkpoints/{pretrain,sft,reward}/last.ckpt``, e.g. from ``benchmarks/pipeline.py``). For every method
and seed it runs ``lit-llm pipeline --skip pretrain sft reward --align METHOD --seed S`` (so each run starts
from the same SFT policy) and collects, from the pipeline's summary: gold reward of greedy and sampled
replies on the held-out test prompts, gold by difficulty, the KL to the SFT policy (the same sampled k3
estimate for every method) and the minutes of the run. Prints markdown tables for BENCHMARKS.md.

    python benchmarks/align.py --workdir /tmp/bench/pipe --methods grpo dpo --seeds 0 1 2
    python benchmarks/align.py --workdir /tmp/bench/pipe --methods grpo --grpo_args "--model.reward_model ..."
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from lit_llm.cli.pipeline import main as pipeline

METHODS = ("ppo", "grpo", "dpo")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/lit-llm-pipeline")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval_prompts", type=int, default=300)
    p.add_argument("--label", default="", help="a name for this configuration in the output file names")
    for m in METHODS:
        p.add_argument(f"--{m}_args", default="", help=f"extra overrides for the {m} stage (one string)")
    a = p.parse_args()
    work = Path(a.workdir)
    for stage in ("pretrain", "sft"):
        if not (work / f"checkpoints/{stage}/last.ckpt").is_file():
            raise SystemExit(
                f"error: {work}/checkpoints/{stage}/last.ckpt is missing: run benchmarks/pipeline.py first"
            )
    results: dict[str, list[dict]] = {}
    for method in a.methods:
        for seed in a.seeds:
            shutil.rmtree(work / f"checkpoints/{method}", ignore_errors=True)
            rows = pipeline(
                [
                    "--workdir",
                    str(work),
                    "--seed",
                    str(seed),
                    "--eval_prompts",
                    str(a.eval_prompts),
                    "--skip",
                    "pretrain",
                    "sft",
                    "reward",
                    "--align",
                    method,
                    f"--{method}_args",
                    getattr(a, f"{method}_args"),
                ]
            )
            results.setdefault(method, []).append({"seed": seed, **rows})
            name = f"align_{method}{'_' + a.label if a.label else ''}_seed{seed}.json"
            (work / name).write_text(json.dumps(rows, indent=2, default=str))
    print(
        "\n| method | seed | SFT gold | gold (greedy) | change | gold sampled (T=1) | KL to SFT | minutes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, runs in results.items():
        for r in runs:
            print(
                f"| {method} | {r['seed']} | {100 * r['sft_gold']:.1f}% | {100 * r[f'{method}_gold']:.1f}% | "
                f"{100 * (r[f'{method}_gold'] - r['sft_gold']):+.1f} | {100 * r[f'{method}_gold_sampled']:.1f}% | "
                f"{r[f'{method}_kl_sft']:.2f} | {r['minutes'][method]:.1f} |"
            )
    print("\n| method | mean gold (greedy) | mean change | by difficulty (mean over seeds) |")
    print("|---|---:|---:|---|")
    for method, runs in results.items():
        gold = statistics.mean(r[f"{method}_gold"] for r in runs)
        change = statistics.mean(r[f"{method}_gold"] - r["sft_gold"] for r in runs)
        levels = sorted(runs[0][f"{method}_gold_by_difficulty"])
        by = ", ".join(
            f"d{d} {100 * statistics.mean(r[f'{method}_gold_by_difficulty'][d] for r in runs):.1f}%"
            for d in levels
        )
        print(f"| {method} | {100 * gold:.1f}% | {100 * change:+.1f} | {by} |")
    sft = results[a.methods[0]][0]
    levels = sorted(sft["sft_gold_by_difficulty"])
    print(
        "SFT by difficulty: "
        + ", ".join(f"d{d} {100 * sft['sft_gold_by_difficulty'][d]:.1f}%" for d in levels)
    )


if __name__ == "__main__":
    main()
