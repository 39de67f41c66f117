"""Muon vs AdamW on nanoGPT's CPU setting (tinyshakespeare, char, 4 layers x 128, context 64, batch 12).

A bare PyTorch loop (no Lightning: only the optimizer differs between runs) trains ``gpt-char-baby`` with
the optimizer the stages build (``lit_llm.optim.build_optimizer``), the stages' warmup + cosine schedule
(``lit_llm.stages.base.lr_lambda``) and gradient clipping. Every run of a seed sees the same initial weights
and the same batches (a seeded shuffle). Every ``--eval-every`` steps it measures the val loss on the first
``--eval-batches`` validation batches (the curve), and at the end on up to ``--val-batches`` (the figure).

Printed per run: final val loss, training ms/step (steady state, evaluation excluded), and the curve.
The summary gives, for each Muon run, the first step at which its curve reaches the final curve value of
the reference AdamW runs (mean over the seeds of the AdamW configuration with the lowest final val loss).

Examples::

    python benchmarks/optimizers.py --steps 50 --eval-every 25 --eval-batches 5 --val-batches 10  # check
    python benchmarks/optimizers.py --threads 1 --steps 600 --adamw-lr 1e-3 2e-3 4e-3 --muon-lr 3e-3 1e-2 3e-2
    python benchmarks/optimizers.py --threads 1 --adamw-lr 2e-3 --muon-lr 1e-2 --seeds 1337 1338
    python benchmarks/optimizers.py --threads 1 --adamw-lr 2e-3 --muon-lr 1e-2 --timing-steps 300  # wall time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.data.text import TextDataModule
from lit_llm.losses import next_token_loss
from lit_llm.optim import build_optimizer
from lit_llm.stages.base import lr_lambda

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, max_batches: int) -> float:
    """Mean next-token loss (float32) over the first ``max_batches`` validation batches."""
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(loader):
        if i >= max_batches:
            break
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def train(args, dm: TextDataModule, optimizer: str, lr: float, muon_lr: float | None, seed: int) -> dict:
    """One run: returns the val curve, the final val loss and the training step times."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name(args.preset, vocab_size=dm.vocab_size, block_size=args.seq_len))
    opt = build_optimizer(
        model,
        optimizer,
        lr=lr,
        weight_decay=args.weight_decay,
        betas=(args.beta1, args.beta2),
        muon_lr=muon_lr,
        muon_momentum=args.muon_momentum,
        muon_adjust_lr=args.muon_adjust_lr,
    )
    warmup = min(args.warmup, args.steps - 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup, args.steps, args.min_lr_ratio)
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(dm.train_set, args.batch_size, shuffle=True, drop_last=True, generator=order)
    batches = iter(loader)
    val_loader = dm.val_dataloader()
    curve, times = [], []
    for step in range(1, args.steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:  # next epoch, reshuffled by the seeded generator
            batches = iter(loader)
            x, y = next(batches)
        t0 = time.perf_counter()
        train_step(model, opt, params, x, y, args.grad_clip)
        sched.step()
        times.append(time.perf_counter() - t0)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val_loader, args.eval_batches)))
            print(
                f"    [{optimizer} lr {lr} muon_lr {muon_lr} seed {seed}] step {step} val {curve[-1][1]:.4f}"
            )
            sys.stdout.flush()
    steady = times[10:] or times
    return {
        "optimizer": optimizer,
        "lr": lr,
        "muon_lr": muon_lr,
        "seed": seed,
        "curve": curve,
        "val_loss": evaluate(model, val_loader, args.val_batches),
        "ms_per_step": 1000 * sum(steady) / len(steady),
        "median_ms_per_step": 1000 * statistics.median(steady),
    }


def train_step(model, opt, params, x, y, grad_clip: float) -> None:
    """One optimizer step on the next-token loss of ``(x, y)``, gradients clipped to ``grad_clip``."""
    loss = next_token_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def lockstep_timing(args, dm: TextDataModule, muon_lr: float, steps: int) -> dict[str, float]:
    """Median ms per training step of AdamW and Muon, alternating one step of each on two copies of the
    model with the same batch, so both see the same load from other processes on the machine."""
    torch.manual_seed(args.seeds[0])
    cfg = ModelConfig.from_name(args.preset, vocab_size=dm.vocab_size, block_size=args.seq_len)
    runs = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(args.seeds[0])
        model = Transformer(cfg)
        lr = args.adamw_lr[0] if name == "adamw" else (args.muon_adam_lr or args.adamw_lr[0])
        opt = build_optimizer(model, name, lr, args.weight_decay, (args.beta1, args.beta2), muon_lr=muon_lr)
        runs[name] = (model, opt, [p for g in opt.param_groups for p in g["params"]], [])
    loader = DataLoader(dm.train_set, args.batch_size, shuffle=True, drop_last=True)
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        for model, opt, params, times in runs.values():
            t0 = time.perf_counter()
            train_step(model, opt, params, x, y, args.grad_clip)
            times.append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(r[3][10:]) for name, r in runs.items()}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose val loss is at or below ``target`` (None if never)."""
    return next((s for s, v in curve if v <= target), None)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="tinyshakespeare.txt (skipped if absent)")
    p.add_argument("--cache-dir", default=str(REPO / "benchmarks" / ".cache" / "data"))
    p.add_argument("--preset", default="gpt-char-baby")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--adamw-lr", type=float, nargs="*", default=[1e-3], help="AdamW runs, one per lr")
    p.add_argument(
        "--muon-lr",
        type=float,
        nargs="*",
        default=[1e-2],
        help="Muon runs, one per Muon lr (the Adam part of a Muon run uses --muon-adam-lr)",
    )
    p.add_argument("--muon-adam-lr", type=float, default=None, help="default: the first --adamw-lr")
    p.add_argument("--muon-momentum", type=float, default=0.95)
    p.add_argument("--muon-adjust-lr", choices=["original", "match_rms_adamw"], default="match_rms_adamw")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=40, help="val batches of each curve point")
    p.add_argument("--val-batches", type=int, default=200, help="at most this many val batches at the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--timing-steps",
        type=int,
        default=0,
        help="only time: N steps of AdamW and Muon (first --muon-lr) alternating, median ms/step",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.data).is_file():
        print(f"SKIP: {args.data} not found (pass --data PATH to tinyshakespeare.txt)")
        return 0
    dm = TextDataModule(
        args.data,
        tokenizer_kind="char",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        val_fraction=0.1,
        cache_dir=args.cache_dir,
    )
    dm.prepare_data()
    dm.setup("fit")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {vars(args)}")
    if args.timing_steps:
        ms = lockstep_timing(args, dm, args.muon_lr[0], args.timing_steps)
        print(
            f"lockstep median ms/step: AdamW {ms['adamw']:.1f}, Muon {ms['muon']:.1f} ({ms['muon'] / ms['adamw']:.3f}x)"
        )
        return 0
    adam_part = args.muon_adam_lr if args.muon_adam_lr is not None else (args.adamw_lr or [1e-3])[0]
    runs = [("adamw", lr, None) for lr in args.adamw_lr] + [("muon", adam_part, m) for m in args.muon_lr]
    results = []
    for seed in args.seeds:
        for optimizer, lr, muon_lr in runs:
            r = train(args, dm, optimizer, lr, muon_lr, seed)
            results.append(r)
            print(
                f"  {optimizer} lr {lr} muon_lr {muon_lr} seed {seed}: val {r['val_loss']:.4f}, "
                f"{r['ms_per_step']:.1f} ms/step mean, {r['median_ms_per_step']:.1f} median"
            )
            sys.stdout.flush()

    print("\n| optimizer | lr | muon lr | seeds | val loss (each) | mean | ms/step (mean, median) |")
    print("|---|---:|---:|---|---|---:|---:|")
    configs: dict[tuple, list[dict]] = {}
    for r in results:
        configs.setdefault((r["optimizer"], r["lr"], r["muon_lr"]), []).append(r)
    for (optimizer, lr, muon_lr), rs in configs.items():
        vals = [r["val_loss"] for r in rs]
        ms = statistics.median(r["ms_per_step"] for r in rs)
        med = statistics.median(r["median_ms_per_step"] for r in rs)
        print(
            f"| {optimizer} | {lr} | {muon_lr or '-'} | {len(rs)} | {' / '.join(f'{v:.4f}' for v in vals)} "
            f"| {statistics.mean(vals):.4f} | {ms:.1f}, {med:.1f} |"
        )
    adamw = {k: v for k, v in configs.items() if k[0] == "adamw"}
    if adamw:
        best = min(adamw.values(), key=lambda rs: statistics.mean(r["val_loss"] for r in rs))
        target = statistics.mean(r["curve"][-1][1] for r in best)
        ms_adamw = statistics.median(r["ms_per_step"] for r in best)
        print(
            f"\nreference: AdamW lr {best[0]['lr']}, curve val at step {args.steps} = {target:.4f} "
            f"(mean of {len(best)} seeds, first {args.eval_batches} val batches)"
        )
        for r in results:
            if r["optimizer"] != "muon":
                continue
            s = steps_to_reach(r["curve"], target)
            frac = f"{s / args.steps:.0%} of the steps" if s else "never"
            wall = f", {s * r['ms_per_step'] / (args.steps * ms_adamw):.0%} of AdamW's wall time" if s else ""
            print(f"  muon lr {r['muon_lr']} seed {r['seed']}: reaches it at step {s} ({frac}{wall})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
