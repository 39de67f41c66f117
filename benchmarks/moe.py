"""Mixture-of-Experts: the grouped MoE layer against naive dispatch, and tiny MoE against tiny dense.

**Layer** (``--part layer``). One ``lit_llm.backbone.moe.MoE`` layer (random weights, float32), fed the
same random tokens through four dispatch schemes that share its router and weights:

* ``grouped/loop``: ours: sort the (token, choice) pairs by expert, one matmul per expert on its
  contiguous segment, one ``index_add`` back (the CPU default);
* ``grouped/grouped_mm``: ours with ``torch.nn.functional.grouped_mm`` (the CUDA default; on CPU torch
  runs a reference kernel);
* ``naive``: a loop over experts that finds each expert's tokens with a boolean mask (``torch.where``),
  gathers, computes, scatters back (the classic Mixtral-style reference);
* ``dense``: every expert on every token, unchosen gates zero (how Hugging Face's Llama 4 computes it:
  ``E / k`` times the FLOPs).

All outputs are checked equal to ``grouped/loop``. Tokens/s for forward and forward+backward; the schemes
run interleaved (order rotated each repetition) and the table gives medians, so a noisy machine slows
all of them alike; the ratio column is against ``naive``.

**Training** (``--part train``). ``llama4-tiny`` (MoE, 1.6M parameters, 0.8M active) against ``tiny``
(dense, 0.8M) on tinyworld: the same batches, AdamW, warmup + cosine schedule, float32, the MoE model
adding ``moe_aux_losses``. Steps alternate between the two models; it reports validation loss (mean over
the whole validation split) and training tokens/s for each.

Examples::

    python benchmarks/moe.py                          # both parts
    python benchmarks/moe.py --part layer --reps 3    # quick
    python benchmarks/moe.py --part train --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_llm.backbone import ModelConfig, Transformer, count_active_parameters, count_parameters
from lit_llm.backbone.moe import MoE, moe_aux_losses


# ------------------------------------------------------------------------------------------ the layer
def naive_per_expert(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Loop over experts; each finds its tokens with a mask, computes them, scatters them back."""
    B, T, C = x.shape
    flat = x.reshape(-1, C)
    _, top_idx, gates = moe.route(flat)  # (N, k), (N, k)
    out = torch.zeros_like(flat)
    w1, w2 = moe.experts.gate_up_proj.unbind(0), moe.experts.down_proj.unbind(0)  # as ours (see moe.py)
    for e in range(moe.n_expert):
        token, slot = torch.where(top_idx == e)  # tokens that chose e, and in which of their k slots
        if token.numel() == 0:
            continue
        g = gates[token, slot][:, None]
        inp = flat[token] * g if moe.weight_input else flat[token]
        a, b = (inp @ w1[e]).chunk(2, dim=-1)
        y = (F.silu(a) * b) @ w2[e]
        out.index_add_(0, token, y if moe.weight_input else y * g)
    if moe.shared_expert is not None:
        out = out + moe.shared_expert(flat)
    return out.view(B, T, C)


def dense_all_experts(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token with zero gates where unchosen (``E`` batched matmuls, no dispatch)."""
    B, T, C = x.shape
    flat = x.reshape(-1, C)
    _, top_idx, gates = moe.route(flat)
    full = torch.zeros(flat.shape[0], moe.n_expert).scatter(1, top_idx, gates)  # (N, E)
    inp = flat[None].expand(moe.n_expert, -1, -1)  # (E, N, C)
    if moe.weight_input:
        inp = inp * full.T[:, :, None]
    a, b = torch.bmm(inp, moe.experts.gate_up_proj).chunk(2, dim=-1)  # (E, N, H) each
    y = torch.bmm(F.silu(a) * b, moe.experts.down_proj)  # (E, N, C)
    if not moe.weight_input:
        y = y * full.T[:, :, None]
    out = y.sum(0)
    if moe.shared_expert is not None:
        out = out + moe.shared_expert(flat)
    return out.view(B, T, C)


def ours(impl: str) -> Callable[[MoE, torch.Tensor], torch.Tensor]:
    def run(moe: MoE, x: torch.Tensor) -> torch.Tensor:
        moe.experts.impl = impl  # type: ignore[assignment]
        return moe(x)

    return run


def bench_layer(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    routings = {
        "top-2 softmax": dict(moe_top_k=2, moe_score="softmax", moe_shared_expert=False),
        "top-1 sigmoid + shared": dict(moe_top_k=1, moe_score="sigmoid", moe_weight_input=True),
    }
    schemes: dict[str, Callable[[MoE, torch.Tensor], torch.Tensor]] = {
        "grouped/loop": ours("loop"),
        "naive": naive_per_expert,
        "dense": dense_all_experts,
    }
    if hasattr(F, "grouped_mm"):
        schemes["grouped/grouped_mm"] = ours("grouped_mm")
    print(
        f"\n## MoE layer: width {args.width}, expert hidden {args.hidden}, float32, "
        f"{torch.get_num_threads()} thread(s), median of {args.reps}\n"
    )
    print(
        "| experts | tokens | routing | scheme | fwd tok/s | fwd+bwd tok/s | fwd vs naive | fwd+bwd vs naive |"
    )
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for n_expert in args.experts:
        for n_tok in args.tokens:
            for label, routing in routings.items():
                row = bench_one(args, dict(schemes), n_expert, n_tok, routing)
                for name, (f, b, rf, rb) in row.items():
                    print(
                        f"| {n_expert} | {n_tok} | {label} | {name} | {n_tok / f:,.0f} | {n_tok / b:,.0f} "
                        f"| {rf:.2f}x | {rb:.2f}x |",
                        flush=True,
                    )


def bench_one(
    args: argparse.Namespace,
    schemes: dict[str, Callable[[MoE, torch.Tensor], torch.Tensor]],
    n_expert: int,
    n_tok: int,
    routing: dict,
) -> dict[str, tuple[float, float, float, float]]:
    """Median seconds (fwd, fwd+bwd) and speed-ups against ``naive`` for each scheme."""
    cfg = ModelConfig(
        vocab_size=8,
        n_embd=args.width,
        n_head=4,
        moe_n_expert=n_expert,
        moe_intermediate_size=args.hidden,
        **routing,
    )
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    x = torch.randn(1, n_tok, args.width)
    with torch.no_grad():
        ref = ours("loop")(moe, x)
        for name, fn in list(schemes.items()):
            if name == "dense" and n_expert * n_tok > args.dense_limit:
                del schemes[name]  # E x the FLOPs: too slow to time at this size
                continue
            torch.testing.assert_close(fn(moe, x), ref, atol=1e-4, rtol=1e-4, msg=f"{name} differs")
    fwd: dict[str, list[float]] = {n: [] for n in schemes}
    bwd: dict[str, list[float]] = {n: [] for n in schemes}
    names = list(schemes)
    inner = max(1, 2048 // n_tok)  # repeat small calls so each timing spans a few milliseconds
    for rep in range(args.reps + 1):  # the first round warms up
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            fn = schemes[name]
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(inner):
                    fn(moe, x)
            t1 = time.perf_counter()
            for _ in range(inner):
                fn(moe, x.clone().requires_grad_(True)).square().mean().backward()
            t2 = time.perf_counter()
            moe.zero_grad(set_to_none=True)
            if rep > 0:
                fwd[name].append((t1 - t0) / inner)
                bwd[name].append((t2 - t1) / inner)
    base_f, base_b = statistics.median(fwd["naive"]), statistics.median(bwd["naive"])
    out = {}
    for name in names:
        f, b = statistics.median(fwd[name]), statistics.median(bwd[name])
        out[name] = (f, b, base_f / f, base_b / b)
    return out


# --------------------------------------------------------------------------------------- the training
def bench_train(args: argparse.Namespace) -> None:
    from lit_llm.data.text import TextDataModule

    dm = TextDataModule(
        "tinyworld",
        tokenizer_vocab_size=512,
        seq_len=args.train_seq,
        batch_size=args.train_batch,
        cache_dir=args.cache_dir,
    )
    dm.prepare_data()
    dm.setup("fit")
    models, opts = {}, {}
    for name in ("tiny", "llama4-tiny"):
        torch.manual_seed(0)
        cfg = ModelConfig.from_name(name, vocab_size=dm.vocab_size, block_size=args.train_seq)
        models[name] = Transformer(cfg)
        decay = [p for p in models[name].parameters() if p.ndim >= 2]
        rest = [p for p in models[name].parameters() if p.ndim < 2]
        opts[name] = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
    warmup = max(1, args.steps // 12)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(dm.train_set), generator=g).tolist()
    spent = {n: 0.0 for n in models}
    tokens = 0
    for step in range(args.steps):
        idx = [order[(step * args.train_batch + i) % len(order)] for i in range(args.train_batch)]
        x, y = (torch.stack(t) for t in zip(*(dm.train_set[i] for i in idx)))
        tokens += x.numel()
        names = list(models) if step % 2 == 0 else list(models)[::-1]
        for name in names:
            model, opt = models[name], opts[name]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            aux = moe_aux_losses(model)
            total = loss + aux["loss"] if aux else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            spent[name] += time.perf_counter() - t0
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {step + 1}/{args.steps}", flush=True)
    print(
        f"\n## tiny MoE vs dense: tinyworld, {args.steps} steps of {args.train_batch} x {args.train_seq} "
        f"tokens, AdamW lr {args.lr}, float32, {torch.get_num_threads()} thread(s)\n"
    )
    print("| model | params | active / token | val loss | train tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(0, len(dm.val_set), args.train_batch):
                batch = [dm.val_set[j] for j in range(i, min(i + args.train_batch, len(dm.val_set)))]
                x, y = (torch.stack(t) for t in zip(*batch))
                losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item())
        n_tok = len(dm.val_set) * args.train_seq
        print(
            f"| {name} | {count_parameters(model) / 1e6:.2f}M | {count_active_parameters(model) / 1e6:.2f}M "
            f"| {sum(losses) / n_tok:.4f} | {tokens / spent[name]:,.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["layer", "train", "all"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32], help="tokens per layer call")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--dense-limit", type=int, default=65536, help="time 'dense' up to E x tokens")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cache-dir", default="data_cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("layer", "all"):
        bench_layer(args)
    if args.part in ("train", "all"):
        bench_train(args)


if __name__ == "__main__":
    main()
