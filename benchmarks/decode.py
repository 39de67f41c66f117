"""Greedy decoding speed: ``lit_llm.backbone.generate.generate`` against ``transformers`` Llama.

The ``small`` preset (6 layers, width 384, 6 query heads, 2 key/value heads, vocab 8192) with random
weights; Hugging Face's ``LlamaForCausalLM`` gets the very same weights through ``lit_llm/formats/hf.py``. Random
32-token prompts, 256 new tokens, greedy, batch 1 and 8. Each repetition runs every implementation once, one
after the other (the order rotates), and compares its tokens with HF float32's. Tokens/s = batch x new tokens
/ wall time of the whole call (prefill included); the table gives the median over ``--reps``. Every
implementation runs once at full length before timing (compilation happens there).

Implementations (``--impls``): ``hf`` / ``hf-bf16`` (HF generate, float32 / bfloat16 weights), ``eager``
(ours, float32, KV cache), ``nocache`` (ours, recomputing the sequence), ``compile`` (ours, float32,
``compile=True``), ``bf16-compile``, ``bf16-frozen`` (``compile="frozen"``), ``int8-compile`` and
``int8-frozen`` (weight-only int8 from ``backbone/quantize.py``, bfloat16 activations).

Examples::

    python benchmarks/decode.py --threads 1                     # the benchmark (batch 1 and 8, 3 repetitions)
    python benchmarks/decode.py --new-tokens 32 --reps 1 --impls hf eager   # quick check
    python benchmarks/decode.py --profile int8-compile          # also: where that decode spends its time
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lit_llm.backbone import ModelConfig, Transformer, count_parameters
from lit_llm.backbone.generate import generate
from lit_llm.backbone.quantize import quantize_int8
from lit_llm.formats.llama import hf_llama_config_dict, state_dict_to_hf_llama


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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(
    model: Transformer, prompts: torch.Tensor, new: int, use_cache: bool = True, compile: bool | str = False
) -> tuple[float, torch.Tensor]:
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompts.tolist(), new, temperature=0.0, use_cache=use_cache, compile=compile)
    sync()
    dt = time.perf_counter() - t0
    return dt, out.responses


def run_hf(hf, prompts: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    sync()
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
    sync()
    dt = time.perf_counter() - t0
    return dt, out[:, prompts.shape[1] :]


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """``identical``, or the share of equal tokens (greedy paths diverge after the first different token)."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.equal(a, b):
        return "identical"
    return f"{100 * float((a == b).float().mean()):.2f}% equal"


def inference_copy(model: Transformer, dtype: torch.dtype, int8: bool = False) -> Transformer:
    """A frozen (requires_grad=False) copy of ``model`` in ``dtype``, optionally with int8 weights."""
    m = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    return quantize_int8(m) if int8 else m


IMPLS = {
    # name: (label, factory(ours, hf, hf_bf16) -> runner(prompts, n))
    "hf": ("HF `LlamaForCausalLM.generate`, float32", lambda o, h, hb: lambda pr, n: run_hf(h, pr, n)),
    "hf-bf16": ("HF generate, bfloat16 weights", lambda o, h, hb: lambda pr, n: run_hf(hb(), pr, n)),
    "eager": ("ours, float32, KV cache", lambda o, h, hb: lambda pr, n: run_ours(o, pr, n)),
    "nocache": ("ours, float32, `use_cache=False`", lambda o, h, hb: lambda pr, n: run_ours(o, pr, n, False)),
    "compile": (
        "ours, float32, `compile=True`",
        lambda o, h, hb: lambda pr, n: run_ours(o, pr, n, True, True),
    ),
}
for _name, _label, _dtype, _int8, _mode in [
    ("bf16-compile", "ours, bfloat16, `compile=True`", torch.bfloat16, False, True),
    ("bf16-frozen", 'ours, bfloat16, `compile="frozen"`', torch.bfloat16, False, "frozen"),
    ("int8-compile", "ours, int8 weights, `compile=True`", torch.bfloat16, True, True),
    ("int8-frozen", 'ours, int8 weights, `compile="frozen"`', torch.bfloat16, True, "frozen"),
]:

    def _factory(o, h, hb, _dtype=_dtype, _int8=_int8, _mode=_mode):
        m = inference_copy(o, _dtype, _int8)
        return lambda pr, n: run_ours(m, pr, n, True, _mode)

    IMPLS[_name] = (_label, _factory)


def profile_ours(runner, prompts: torch.Tensor, new: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        runner(prompts, new)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (int8 rows are CPU-only: no fused kernel)")
    p.add_argument(
        "--impls",
        nargs="+",
        choices=list(IMPLS),
        default=[k for k in IMPLS if k != "nocache"],
        help="implementations to time (hf is always included: it is the reference)",
    )
    p.add_argument("--profile", choices=list(IMPLS), default=None, help="torch.profiler table of one of them")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    cfg, ours, hf = build_models(args.preset, args.seed)
    ours, hf = ours.to(args.device), hf.to(args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}; "
        f"preset {args.preset}: {count_parameters(ours):,} params, {cfg.n_layer} layers, width {cfg.n_embd}, "
        f"{cfg.n_head} heads / {cfg.n_kv_head} kv heads, vocab {cfg.vocab_size}; HF attention "
        f"{hf.config._attn_implementation!r}"
    )
    hf_bf16 = []

    def get_hf_bf16():
        if not hf_bf16:
            hf_bf16.append(copy.deepcopy(hf).to(torch.bfloat16))
        return hf_bf16[0]

    names = ["hf"] + [n for n in args.impls if n != "hf"]
    runners = {n: IMPLS[n][1](ours, hf, get_hf_bf16) for n in names}
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for B in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).to(args.device)
        print(f"batch {B}: max |logit diff| ours vs HF on the prompt: {check_logits(ours, hf, prompts):.2e}")
        warm: dict[str, float] = {}
        for name in names:  # warm-up at full length: compilation happens here
            warm[name] = runners[name](prompts, args.new_tokens)[0]
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
        hf_tps = B * args.new_tokens / statistics.median(times["hf"])
        for n in names:
            tps = B * args.new_tokens / statistics.median(times[n])
            rows.append(
                {
                    "batch": B,
                    "impl": n,
                    "label": IMPLS[n][0],
                    "tok_s": tps,
                    "ms_per_token_step": 1000 * statistics.median(times[n]) / args.new_tokens,
                    "vs_hf": tps / hf_tps,
                    "tokens": "reference" if n == "hf" else agreement(outs[n], outs["hf"]),
                    "first_call_s": warm[n],
                    "times": times[n],
                }
            )
    print()
    print(
        "| batch | implementation | tokens/s | ms / decode step | vs HF fp32 | tokens vs HF fp32 | first call s |"
    )
    print("|---:|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['label']} | {r['tok_s']:.0f} | {r['ms_per_token_step']:.2f} | "
            f"{r['vs_hf']:.2f}x | {r['tokens']} | {r['first_call_s']:.1f} |"
        )
    targets = {1: 3.0, 8: 2.0}
    for B, t in targets.items():
        best = max(
            (r for r in rows if r["batch"] == B and not r["impl"].startswith("hf")),
            default=None,
            key=lambda r: r["vs_hf"],
        )
        if best:
            print(f"target batch {B}: >= {t}x HF -> best {best['vs_hf']:.2f}x ({best['label']})")
    if args.profile:
        B = max(args.batch)
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g)
        runner = runners.get(args.profile) or IMPLS[args.profile][1](ours, hf, get_hf_bf16)
        runner(prompts, args.new_tokens)
        print(f"\nprofile of {IMPLS[args.profile][0]}, batch {B}:")
        profile_ours(runner, prompts, args.new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
