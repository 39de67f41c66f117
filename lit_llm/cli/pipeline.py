"""``lit-llm pipeline``: pretraining -> SFT -> (reward model) -> alignment on tinyworld, then a summary.

Each stage is the same ``lit-llm fit --config configs/<stage>/...`` a user would type, started from the
previous stage's ``last.ckpt``. The alignment is PPO (against the reward model), GRPO (against tinyworld's
verifier) or DPO (on preference pairs), or all three from the same SFT checkpoint (``--align all``).
Outputs land in ``<workdir>/checkpoints/`` (TensorBoard logs under ``checkpoints/logs``). The summary
compares the SFT policy and every aligned one on the *same* held-out test prompts with tinyworld's gold
reward (is the answer right?), greedy and sampled, by difficulty, with the KL of each to the SFT policy
measured the same way for all. ``--init_from MODEL`` starts the chain from a pretrained model (a Hugging Face
folder or a ``.gguf`` file) instead of pretraining one: SFT, GRPO and DPO then train LoRA adapters on it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")
ALIGN = ("ppo", "grpo", "dpo")
CONFIGS = {
    "pretrain": "pretrain/tiny.yaml",
    "sft": "sft/tinyworld.yaml",
    "reward": "reward/tinyworld.yaml",
    "ppo": "ppo/tinyworld.yaml",
    "grpo": "grpo/tinyworld.yaml",
    "dpo": "dpo/tinyworld.yaml",
}
# the chain from a real pretrained model (--init_from): no pretraining; LoRA recipes where one exists (SFT,
# GRPO, DPO; PPO's adapter config), the reward model as for our own models
PRETRAINED_CONFIGS = {
    **CONFIGS,
    "sft": "sft/smollm2-tinyworld.yaml",
    "ppo": "ppo/tinyworld-lora.yaml",
    "grpo": "grpo/smollm2-tinyworld.yaml",
    "dpo": "dpo/smollm2-tinyworld.yaml",
}
# the number each stage reports in the summary, from its last logged metrics
METRICS = {
    "pretrain": ("val/loss",),
    "sft": ("val/loss",),
    "reward": ("val/acc",),
    "ppo": ("ppo/kl", "ppo/rm_score"),
    "grpo": ("grpo/kl_seq", "grpo/reward_mean"),
    "dpo": ("val/acc", "val/margin"),
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
    "grpo": ["--model.init_from", "checkpoints/sft/last.ckpt"],
    "dpo": ["--model.init_from", "checkpoints/sft/last.ckpt"],
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
    "grpo": [
        "--trainer.limit_train_batches",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--data.batch_size",
        "4",
        "--data.val_prompts",
        "16",
        "--model.group_size",
        "4",
        "--model.minibatch_size",
        "16",
    ],
    "dpo": [
        "--trainer.max_steps",
        "5",
        "--trainer.val_check_interval",
        "5",
        "--data.tinyworld_train",
        "160",
        "--data.tinyworld_val",
        "32",
        "--data.tinyworld_eval",
        "8",
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


def stages_to_run(align: list[str], pretrained: bool = False) -> list[str]:
    """The stages of the chain for these alignment methods (the reward model only when PPO needs it; no
    pretraining when the chain starts from a pretrained model)."""
    return [*([] if pretrained else ["pretrain"]), "sft", *(["reward"] if "ppo" in align else []), *align]


def main(argv: Sequence[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="lit-llm pipeline",
        description="Run pretraining -> SFT -> (reward model) -> alignment on tinyworld and print a summary "
        "table: gold reward of every policy on the same held-out test prompts, and its KL to the SFT policy.",
    )
    p.add_argument("--workdir", default=".", help="where checkpoints/ and data_cache/ go (default: here)")
    p.add_argument("--configs", default=None, help="the configs/ folder (default: ./configs or the repo's)")
    p.add_argument("--seed", type=int, default=0, help="seed_everything for every stage")
    p.add_argument(
        "--init_from",
        default=None,
        metavar="MODEL",
        help="start the chain from a pretrained model instead of pretraining one: a Hugging Face folder or a "
        ".gguf file of the Llama family (e.g. SmolLM2-135M-Instruct); SFT, GRPO and DPO then train LoRA "
        "adapters with the model's own tokenizer and chat template (configs/*/smollm2-tinyworld.yaml)",
    )
    p.add_argument("--fast", action="store_true", help="a smoke run with tiny settings (under a minute)")
    p.add_argument("--eval_prompts", type=int, default=300, help="held-out prompts scored by the gold reward")
    p.add_argument(
        "--align",
        nargs="+",
        default=["ppo"],
        choices=[*ALIGN, "all"],
        help="how to align the SFT policy: ppo (reward model; trains one first), grpo (tinyworld's "
        "verifier), dpo (preference pairs), several, or all: each starts from the same SFT checkpoint",
    )
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
    align = list(ALIGN) if "all" in a.align else [m for m in ALIGN if m in a.align]

    import shlex

    import torch

    from lit_llm.checkpoint import load_backbone
    from lit_llm.cli.lightning import run_lightning
    from lit_llm.data import tinyworld
    from lit_llm.evaluation import gold_score, sampled_kl, score_by_difficulty

    configs = find_configs(a.configs)
    pretrained = None
    if a.init_from is not None:
        pretrained = Path(a.init_from).resolve()  # the stages run inside --workdir
        if not pretrained.exists():
            raise FileNotFoundError(f"--init_from {a.init_from}: no such folder or file")
        if "pretrain" in a.skip:
            raise SystemExit("error: --init_from replaces pretraining; drop --skip pretrain")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    rows: dict[str, Any] = {"minutes": {}, "align": align, "init_from": a.init_from}
    try:
        for stage in stages_to_run(align, pretrained is not None):
            ckpt = Path(f"checkpoints/{stage}/last.ckpt")
            if stage in a.skip:
                if not ckpt.is_file():
                    raise FileNotFoundError(f"--skip {stage}: {ckpt} does not exist")
                continue
            config, init = CONFIGS[stage], INIT[stage]
            if pretrained is not None:
                # the recipes name their own folders; the chain keeps checkpoints/<stage>/ as for ours
                config = PRETRAINED_CONFIGS[stage]
                init = [*init, "--trainer.default_root_dir", f"checkpoints/{stage}"]
                if stage == "sft":
                    init = ["--model.init_from", str(pretrained), *init[2:]]
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
            for key in METRICS[stage]:
                rows[f"{stage}_{key.replace('/', '_')}"] = _metric(cli, key)
        # the keys earlier summaries had (benchmarks read them)
        rows.update(
            pretrain_val_loss=rows.get("pretrain_val_loss"),
            sft_val_loss=rows.get("sft_val_loss"),
            reward_val_acc=rows.get("reward_val_acc"),
            ppo_kl=rows.get("ppo_ppo_kl"),
            ppo_rm_score=rows.get("ppo_ppo_rm_score"),
        )
        records = tinyworld.rl_prompts(8 if a.fast else a.eval_prompts, "test")
        prompts = [r["prompt"] for r in records]
        sft, _, _ = load_backbone("checkpoints/sft/last.ckpt")
        for name in ("sft", *align):
            model, tok, _ = load_backbone(f"checkpoints/{name}/last.ckpt")
            rows[f"{name}_gold"], replies = gold_score(model, tok, records, tinyworld.gold_score)
            rows[f"{name}_gold_by_difficulty"] = score_by_difficulty(records, replies, tinyworld.gold_score)
            torch.manual_seed(a.seed)
            rows[f"{name}_gold_sampled"], _ = gold_score(
                model, tok, records, tinyworld.gold_score, temperature=1.0
            )
            if name != "sft":
                gen = torch.Generator().manual_seed(a.seed)
                rows[f"{name}_kl_sft"] = sampled_kl(model, sft, tok, prompts, generator=gen)
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
    if rows.get("init_from"):
        t.add_row("pretrained", f"from {rows['init_from']}", "-")
    else:
        t.add_row("pretrain", f"val loss {fmt(rows.get('pretrain_val_loss'))}", f"{m.get('pretrain', 0):.1f}")
    t.add_row(
        "sft",
        f"val loss {fmt(rows.get('sft_val_loss'))}; gold {fmt(rows['sft_gold'], True)} greedy, "
        f"{fmt(rows['sft_gold_sampled'], True)} sampled at T=1",
        f"{m.get('sft', 0):.1f}",
    )
    if "reward" in m or rows.get("reward_val_acc") is not None:
        t.add_row(
            "reward",
            f"held-out pairwise accuracy {fmt(rows.get('reward_val_acc'), True)}",
            f"{m.get('reward', 0):.1f}",
        )
    for name in rows["align"]:
        change = 100 * (rows[f"{name}_gold"] - rows["sft_gold"])
        t.add_row(
            name,
            f"gold {fmt(rows[f'{name}_gold'], True)} greedy ({change:+.1f} points), "
            f"{fmt(rows[f'{name}_gold_sampled'], True)} sampled; KL to SFT {fmt(rows.get(f'{name}_kl_sft'))} nats",
            f"{m.get(name, 0):.1f}",
        )
    t.add_row("total", "", f"{sum(m.values()):.1f}")
    Console().print(t)
    levels = sorted({d for name in ("sft", *rows["align"]) for d in rows[f"{name}_gold_by_difficulty"]})
    d = Table(title="gold (greedy) by question difficulty")
    d.add_column("policy")
    for level in levels:
        d.add_column(f"difficulty {level}", justify="right")
    for name in ("sft", *rows["align"]):
        by = rows[f"{name}_gold_by_difficulty"]
        d.add_row(name, *(fmt(by.get(level), True) for level in levels))
    Console().print(d)
