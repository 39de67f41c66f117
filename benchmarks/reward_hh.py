"""Reward model on hh-rlhf harmless pairs with the ``small`` preset, honestly measured.

There is no pretrained English model offline, so the backbone is first pretrained (briefly) on the chosen
dialogues of the training split (the first 90% of the file; the last 10% is held out for the reward
model's validation), then the Bradley-Terry reward model is trained on the training pairs and its pairwise
accuracy measured on the held-out pairs.

    python benchmarks/reward_hh.py --data ../shared/data/hh-rlhf-harmless-test.jsonl.gz
    # the same pretrained backbone, the reward model with the auxiliary next-token loss on chosen replies
    python benchmarks/reward_hh.py --workdir W --reuse --reward_args "--model.lm_coef 1.0"
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from lit_llm.cli import run_lightning


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/hh-rlhf-harmless-test.jsonl.gz")
    p.add_argument("--preset", default="small")
    p.add_argument("--pretrain_steps", type=int, default=300)
    p.add_argument("--reward_steps", type=int, default=300)
    p.add_argument("--workdir", default=None)
    p.add_argument("--reuse", action="store_true", help="reuse the workdir's pretrained backbone")
    p.add_argument("--reward_args", default="", help="extra arguments for the reward-model run")
    a = p.parse_args()
    if not Path(a.data).is_file():
        sys.exit(f"skipped: {a.data} not found")
    data = str(Path(a.data).resolve())
    root = Path(__file__).resolve().parents[1] / "configs"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="reward-hh-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the configs write checkpoints/ and data_cache/ relative to the working directory
    common = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    t0 = time.perf_counter()
    if not (a.reuse and Path("checkpoints/pretrain/last.ckpt").is_file()):
        run_lightning(
            [
                "fit",
                "--config",
                str(root / "pretrain/tiny.yaml"),
                *common,
                "--model.preset",
                a.preset,
                "--data.source",
                data,
                "--data.text_field",
                "chosen",
                "--data.tokenizer_vocab_size",
                "8192",
                "--data.seq_len",
                "256",
                "--data.batch_size",
                "16",
                "--trainer.max_steps",
                str(a.pretrain_steps),
                "--trainer.val_check_interval",
                str(a.pretrain_steps),
                "--trainer.limit_val_batches",
                "20",
                "--model.sample_prompts",
                "['How do I']",
            ]
        )
    t1 = time.perf_counter()
    cli = run_lightning(
        [
            "fit",
            "--config",
            str(root / "reward/hh-rlhf.yaml"),
            *common,
            "--model.init_from",
            "checkpoints/pretrain/last.ckpt",
            "--data.source",
            data,
            "--trainer.max_steps",
            str(a.reward_steps),
            "--trainer.val_check_interval",
            str(a.reward_steps),
            *shlex.split(a.reward_args),
        ]
    )
    t2 = time.perf_counter()
    acc = float(cli.trainer.callback_metrics["val/acc"])
    print(
        "\n| preset | pretrain steps | reward steps | reward args | held-out pairwise accuracy |"
        " minutes (pretrain + reward) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {a.preset} | {a.pretrain_steps} | {a.reward_steps} | {a.reward_args or '-'} | {100 * acc:.1f}% | "
        f"{(t1 - t0) / 60:.1f} + {(t2 - t1) / 60:.1f} |"
    )


if __name__ == "__main__":
    main()
