"""nanoGPT's CPU setting on tinyshakespeare: final validation loss, and Lightning's per-step overhead.

The same model (same init seed), the same batches in the same order, the same AdamW / warmup + cosine
schedule / gradient clipping and the same autocast are trained twice in one process:

* ``lightning``: ``lightning.Trainer`` fitting ``lit_llm.stages.CausalLM`` (no logger, no checkpoints, no
  progress bar, no sanity check, no validation during training);
* ``bare``: a hand-written PyTorch loop.

It prints ms/step for both (steady state, after ``--warmup-steps-timing`` steps), their ratio, the final
validation loss (mean token loss over the held-out last 10% of the text, float32) and a check that both runs
saw the same training losses. Runs alternate lightning/bare (``--repeats`` > 1 gives medians).

nanoGPT's reference (``train.py config/train_shakespeare_char.py --device=cpu --compile=False
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0``) reaches val loss ~1.89 at ~60 ms/step on this kind of machine.

Examples::

    python benchmarks/pretrain_shakespeare.py --steps 50 --val-batches 20     # quick check
    python benchmarks/pretrain_shakespeare.py --precision 32-true bf16-mixed  # the full benchmark
    python benchmarks/pretrain_shakespeare.py --preset gpt2-char-baby --skip-lightning
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from lit_llm.backbone import ModelConfig, Transformer, count_parameters
from lit_llm.data.text import TextDataModule
from lit_llm.stages.base import lr_lambda

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def nanogpt_param_count(vocab: int = 65, block: int = 64, n_layer: int = 4, d: int = 128) -> tuple[int, int]:
    """nanoGPT's GPT (bias=False, tied head): (all parameters, what nanoGPT prints = without wpe)."""
    per_layer = 2 * d + 12 * d * d  # ln_1, ln_2 weights; c_attn 3d^2, c_proj d^2, c_fc 4d^2, c_proj 4d^2
    total = n_layer * per_layer + vocab * d + block * d + d  # blocks, wte (tied head), wpe, ln_f
    return total, total - block * d


class EpochPermutation(Sampler[int]):
    """A random order of ``n`` indices that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch; the bare loop does the same, so both see the
    same batches in every epoch, however often either of them creates an iterator.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class SeededTextDataModule(TextDataModule):
    """``TextDataModule`` whose training order is :class:`EpochPermutation` instead of the global RNG.

    The stock loader shuffles with the global RNG at the moment its iterator is created, which Lightning and
    a bare loop reach at different points; a seeded per-epoch order gives both runs exactly the same batches.
    """

    def __init__(self, *args, order_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order_seed = order_seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            self.batch_size,
            sampler=EpochPermutation(len(self.train_set), self.order_seed),
            drop_last=True,
            num_workers=self.num_workers,
        )


def autocast_ctx(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "32-true":
        return contextlib.nullcontext()
    raise ValueError(f"unsupported precision {precision!r} (32-true or bf16-mixed)")


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, max_batches: int) -> tuple[float, int]:
    """Mean next-token loss (float32) over up to ``max_batches`` validation batches; (loss, batches)."""
    was_training = model.training
    model.eval()
    total, count, n = 0.0, 0, 0
    for x, y in loader:
        if n >= max_batches:
            break
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
        n += 1
    model.train(was_training)
    return total / count, n


def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig.from_name(args.preset, **overrides(args, vocab_size))


def overrides(args, vocab_size: int) -> dict:
    out = {"vocab_size": vocab_size, "block_size": args.seq_len}
    if args.dropout is not None:
        out["dropout"] = args.dropout
    return out


# --------------------------------------------------------------------------------------------------- bare
class BareLoop:
    """The hand-written loop, one step at a time: same model init, batches, AdamW groups, schedule, clipping."""

    def __init__(self, args, dm: SeededTextDataModule, precision: str) -> None:
        self.precision = precision
        torch.manual_seed(args.seed)
        self.model = Transformer(model_config(args, dm.vocab_size))
        self.init = {k: v.clone() for k, v in self.model.state_dict().items()}
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(args.beta1, args.beta2),
        )
        # clip in the optimizer's parameter order, as Lightning does (the norm's summation order matters)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        total = args.steps
        warmup = min(args.warmup, max(total - 1, 0))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_lambda(s, warmup, total, args.min_lr_ratio)
        )
        self.clip = args.grad_clip
        self.loader = dm.train_dataloader()
        self.epoch = 0
        self.loader.sampler.set_epoch(self.epoch)
        self.batches = iter(self.loader)
        self.model.train()

    def step(self) -> torch.Tensor:
        try:
            x, y = next(self.batches)
        except StopIteration:  # next epoch, reshuffled as Lightning does: sampler.set_epoch(epoch)
            self.epoch += 1
            self.loader.sampler.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            x, y = next(self.batches)
        with autocast_ctx(self.precision):
            logits = self.model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        return loss.detach()


def run_bare(args, dm: SeededTextDataModule, precision: str) -> dict:
    t0 = time.perf_counter()
    loop = BareLoop(args, dm, precision)
    torch.manual_seed(args.seed + 1)  # dropout masks
    times, losses = [time.perf_counter()], []
    for _ in range(args.steps):
        losses.append(loop.step())
        times.append(time.perf_counter())
        progress(args, "bare", precision, len(losses), losses[-1])
    wall = time.perf_counter() - t0
    val, nb = evaluate(loop.model, dm.val_dataloader(), args.val_batches)
    return result("bare", precision, step_times(times), losses, wall, val, nb, args, loop.init)


# ---------------------------------------------------------------------------------------------- lightning
def run_lightning(args, dm: SeededTextDataModule, precision: str, lockstep: bool = False) -> list[dict]:
    """Fit ``CausalLM`` with ``lightning.Trainer``.

    With ``lockstep`` a bare loop runs one step inside the callback after every Lightning step, so the two
    alternate step by step and share whatever the other processes on the machine do to the CPU. Each side
    keeps its own global RNG state (dropout), swapped in and out around the bare step.
    """
    import lightning as L

    from lit_llm.stages import CausalLM

    class Lockstep(L.Callback):
        def __init__(self) -> None:
            self.lt: list[float] = []  # lightning step durations
            self.bt: list[float] = []  # bare step durations
            self.ll: list[torch.Tensor] = []
            self.bl: list[torch.Tensor] = []
            self.bare: BareLoop | None = None
            self.bare_rng: torch.Tensor | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            if lockstep:
                self.bare = BareLoop(args, dm, precision)
                torch.manual_seed(args.seed + 1)
                self.bare_rng = torch.get_rng_state()
            torch.manual_seed(args.seed + 1)  # dropout masks, same as the bare loop
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            t = time.perf_counter()
            self.lt.append(t - self.mark)
            self.ll.append(outputs["loss"].detach())
            if self.bare is not None:
                rng = torch.get_rng_state()
                torch.set_rng_state(self.bare_rng)
                with torch.enable_grad():
                    self.bl.append(self.bare.step())
                self.bare_rng = torch.get_rng_state()
                torch.set_rng_state(rng)
                t2 = time.perf_counter()
                self.bt.append(t2 - t)
            progress(args, "lightning" + ("+bare" if lockstep else ""), precision, len(self.lt), self.ll[-1])
            self.mark = time.perf_counter()

    torch.manual_seed(args.seed)
    ov = overrides(args, dm.vocab_size)
    module = CausalLM(
        preset=args.preset,
        model_overrides={k: v for k, v in ov.items() if k not in ("vocab_size", "block_size")},
        vocab_size=ov["vocab_size"],
        block_size=ov["block_size"],
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        betas=(args.beta1, args.beta2),
        warmup_steps=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
    )
    init = {k: v.clone() for k, v in module.model.state_dict().items()}
    cb = Lockstep()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        precision=precision,
        gradient_clip_val=args.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # validation only at the end, below (same function as the bare run)
        callbacks=[cb],
        default_root_dir=str(REPO / "benchmarks" / ".cache" / "lightning"),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    wall_l = wall - sum(cb.bt)  # the bare steps ran inside fit
    val, nb = evaluate(module.model, dm.val_dataloader(), args.val_batches)
    out = [result("lightning", precision, cb.lt, cb.ll, wall_l, val, nb, args, init)]
    if cb.bare is not None:
        val, nb = evaluate(cb.bare.model, dm.val_dataloader(), args.val_batches)
        out.append(result("bare", precision, cb.bt, cb.bl, sum(cb.bt), val, nb, args, cb.bare.init))
    return out


def progress(args, kind: str, precision: str, step: int, loss: torch.Tensor) -> None:
    if args.log_every and step % args.log_every == 0:
        print(f"    [{kind} {precision}] step {step}/{args.steps} loss {float(loss):.4f}", flush=True)


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def result(kind, precision, durations, losses, wall, val, nb, args, init) -> dict:
    steps = len(durations)
    steady = durations[min(args.warmup_steps_timing, max(steps - 1, 0)) :]
    return {
        "kind": kind,
        "precision": precision,
        "steps": steps,
        "ms_per_step": 1000 * sum(steady) / max(1, len(steady)),
        "median_ms_per_step": 1000 * statistics.median(steady) if steady else math.nan,
        "wall_ms_per_step": 1000 * wall / max(1, steps),
        "val_loss": val,
        "val_batches": nb,
        "final_train_loss": float(torch.stack(losses[-50:]).float().mean()) if losses else float("nan"),
        "losses": [float(v) for v in losses],
        "durations": durations,
        "_init": init,
    }


# --------------------------------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="tinyshakespeare.txt (skipped if absent)")
    p.add_argument("--cache-dir", default=str(REPO / "benchmarks" / ".cache" / "data"))
    p.add_argument("--preset", default="gpt-char-baby")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--skip-lightning", action="store_true")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument(
        "--mode",
        choices=["lockstep", "sequential"],
        default="lockstep",
        help="lockstep: one bare step after each Lightning step inside the same fit (fair under CPU noise); "
        "sequential: whole runs back to back",
    )
    p.add_argument("--repeats", type=int, default=1, help="repeat (sequential mode alternates the order)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-batches", type=int, default=200, help="at most this many val batches")
    p.add_argument("--warmup-steps-timing", type=int, default=10, help="steps left out of ms/step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    if not Path(args.data).is_file():
        print(f"SKIP: {args.data} not found (pass --data PATH to tinyshakespeare.txt)")
        return 0
    if args.skip_lightning and args.skip_bare:
        print("nothing to run: both --skip-lightning and --skip-bare given")
        return 2

    dm = SeededTextDataModule(
        args.data,
        tokenizer_kind="char",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        val_fraction=0.1,
        cache_dir=args.cache_dir,
        order_seed=args.seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    cfg = model_config(args, dm.vocab_size)
    n_ours = count_parameters(Transformer(cfg))
    n_nano, n_nano_printed = nanogpt_param_count(65, args.seq_len)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; data {args.data}: "
        f"{len(dm.train_set)} train / {len(dm.val_set)} val sequences of {args.seq_len}, vocab {dm.vocab_size}"
    )
    print(
        f"params: {args.preset} = {n_ours:,} (norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp}, "
        f"dropout={cfg.dropout}); nanoGPT baby = {n_nano:,} ({n_nano_printed:,} without wpe, as it prints)"
    )
    print(
        f"hparams: steps {args.steps}, AdamW lr {args.lr} betas ({args.beta1}, {args.beta2}) wd "
        f"{args.weight_decay}, warmup {args.warmup}, cosine to {args.min_lr_ratio}x, clip {args.grad_clip}"
    )
    sys.stdout.flush()

    kinds = [k for k in ("lightning", "bare") if not getattr(args, f"skip_{k}")]
    mode = args.mode if len(kinds) == 2 else "sequential"
    print(f"mode: {mode}" + (" (a bare step after every Lightning step)" if mode == "lockstep" else ""))
    sys.stdout.flush()
    results: list[dict] = []
    for precision in args.precision:
        for r in range(args.repeats):
            if mode == "lockstep":
                batch = run_lightning(args, dm, precision, lockstep=True)
            else:
                batch = []
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    batch += (
                        run_lightning(args, dm, precision)
                        if kind == "lightning"
                        else [run_bare(args, dm, precision)]
                    )
            for res in batch:
                res["repeat"] = r
                results.append(res)
                print(
                    f"  {precision:>10} {res['kind']:>9} #{r}: {res['ms_per_step']:7.2f} ms/step mean, "
                    f"{res['median_ms_per_step']:7.2f} median, {res['wall_ms_per_step']:7.2f} incl. setup; "
                    f"val loss {res['val_loss']:.4f} ({res['val_batches']} batches), "
                    f"train loss (last 50) {res['final_train_loss']:.4f}"
                )
            sys.stdout.flush()

    # ------------------------------------------------------------------------------------------ summary
    print()
    print(
        "| preset | precision | runner | ms/step (mean) | ms/step (median) | val loss | "
        "lightning/bare (mean) | lightning/bare (median) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    summary = []
    for precision in args.precision:
        rows = {}
        for kind in kinds:
            rs = [r for r in results if r["precision"] == precision and r["kind"] == kind]
            rows[kind] = {
                "ms": statistics.median(r["ms_per_step"] for r in rs),
                "median_ms": statistics.median(r["median_ms_per_step"] for r in rs),
                "val": statistics.median(r["val_loss"] for r in rs),
            }
        both = len(rows) == 2
        ratio = rows["lightning"]["ms"] / rows["bare"]["ms"] if both else math.nan
        ratio_med = rows["lightning"]["median_ms"] / rows["bare"]["median_ms"] if both else math.nan
        for kind in kinds:
            print(
                f"| {args.preset} | {precision} | {kind} | {rows[kind]['ms']:.1f} | {rows[kind]['median_ms']:.1f} "
                f"| {rows[kind]['val']:.4f} | {ratio:.3f} | {ratio_med:.3f} |"
            )
        check = ""
        if both:
            a = next(r for r in results if r["precision"] == precision and r["kind"] == "lightning")
            b = next(r for r in results if r["precision"] == precision and r["kind"] == "bare")
            same_init = all(torch.equal(a["_init"][k], b["_init"][k]) for k in a["_init"])
            n = min(len(a["losses"]), len(b["losses"]))
            first = next((i for i in range(n) if a["losses"][i] != b["losses"][i]), None)
            maxdiff = max(abs(x - y) for x, y in zip(a["losses"][:n], b["losses"][:n])) if n else 0.0
            check = (
                f"same init weights: {same_init}; train losses bitwise identical for the first "
                f"{n if first is None else first} of {n} steps, max |diff| {maxdiff:.2e}"
            )
        summary.append(
            {"precision": precision, **rows, "ratio": ratio, "ratio_median": ratio_med, "check": check}
        )
    for s in summary:
        if s["check"]:
            print(f"{s['precision']}: {s['check']}")
    if len(kinds) == 2:
        print(
            "Lightning overhead (target < 5%): "
            + ", ".join(
                f"{s['precision']}: {100 * (s['ratio'] - 1):+.1f}% (mean), {100 * (s['ratio_median'] - 1):+.1f}% "
                "(median)"
                for s in summary
            )
        )
    vals = [s[k]["val"] for s in summary for k in kinds]
    print(f"val loss (target <= 1.75): best {min(vals):.4f}; params {n_ours:,} vs nanoGPT {n_nano:,}")
    if args.json:
        for r in results:
            r.pop("_init", None)
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "params": n_ours, "results": results, "summary": summary})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
