"""RLHF on tinyworld: does PPO beat SFT on the gold reward? Times every stage.

Runs ``lit-llm pipeline`` once (all four stages, seed 0, timed), then PPO again with other seeds from the
same SFT policy and reward model (``--skip pretrain sft reward``), and prints the gold reward (exact-answer
accuracy on 300 held-out test prompts, greedy) of the SFT and PPO policies, the KL to the SFT reference and
the minutes per stage, as a markdown table for BENCHMARKS.md.

    python benchmarks/pipeline.py --workdir /tmp/lit-llm-pipeline --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from lit_llm.cli.pipeline import main as run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/lit-llm-pipeline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval_prompts", type=int, default=300)
    p.add_argument("--reuse", action="store_true", help="reuse the workdir's pretrain/SFT/reward checkpoints")
    a = p.parse_args()
    work = Path(a.workdir)
    results = []
    for i, seed in enumerate(a.seeds):
        skip = [] if i == 0 and not a.reuse else ["--skip", "pretrain", "sft", "reward"]
        if skip:  # keep each seed's PPO run apart
            shutil.rmtree(work / "checkpoints/ppo", ignore_errors=True)
        rows = run(
            ["--workdir", str(work), "--seed", str(seed), "--eval_prompts", str(a.eval_prompts), *skip]
        )
        results.append({"seed": seed, **rows})
        (work / f"summary_seed{seed}.json").write_text(json.dumps(rows, indent=2))
    first = results[0]
    print("\n| seed | SFT gold | PPO gold | change (points) | KL to SFT | PPO minutes |")
    print("|---|---|---|---|---|---|")
    for r in results:
        change = 100 * (r["ppo_gold"] - r["sft_gold"])
        print(
            f"| {r['seed']} | {100 * r['sft_gold']:.1f}% | {100 * r['ppo_gold']:.1f}% | {change:+.1f} | "
            f"{r['ppo_kl']:.3f} | {r['minutes']['ppo']:.1f} |"
        )
    mean = statistics.mean(100 * (r["ppo_gold"] - r["sft_gold"]) for r in results)
    print(f"\nmean change over {len(results)} seeds: {mean:+.1f} points")
    m = first["minutes"]
    print(f"stage minutes (seed {first['seed']}): " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
