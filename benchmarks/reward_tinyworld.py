"""Held-out pairwise accuracy of a tinyworld reward model, by difficulty and by kind of rejected reply.

Scores ``--pairs`` preference pairs of tinyworld's ``val`` split (the same generator, seed and split as
``PreferenceDataModule``'s validation set, so the first 400 are exactly the pairs ``lit-llm validate``
scores) with ``RewardModel.load(ckpt).score`` and counts a pair as right when the chosen reply scores higher.
Rejected replies are grouped as tinyworld makes them: a hedge or rambling (no ``The answer is``), the right
supporting facts with a wrong answer, or the facts of the wrong person.

Examples::

    python benchmarks/reward_tinyworld.py --ckpt checkpoints/reward/last.ckpt
    python benchmarks/reward_tinyworld.py --ckpt checkpoints/reward/last.ckpt --pairs 2000 --json rm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lit_llm.data import tinyworld
from lit_llm.stages.reward import RewardModel


def rejection_kind(pair: dict) -> str:
    """How tinyworld built the rejected reply (read off its text)."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    if "The answer is" not in rejected:
        return "hedge or rambling"
    if chosen.rsplit("The answer is", 1)[0] != rejected.rsplit("The answer is", 1)[0]:
        return "facts of the wrong person"
    return "right facts, wrong answer"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ckpt", required=True, help="a reward-model checkpoint (lit-llm fit --config configs/reward/...)"
    )
    p.add_argument("--pairs", type=int, default=400, help="held-out pairs to score")
    p.add_argument(
        "--split",
        default="val",
        choices=("val", "test"),
        help="val: the pairs lit-llm validate scores; test: scenes no training run ever looked at",
    )
    p.add_argument("--seed", type=int, default=0, help="tinyworld seed (the data module's default is 0)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--reply-prefix",
        default="",
        help="text put before every reply (e.g. ' ' for a reward model trained on space-prefixed replies)",
    )
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    rm, tok = RewardModel.load(args.ckpt)
    pairs = tinyworld.preference_pairs(args.pairs, args.split, tinyworld.WorldConfig(seed=args.seed))
    right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    margins = []
    with torch.inference_mode():
        for i in range(0, len(pairs), args.batch):
            batch = pairs[i : i + args.batch]
            prompts = [q["prompt"] for q in batch]
            chosen = rm.score(tok, prompts, [args.reply_prefix + q["chosen"] for q in batch])
            rejected = rm.score(tok, prompts, [args.reply_prefix + q["rejected"] for q in batch])
            for q, c, r in zip(batch, chosen.tolist(), rejected.tolist()):
                margins.append(c - r)
                for key in (
                    "all",
                    f"difficulty {q['difficulty']}",
                    f"difficulty {q['difficulty']}: {rejection_kind(q)}",
                ):
                    right[key][0] += int(c > r)
                    right[key][1] += 1
    rows = [{"group": k, "accuracy": n / total, "pairs": total} for k, (n, total) in sorted(right.items())]
    print(
        f"{args.ckpt}: {len(pairs)} held-out tinyworld pairs ({args.split}), mean margin {sum(margins) / len(margins):.2f}"
    )
    print("| group | pairwise accuracy | pairs |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['group']} | {100 * r['accuracy']:.1f}% | {r['pairs']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
