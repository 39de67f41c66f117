"""Greedy decoding speed: ``lit_llm.backbone.generate.generate`` against ``transformers`` Llama.

The ``small`` preset (6 layers, width 384, 6 query heads, 2 key/value heads, vocab 8192) with random
weights; Hugging Face's ``LlamaForCausalLM`` gets the very same weights through ``backbone/hf.py``. Random
32-token prompts, 256 new tokens, greedy, float32, batch 1 and 8. Each repetition times our generate with the
KV cache, our generate without it (``use_cache=False``) and ``LlamaForCausalLM.generate`` one after the
other (the order rotates), and checks that all three produce the same tokens. Tokens/s = batch x new tokens
/ wall time of the whole call (prefill included); the table gives the median over ``--reps``.

Examples::

    python benchmarks/decode.py                       # the benchmark (batch 1 and 8, 3 repetitions)
    python benchmarks/decode.py --new-tokens 32 --reps 1 --skip-nocache   # quick check
    python benchmarks/decode.py --profile             # also: where our cached decode spends its time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lit_llm.backbone import ModelConfig, Transformer, count_parameters
from lit_llm.backbone.generate import generate
from lit_llm.backbone.hf import hf_llama_config_dict, state_dict_to_hf_llama


def build_models(preset: str, seed: int):
    """Our Transformer and an HF LlamaForCausalLM holding the same float32 weights (both in eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(preset)
    ours = Transformer(cfg).eval()
    hf_cfg = LlamaConfig(**hf_llama_config_dict(cfg))
    hf = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf_llama(ours.state_dict(), cfg), strict=False)
    hf.tie_weights()
    bad_missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if bad_missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {bad_missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.generation_config.bos_token_id = None
    return cfg, ours, hf


@torch.inference_mode()
def check_logits(ours: Transformer, hf, prompts: torch.Tensor) -> float:
    """Largest |difference| of the prompt logits between the two models."""
    a = ours(prompts)
    b = hf(input_ids=prompts).logits
    return float((a - b).abs().max())


def run_ours(
    model: Transformer, prompts: torch.Tensor, new: int, use_cache: bool
) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = generate(model, prompts.tolist(), new, temperature=0.0, use_cache=use_cache)
    dt = time.perf_counter() - t0
    return dt, out.responses


def run_hf(hf, prompts: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            generation_config=hf.generation_config,
        )
    dt = time.perf_counter() - t0
    return dt, out[:, prompts.shape[1] :]


def first_mismatch(a: torch.Tensor, b: torch.Tensor, approx: bool = False) -> str:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.equal(a, b):
        return "identical"
    if approx:
        return f"{100 * float((a == b).float().mean()):.0f}% of tokens equal"
    rows, cols = torch.nonzero(a != b, as_tuple=True)
    return f"differ: {int((a != b).any(1).sum())} rows, first at row {int(rows[0])} token {int(cols[0])}"


# ------------------------------------------------------------------------------------------------ what-if
# The changes proposed for backbone/attention.py, model.py and generate.py, applied here by swapping
# Attention.forward for the duration of a call, so their effect can be measured without editing the library.
def proposed_attention_forward(self, x, rope, attn_mask, cache=None, positions=None):
    """``Attention.forward`` with GQA inside SDPA (no repeat_interleave) and no mask for one new query.

    Plain layers only (RoPE, no qk-norm, no temperature tuning, no local mask), as in the ``small`` preset.
    """
    if getattr(self, "qk_norm", False) or getattr(self, "temperature_tuning", False):
        raise NotImplementedError("the what-if attention covers plain Llama layers only")
    import torch.nn.functional as F

    from lit_llm.backbone.rope import apply_rope

    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    if rope is not None and self.use_rope:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cache is not None:
        k, v = cache.update(self.layer_idx, k, v)
    y = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=self.dropout if self.training else 0.0,
        is_causal=attn_mask is None and T > 1,  # one new query attends every cached key: no mask at all
        enable_gqa=self.n_kv_head != self.n_head,
    )
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


@torch.inference_mode()
def proposed_generate(model: Transformer, prompts: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decode of equal-length prompts (no padding) the proposed way: no per-step mask, logits only
    for the last position, tokens written into a preallocated tensor."""
    from lit_llm.backbone.attention import Attention
    from lit_llm.backbone.rope import rope_cos_sin

    if getattr(model, "has_local_layers", False):
        raise NotImplementedError("the what-if decode covers models without local attention layers only")
    original = Attention.forward
    Attention.forward = proposed_attention_forward
    try:
        B, P = prompts.shape
        cache = model.new_cache(B, P + new)
        out = torch.empty(B, new, dtype=torch.long)
        idx = prompts
        for i in range(new):
            start, T = cache.length, idx.shape[1]
            pos = torch.arange(start, start + T).expand(B, T)
            x = model.embed_tokens(idx)
            rope = rope_cos_sin(pos, model.inv_freq)
            for block in model.layers:
                x = block(x, rope, None, cache)
            cache.advance(T)
            logits = model.lm_head(model.norm(x[:, -1]))
            out[:, i] = logits.argmax(-1)
            idx = out[:, i : i + 1]
    finally:
        Attention.forward = original
    return out


def run_proposed(model: Transformer, prompts: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    toks = proposed_generate(model, prompts, new)
    return time.perf_counter() - t0, toks


def profile_ours(model: Transformer, prompts: torch.Tensor, new: int, path: str | None) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        generate(model, prompts.tolist(), new, temperature=0.0)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    if path:
        Path(path).write_text(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-nocache", action="store_true", help="leave out use_cache=False (slow at batch 8)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of our cached decode")
    p.add_argument(
        "--whatif",
        action="store_true",
        help="also time the proposed attention/generate changes (float32) and bfloat16 weights (not the "
        "same tokens: reported as agreement)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    cfg, ours, hf = build_models(args.preset, args.seed)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}; "
        f"preset {args.preset}: {count_parameters(ours):,} params, {cfg.n_layer} layers, width {cfg.n_embd}, "
        f"{cfg.n_head} heads / {cfg.n_kv_head} kv heads, vocab {cfg.vocab_size}; HF attention "
        f"{hf.config._attn_implementation!r}"
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    runners = {
        "ours (KV cache)": lambda pr, n: run_ours(ours, pr, n, True),
        "ours (no cache)": lambda pr, n: run_ours(ours, pr, n, False),
        "HF Llama": lambda pr, n: run_hf(hf, pr, n),
    }
    if args.skip_nocache:
        runners.pop("ours (no cache)")
    if args.whatif:
        import copy

        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        ours_bf16.inv_freq = ours.inv_freq.clone()  # .to() rounds the float RoPE buffer too; keep it float32
        runners["what-if: proposed patch"] = lambda pr, n: run_proposed(ours, pr, n)
        runners["what-if: patch + bf16 weights"] = lambda pr, n: run_proposed(ours_bf16, pr, n)
    names = list(runners)
    rows = []
    for B in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g)
        print(f"batch {B}: max |logit diff| ours vs HF on the prompt: {check_logits(ours, hf, prompts):.2e}")
        for name in names:  # warm-up (one short call each)
            runners[name](prompts, 8)
        times: dict[str, list[float]] = {n: [] for n in names}
        outs: dict[str, torch.Tensor] = {}
        for r in range(args.reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                dt, toks = runners[name](prompts, args.new_tokens)
                times[name].append(dt)
                outs[name] = toks
            print(
                f"  rep {r}: "
                + ", ".join(f"{n} {B * args.new_tokens / times[n][-1]:.0f} tok/s" for n in names)
            )
            sys.stdout.flush()
        same = {n: first_mismatch(outs[n], outs["HF Llama"], "bf16" in n) for n in names if n != "HF Llama"}
        print(f"  tokens vs HF: {same}")
        hf_tps = B * args.new_tokens / statistics.median(times["HF Llama"])
        for n in names:
            tps = B * args.new_tokens / statistics.median(times[n])
            rows.append(
                {
                    "batch": B,
                    "impl": n,
                    "tok_s": tps,
                    "ms_per_token_step": 1000 * statistics.median(times[n]) / args.new_tokens,
                    "vs_hf": tps / hf_tps,
                    "tokens": "reference" if n == "HF Llama" else same[n],
                    "times": times[n],
                }
            )
    print()
    print("| batch | implementation | tokens/s | ms per decode step | vs HF | tokens vs HF |")
    print("|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['impl']} | {r['tok_s']:.0f} | {r['ms_per_token_step']:.2f} | "
            f"{r['vs_hf']:.2f}x | {r['tokens']} |"
        )
    targets = {1: 3.0, 8: 2.0}
    for r in rows:
        if r["impl"] == "ours (KV cache)" and r["batch"] in targets:
            t = targets[r["batch"]]
            print(
                f"target batch {r['batch']}: >= {t}x HF -> {r['vs_hf']:.2f}x {'MET' if r['vs_hf'] >= t else 'MISSED'}"
            )
    if args.profile:
        B = max(args.batch)
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g)
        print(f"\nprofile of our cached decode, batch {B}:")
        profile_ours(ours, prompts, args.new_tokens, None)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
