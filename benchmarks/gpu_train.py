"""Pretraining throughput and MFU on one CUDA GPU: the bare training step of ``CausalLM``, a real Lightning run.

**Bare loop.** For each (preset, mode) a fresh ``Transformer`` (``ModelConfig.from_name``) trains on random
token ids of the model's vocabulary exactly as ``CausalLM`` does: logits, ``cross_entropy(logits.float(), y)``,
backward, gradient clipping at 1.0 (the configs' ``gradient_clip_val``), AdamW with the stage's weight-decay
groups, ``zero_grad(set_to_none=True)``. Modes:

* ``fp32``: float32 weights and matmuls, TF32 off (``set_float32_matmul_precision("highest")``);
* ``tf32``: the same with TF32 tensor-core matmuls (``"high"``);
* ``bf16-mixed``: float32 weights, ``torch.autocast(bfloat16)`` (what Lightning's ``bf16-mixed`` does);
* ``bf16-mixed+compile``: the same with ``lit_llm.transforms.compile_model`` (each block's training forward
  compiled by ``torch.compile``, what ``--model.compile true`` does).

``--warmup`` steps (compilation included) are excluded; the next ``--steps`` are timed between two
``torch.cuda.synchronize()``. Tokens/s = ``batch * seq * steps / seconds``. MFU = tokens/s x
``lit_llm.callbacks.flops_per_token(model, seq)`` / peak, with the peak ``--peak-tflops`` (default 989 = H100
SXM dense bf16 tensor-core). fp32/tf32 rows also get MFU against their own precision's peak (H100 SXM: fp32
67, tf32 dense 494.7 TFLOP/s). Peak memory is ``torch.cuda.max_memory_allocated`` over the whole
configuration (weights, AdamW state, activations). An out-of-memory batch is halved and retried.

**SDPA.** ``F.scaled_dot_product_attention`` as ``Attention`` calls it for ``llama-125m`` (12 query / 4 kv heads,
head_dim 64, causal, ``enable_gqa``), bf16, forward+backward, with each backend forced through
``torch.nn.attention.sdpa_kernel`` and with the default choice; the default's kernels are named from a
``torch.profiler`` trace.

**Lightning.** Optionally (``--lightning-steps``) a real ``Trainer`` (``CausalLM``, bf16-mixed, gradient clip 1.0,
no logger or checkpoints) on the same random batches, timed the same way after its warmup steps, to compare with
the bare ``bf16-mixed`` loop.

Examples::

    python benchmarks/gpu_train.py --out gpu_train.json                     # everything on CUDA (about 3 min on an H100)
    python benchmarks/gpu_train.py --device cpu --presets tiny --batch 2 --seq 32 --steps 2 --warmup 1 \\
        --compile-backend aot_eager --sdpa-seqs 64 --sdpa-batch 1 --lightning-steps 4 --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F

from lit_llm.backbone import ModelConfig, Transformer, count_active_parameters, count_parameters
from lit_llm.callbacks import flops_per_token

MODES = ["fp32", "tf32", "bf16-mixed", "bf16-mixed+compile"]
# default batch and sequence length per preset (seq = the preset's block_size, at most 1024)
SHAPES = {"small": (64, 512), "llama-125m": (32, 1024), "llama4-tiny": (256, 256), "tiny": (64, 256)}
PEAKS_TFLOPS = {"fp32": 67.0, "tf32": 494.7}  # H100 SXM dense; bf16 is --peak-tflops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(mode: str, device: torch.device):
    if mode.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with ``Stage.configure_optimizers``' groups (decay on matrices only), without the schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))


def random_batches(n: int, batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, batch, seq + 1), generator=g)
    return [(d[:, :-1].contiguous().to(device), d[:, 1:].contiguous().to(device)) for d in data]


def train_bare(
    preset: str, mode: str, batch: int, seq: int, steps: int, warmup: int, device: torch.device, args
) -> dict[str, Any]:
    """One configuration of the bare training loop; returns its measurements."""
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    config = ModelConfig.from_name(preset)
    seq = min(seq, config.block_size) if config.pos == "learned" else seq
    model = Transformer(config).to(device).train()
    if mode.endswith("+compile"):
        from lit_llm.transforms import compile_model

        compile_model(model, backend=args.compile_backend)
    opt = make_optimizer(model)
    batches = random_batches(4, batch, seq, config.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        with autocast(mode, device):
            logits = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = step(i)
        if i == 0:
            sync(device)
            first_step_s = time.perf_counter() - t0
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    sync(device)
    dt = time.perf_counter() - t0
    tokens_per_s = batch * seq * steps / dt
    fpt = flops_per_token(model, seq)
    row = {
        "kind": "bare",
        "preset": preset,
        "mode": mode,
        "batch": batch,
        "seq": seq,
        "params": count_parameters(model),
        "active_params": count_active_parameters(model),
        "flops_per_token": fpt,
        "steps": steps,
        "warmup": warmup,
        "step_ms": 1000 * dt / steps,
        "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * fpt / 1e12,
        "first_step_s": first_step_s,
        "warmup_s": warmup_s,
        "final_loss": float(loss),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if args.peak_tflops:
        row["mfu"] = row["tflops"] / args.peak_tflops
        if mode in PEAKS_TFLOPS:
            row["mfu_own_precision"] = row["tflops"] / PEAKS_TFLOPS[mode]
    return row


def run_bare(preset: str, mode: str, device: torch.device, args) -> dict[str, Any]:
    batch, seq = SHAPES.get(preset, (8, 256))
    batch, seq = args.batch or batch, args.seq or seq
    while True:
        try:
            return train_bare(preset, mode, batch, seq, args.steps, args.warmup, device, args)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(
                f"  {preset} {mode}: out of memory at batch {batch}, retrying with {batch // 2}", flush=True
            )
            batch //= 2
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- SDPA
def sdpa_check(device: torch.device, seqs: list[int], batch: int, reps: int) -> list[dict[str, Any]]:
    """Forward+backward time of llama-125m's attention call under each forced backend and the default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = ModelConfig.from_name("llama-125m")
    H, KV, D = c.n_head, c.n_kv_head, c.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = {
        "default": None,
        "FLASH_ATTENTION": SDPBackend.FLASH_ATTENTION,
        "EFFICIENT_ATTENTION": SDPBackend.EFFICIENT_ATTENTION,
        "CUDNN_ATTENTION": SDPBackend.CUDNN_ATTENTION,
        "MATH": SDPBackend.MATH,
    }
    rows = []
    for T in seqs:
        q = torch.randn(batch, H, T, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, KV, T, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, KV, T, D, device=device, dtype=dtype, requires_grad=True)

        def fwd_bwd(q=q, k=k, v=v):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            y.sum().backward()

        # causal: half of the 4 * B * H * T^2 * D forward FLOPs; backward 2.5x the forward (FlashAttention-2)
        flops = 3.5 * 2 * batch * H * T * T * D
        for name, backend in backends.items():
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            row: dict[str, Any] = {"kind": "sdpa", "seq": T, "batch": batch, "backend": name}
            try:
                with ctx:
                    for _ in range(2):
                        fwd_bwd()
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fwd_bwd()
                    sync(device)
                ms = 1000 * (time.perf_counter() - t0) / reps
                row.update(ms=ms, tflops=flops / (ms / 1000) / 1e12)
                if name == "default" and device.type == "cuda":
                    row["kernels"] = attention_kernels(fwd_bwd)
            except Exception as e:  # a backend that refuses these inputs
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            q.grad = k.grad = v.grad = None
            rows.append(row)
            print(f"  sdpa T={T} {name}: {row.get('ms', row.get('error'))}", flush=True)
    return rows


def attention_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches that look like attention."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    keys = ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "bmm", "gemm")
    return sorted(n[:120] for n in names if any(k in n.lower() for k in keys))


# ------------------------------------------------------------------------------------------ Lightning
def run_lightning(device: torch.device, args, preset: str) -> dict[str, Any]:
    """A real ``Trainer`` fit of ``CausalLM`` (bf16-mixed) on random batches; steady-state tokens/s."""
    from lightning import Callback, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lit_llm.stages import CausalLM

    batch, seq = SHAPES.get(preset, (8, 256))
    batch, seq = args.batch or batch, args.seq or seq
    steps, warmup = args.lightning_steps, args.warmup
    config = ModelConfig.from_name(preset)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (batch * (steps + warmup), seq + 1), generator=g)
    ds = TensorDataset(data[:, :-1].contiguous(), data[:, 1:].contiguous())
    loader = DataLoader(ds, batch_size=batch, shuffle=False, pin_memory=device.type == "cuda")

    class Timer(Callback):
        t0 = t1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                sync(device)
                self.t1 = time.perf_counter()

    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    module = CausalLM(preset=preset, learning_rate=3e-4, warmup_steps=10, compile=args.lightning_compile)
    timer = Timer()
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps + warmup,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    total = time.perf_counter() - t_start
    dt = timer.t1 - timer.t0
    tps = batch * seq * steps / dt
    fpt = flops_per_token(module.model, seq)
    row = {
        "kind": "lightning",
        "preset": preset,
        "mode": "bf16-mixed" + ("+compile" if args.lightning_compile else "") + " (Trainer)",
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "warmup": warmup,
        "step_ms": 1000 * dt / steps,
        "tokens_per_s": tps,
        "tflops": tps * fpt / 1e12,
        "fit_total_s": total,
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if args.peak_tflops:
        row["mfu"] = row["tflops"] / args.peak_tflops
    return row


# ------------------------------------------------------------------------------------------------ main
def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def train_table(rows: list[dict[str, Any]], peak: float | None) -> str:
    head = (
        "| preset | mode | batch x seq | step ms | tokens/s | model TFLOP/s | MFU (vs %s) | peak mem GiB |"
        " first step s | final loss |" % (f"{peak:g} bf16" if peak else "n/a")
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['mode']} | | error: {r['error']} | | | | | | |")
            continue
        mfu = fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") is not None else "-"
        if r.get("mfu_own_precision") is not None:
            mfu += f" ({100 * r['mfu_own_precision']:.0f}% of {r['mode']} peak)"
        first = r.get("first_step_s", r.get("fit_total_s"))
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['batch']} x {r['seq']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
            f"{fmt(first, '.1f')} | {r['final_loss']:.3f} |"
        )
    return "\n".join(lines)


def sdpa_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seq | backend | fwd+bwd ms | TFLOP/s (causal) | note |", "|---:|---|---:|---:|---|"]
    for r in rows:
        note = r.get("error", "")
        if r.get("kernels"):
            note = "kernels: " + ", ".join(r["kernels"])
        lines.append(
            f"| {r['seq']} | {r['backend']} | {fmt(r.get('ms'), '.2f')} | {fmt(r.get('tflops'), '.0f')} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    p.add_argument("--presets", nargs="+", default=["small", "llama-125m"])
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--moe-preset", default="llama4-tiny", help="one extra MoE row ('' to skip)")
    p.add_argument("--moe-modes", nargs="+", default=["bf16-mixed", "bf16-mixed+compile"], choices=MODES)
    p.add_argument("--batch", type=int, default=None, help="override every preset's batch size")
    p.add_argument("--seq", type=int, default=None, help="override every preset's sequence length")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, >= 1 (compilation included)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default 989 on CUDA)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--sdpa-seqs", type=int, nargs="*", default=[1024, 2048])
    p.add_argument("--sdpa-batch", type=int, default=16)
    p.add_argument("--sdpa-reps", type=int, default=10)
    p.add_argument("--lightning-steps", type=int, default=30, help="0 skips the Trainer run")
    p.add_argument("--lightning-preset", default="llama-125m")
    p.add_argument("--lightning-compile", action="store_true")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available (use --device cpu for a smoke test)")
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 989.0
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peak_tflops": args.peak_tflops,
        "args": vars(args),
    }
    print(json.dumps({k: v for k, v in info.items() if k != "args"}), flush=True)
    results: dict[str, Any] = {"info": info, "train": [], "sdpa": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    jobs = [(preset, mode) for preset in args.presets for mode in args.modes]
    if args.moe_preset:
        jobs += [(args.moe_preset, mode) for mode in args.moe_modes]
    for preset, mode in jobs:
        print(f"train {preset} {mode} ...", flush=True)
        try:
            row = run_bare(preset, mode, device, args)
        except Exception as e:
            traceback.print_exc()
            row = {"kind": "bare", "preset": preset, "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}
        print("  " + json.dumps(row), flush=True)
        results["train"].append(row)
        save()
    if args.lightning_steps:
        print(f"lightning {args.lightning_preset} ...", flush=True)
        try:
            row = run_lightning(device, args, args.lightning_preset)
        except Exception as e:
            traceback.print_exc()
            row = {
                "kind": "lightning",
                "preset": args.lightning_preset,
                "mode": "bf16-mixed (Trainer)",
                "error": f"{type(e).__name__}: {e}"[:300],
            }
        print("  " + json.dumps(row), flush=True)
        results["train"].append(row)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.sdpa_seqs:
        print("sdpa ...", flush=True)
        results["sdpa"] = sdpa_check(device, args.sdpa_seqs, args.sdpa_batch, args.sdpa_reps)
        save()

    print(f"\n{info['device']}, torch {info['torch']} (CUDA {info['cuda']}), {info['date']}\n")
    print(train_table(results["train"], args.peak_tflops))
    if results["sdpa"]:
        print(f"\nSDPA, llama-125m attention (B={args.sdpa_batch}, 12 q / 4 kv heads, d=64, causal, GQA)\n")
        print(sdpa_table(results["sdpa"]))
    return results


if __name__ == "__main__":
    main()
