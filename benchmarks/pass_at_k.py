"""How often a chat policy's sampled replies are right: pass@1 and pass@k on tinyworld's held-out test prompts.

RL from a verifier (GRPO) can only reinforce right answers the policy already samples: a prompt whose k
samples are all wrong gives a group with zero reward spread, hence no gradient. pass@k of the starting
policy is therefore a ceiling on what GRPO with groups of k can find quickly. Prints pass@1 (mean of the k
samples), pass@k (at least one right) and the share of prompts whose k rewards are all equal, per difficulty.

    python benchmarks/pass_at_k.py --ckpt /tmp/bench/pipe/checkpoints/sft/last.ckpt --k 8
"""

from __future__ import annotations

import argparse

import torch

from lit_llm.checkpoint import load_backbone
from lit_llm.data import tinyworld
from lit_llm.evaluation import chat_completions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    records = tinyworld.rl_prompts(a.prompts, "test")
    print("| checkpoint | difficulty | prompts | pass@1 | pass@k | all k equal |")
    print("|---|---:|---:|---:|---:|---:|")
    for ckpt in a.ckpt:
        model, tok, _ = load_backbone(ckpt)
        torch.manual_seed(a.seed)
        grouped = [r for r in records for _ in range(a.k)]
        replies = chat_completions(model, tok, [r["prompt"] for r in grouped], temperature=a.temperature)
        right = torch.tensor([tinyworld.gold_score(r, y) for r, y in zip(grouped, replies)]).view(-1, a.k)
        difficulty = torch.tensor([r["difficulty"] for r in records])
        for d in [*sorted(set(difficulty.tolist())), None]:
            rows = right if d is None else right[difficulty == d]
            equal = (rows == rows[:, :1]).all(-1).float().mean()
            print(
                f"| {ckpt} | {'all' if d is None else d} | {len(rows)} | {100 * rows.mean():.1f}% | "
                f"{100 * (rows.max(-1).values).mean():.1f}% | {100 * equal:.1f}% |"
            )


if __name__ == "__main__":
    main()
