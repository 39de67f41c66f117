"""LoRA against full fine-tuning on tinyworld: SFT (rank 8 and 32) and PPO (reference = adapters off).

``sft``: from the same pretraining checkpoint, ``configs/sft/tinyworld.yaml`` (full fine-tuning) and the same
config with ``--model.lora.rank R`` (``configs/sft/tinyworld-lora.yaml``'s settings). Per run: trainable
parameters, size of ``last.ckpt`` (adapters and their optimizer state only, for LoRA), peak tensor memory
and median step time of a training step (measured apart, see below), final val loss, and the gold
exact-match of greedy replies to held-out tinyworld test questions (``tinyworld.rl_prompts(N, "test")``,
the pipeline's yardstick; the LoRA checkpoint is loaded as base + adapters by ``load_for_inference``).

``ppo``: from an SFT checkpoint and a reward model, ``configs/ppo/tinyworld.yaml`` as shipped and with
``--model.lora.rank R`` (the reference is then the policy with its adapters off: no deep copy), for
several seeds: gold gain over the SFT policy on the same held-out questions, and peak tensor memory of
one PPO iteration.

Peak tensor memory: every tensor created during the measured steps is counted from its creation until it is
freed (a ``TorchDispatchMode`` sees every op's outputs; a storage shared by views counts once), on top of
the tensors alive before (weights of every network, the reference copy, ...). It is the memory of tensors
(weights, gradients, optimizer state, activations, temporaries), without the allocator's overhead or
Python's own; on CPU, the process RSS is dominated by the runtime for models this small.

    python benchmarks/lora.py sft --pretrain checkpoints/pretrain/last.ckpt --workdir /tmp/lora-bench/sft
    python benchmarks/lora.py steptime --pretrain checkpoints/pretrain/last.ckpt
    python benchmarks/lora.py ppo --sft checkpoints/sft/last.ckpt --reward checkpoints/reward/last.ckpt \
        --workdir /tmp/lora-bench/ppo --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

from lit_llm.checkpoint import load_for_inference
from lit_llm.cli import run_lightning
from lit_llm.data import tinyworld
from lit_llm.evaluation import gold_score

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages: ``baseline`` tensors plus those created inside the mode."""

    def __init__(self, baseline: list[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors holding it]
        self.current = 0
        for t in baseline:
            st = t.untyped_storage()
            if st.data_ptr() not in self.live:
                self.live[st.data_ptr()] = [st.nbytes(), 1 << 60]  # never released
                self.current += st.nbytes()
        self.baseline = self.peak = self.current

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or t.device.type == "meta":
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [n, 1]
            self.current += n
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]


class StepTimer(Callback):
    """Wall time of each training step (forward, backward, optimizer step; no validation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.t0)


def bare_trainer(**kw: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",  # as lit_llm/cli/base.yaml
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kw,
    )


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


def run_cli(workdir: Path, args: list[str]) -> Any:
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return run_lightning(["fit", *args, *QUIET])
    finally:
        os.chdir(cwd)


def held_out_gold(ckpt: Path, n: int) -> float:
    model, tok, _ = load_for_inference(ckpt)
    score, _ = gold_score(model, tok, tinyworld.rl_prompts(n, "test"), tinyworld.gold_score)
    return score


# ------------------------------------------------------------------------------------------------- SFT
def sft_measure(pretrain: str, lora: dict | None, steps: int, batch_size: int, lr: float) -> dict[str, float]:
    """Median step time over ``steps`` steps, then peak tensor memory of 2 more steps (fresh module)."""
    from lit_llm.data.sft import SFTDataModule
    from lit_llm.stages.sft import SFTModule

    def module() -> tuple[SFTModule, SFTDataModule]:
        torch.manual_seed(0)
        dm = SFTDataModule(
            tokenizer=pretrain, seq_len=128, batch_size=batch_size, tinyworld_eval=0, pack=False
        )
        wd = 0.0 if lora else 0.1
        return SFTModule(init_from=pretrain, lora=lora, learning_rate=lr, warmup_steps=2, weight_decay=wd), dm

    m, dm = module()
    timer = StepTimer()
    bare_trainer(max_steps=steps, callbacks=[timer]).fit(m, datamodule=dm)
    n_train = trainable(m)
    m, dm = module()
    tracker = PeakTensorMemory(module_tensors(m))
    with tracker:
        bare_trainer(max_steps=2).fit(m, datamodule=dm)
    return {
        "step_ms": 1000 * statistics.median(timer.times[2:]),
        "peak_mib": tracker.peak / 2**20,
        "baseline_mib": tracker.baseline / 2**20,
        "trainable": n_train,
    }


def sft(a: argparse.Namespace) -> None:
    work = Path(a.workdir)
    variants: list[tuple[str, dict | None, list[str]]] = [] if a.no_full else [("full", None, [])]
    for r in a.ranks:
        lora = {
            "rank": r,
            "alpha": 2.0 * r,
            "targets": list(a.targets),
            "train_modules": list(a.train_modules),
        }
        cli = ["--model.lora", json.dumps(lora), "--model.learning_rate", str(a.lora_lr)]
        name = f"lora-r{r}-lr{a.lora_lr:g}" + "".join(f"+{m}" for m in a.train_modules)
        variants.append((name, lora, cli + ["--model.weight_decay", "0.0"]))
    rows = []
    for name, lora, extra in variants:
        t0 = time.perf_counter()
        cli = run_cli(
            work / name,
            [
                "--config",
                str(ROOT / "configs/sft/tinyworld.yaml"),
                "--model.init_from",
                str(Path(a.pretrain).resolve()),
                "--trainer.max_steps",
                str(a.steps),
                "--trainer.val_check_interval",
                str(a.steps),
                *extra,
            ],
        )
        minutes = (time.perf_counter() - t0) / 60
        ckpt = work / name / "checkpoints/sft/last.ckpt"
        row = {
            "name": name,
            "val_loss": float(cli.trainer.callback_metrics["val/loss"]),
            "ckpt_kib": ckpt.stat().st_size / 1024,
            "gold": held_out_gold(ckpt, a.eval_prompts),
            "minutes": minutes,
            **sft_measure(a.pretrain, lora, a.measure_steps, 32, a.lora_lr if lora else 1e-3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    (work / "sft_rows.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\nSFT, {a.steps} steps, batch 32, from {a.pretrain}; gold on {a.eval_prompts} held-out test questions"
    )
    print(
        "| run | trainable params | last.ckpt | peak tensor memory | step ms | val loss | gold exact-match |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['trainable']:,} | {r['ckpt_kib']:,.0f} KiB | {r['peak_mib']:.1f} MiB | "
            f"{r['step_ms']:.0f} | {r['val_loss']:.4f} | {100 * r['gold']:.1f}% |"
        )


def steptime(a: argparse.Namespace) -> None:
    """Training-step time of full fine-tuning and LoRA ranks, interleaved step by step in one process (a
    noisy machine slows all of them alike): forward, backward and AdamW step under bf16 autocast."""
    from lit_llm.data.sft import SFTDataModule
    from lit_llm.stages.sft import SFTModule

    dm = SFTDataModule(tokenizer=a.pretrain, seq_len=128, batch_size=32, tinyworld_eval=0, pack=False)
    dm.setup("fit")
    batches = [b for _, b in zip(range(a.steps), dm.train_dataloader())]
    runs = {}
    for r in [None, *a.ranks]:
        torch.manual_seed(0)
        lora = None if r is None else {"rank": r, "alpha": 2.0 * r}
        m = SFTModule(init_from=a.pretrain, lora=lora)
        m.configure_model()
        params = [p for p in m.parameters() if p.requires_grad]
        runs["full" if r is None else f"lora-r{r}"] = (m, torch.optim.AdamW(params, lr=1e-4), [])
    for i, batch in enumerate(batches):
        for m, opt, times in runs.values():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _sft_loss(m, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    full = statistics.median(runs["full"][2])
    print(f"\nSFT step time, batch 32 x 128, interleaved, median of {len(batches) - 2} steps each")
    print("| run | step ms | vs full |")
    print("|---|---|---|")
    for name, (_, _, times) in runs.items():
        med = statistics.median(times)
        print(f"| {name} | {1000 * med:.0f} | {med / full:.2f}x |")


def _sft_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lit_llm.losses import masked_lm_loss

    logits = m.model(batch["input_ids"], batch.get("positions"), batch.get("attn_mask"))
    return masked_lm_loss(logits, batch["labels"])[0]


# ------------------------------------------------------------------------------------------------- PPO
def ppo_peak(sft_ckpt: str, reward: str, lora: dict | None, lr: float) -> dict[str, float]:
    """Peak tensor memory of one PPO iteration (64 prompts, the shipped config's sizes)."""
    from lit_llm.stages.ppo import PPOModule

    torch.manual_seed(0)
    m = PPOModule(
        init_from=sft_ckpt,
        reward_model=reward,
        critic="reward_model",
        learning_rate=lr,
        critic_learning_rate=1e-4,
        max_new_tokens=48,
        ppo_epochs=2,
        minibatch_size=16,
        kl_coef=0.1,
        lora=lora,
    )
    records = tinyworld.rl_prompts(64, "train")
    tracker = PeakTensorMemory(module_tensors(m))
    with tracker:
        bare_trainer(max_epochs=1, limit_train_batches=1, gradient_clip_val=None).fit(
            m, train_dataloaders=DataLoader(records, batch_size=64, collate_fn=list)
        )
    return {
        "peak_mib": tracker.peak / 2**20,
        "baseline_mib": tracker.baseline / 2**20,
        "trainable": trainable(m),
    }


def ppo(a: argparse.Namespace) -> None:
    work = Path(a.workdir)
    sft_gold = held_out_gold(Path(a.sft), a.eval_prompts)
    print(f"SFT gold: {100 * sft_gold:.1f}%", flush=True)
    lora = {"rank": a.rank, "alpha": 2.0 * a.rank, "targets": list(a.targets)}
    variants: list[tuple[str, dict | None, float]] = [
        ("full", None, 3e-5),
        (f"lora-r{a.rank}", lora, a.lora_lr),
    ]
    rows = {}
    for name, lora_cfg, lr in variants:
        rows[name] = {
            "name": name,
            "lr": lr,
            "gains": [],
            "minutes": [],
            **ppo_peak(a.sft, a.reward, lora_cfg, lr),
        }
        print(json.dumps(rows[name]), flush=True)
    for seed in a.seeds:  # seed by seed, so that an interrupted benchmark still compares both variants
        for name, lora_cfg, lr in variants:
            extra = ["--model.lora", json.dumps(lora_cfg)] if lora_cfg else []
            t0 = time.perf_counter()
            run_cli(
                work / f"{name}-s{seed}",
                [
                    "--config",
                    str(ROOT / "configs/ppo/tinyworld.yaml"),
                    "--seed_everything",
                    str(seed),
                    "--model.init_from",
                    str(Path(a.sft).resolve()),
                    "--model.reward_model",
                    str(Path(a.reward).resolve()),
                    "--model.learning_rate",
                    str(lr),
                    "--trainer.limit_train_batches",
                    str(a.iterations),
                    "--trainer.val_check_interval",
                    str(a.iterations),
                    *extra,
                ],
            )
            rows[name]["minutes"].append((time.perf_counter() - t0) / 60)
            gold = held_out_gold(work / f"{name}-s{seed}/checkpoints/ppo/last.ckpt", a.eval_prompts)
            rows[name]["gains"].append(gold - sft_gold)
            print(json.dumps({"name": name, "seed": seed, "gold": gold, "gain": gold - sft_gold}), flush=True)
            (work / "ppo_rows.json").write_text(json.dumps({"sft_gold": sft_gold, "rows": rows}, indent=2))
    print(
        f"\nPPO, {a.iterations} iterations, seeds {a.seeds}; SFT gold {100 * sft_gold:.1f}% on {a.eval_prompts}"
    )
    print(
        "| run | lr | trainable params | peak tensor memory | tensors before the run | gold gain per seed | mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows.values():
        per_seed = ", ".join(f"{100 * g:+.1f}" for g in r["gains"])
        print(
            f"| {r['name']} | {r['lr']:g} | {r['trainable']:,} | {r['peak_mib']:.1f} MiB | "
            f"{r['baseline_mib']:.1f} MiB | {per_seed} | {100 * statistics.mean(r['gains']):+.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sft")
    s.add_argument("--pretrain", required=True)
    s.add_argument("--workdir", default="/tmp/lora-bench/sft")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    s.add_argument("--lora_lr", type=float, default=3e-3)
    s.add_argument("--measure_steps", type=int, default=12)
    s.add_argument("--no_full", action="store_true", help="only the LoRA runs (e.g. another --lora_lr)")
    s.add_argument("--train_modules", nargs="*", default=[], help="lora.train_modules, e.g. embed_tokens")
    s.add_argument("--eval_prompts", type=int, default=300)
    s.add_argument(
        "--targets",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    t = sub.add_parser("steptime")
    t.add_argument("--pretrain", required=True)
    t.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    t.add_argument("--steps", type=int, default=22)
    q = sub.add_parser("ppo")
    q.add_argument("--sft", required=True)
    q.add_argument("--reward", required=True)
    q.add_argument("--workdir", default="/tmp/lora-bench/ppo")
    q.add_argument("--rank", type=int, default=8)
    q.add_argument("--lora_lr", type=float, default=3e-4)
    q.add_argument("--iterations", type=int, default=80)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--eval_prompts", type=int, default=300)
    q.add_argument(
        "--targets",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    a = p.parse_args()
    {"sft": sft, "steptime": steptime, "ppo": ppo}[a.what](a)


if __name__ == "__main__":
    main()
