"""Serving and CPU decoding speed (issue 25).

``throughput``: ``lit-llm serve`` started as a user starts it (a subprocess, ``--threads``), then the same
``--requests`` streamed chat requests (tinyworld test questions, greedy, ``max_tokens`` each) sent one after
another and then all at once from as many client threads, through the ``openai`` client. Total tokens/s =
completion tokens (from the usage chunk) / wall time of the whole round; time to first token (TTFT) = from
sending a request to its first content chunk. Each round repeats ``--reps`` times (sequential, concurrent,
sequential, ...) and the median is reported; the concurrent replies must equal the sequential ones (greedy:
a row's tokens do not depend on its batch).

``decode``: batch 1, ``--new_tokens`` greedy tokens after a chat prompt with no stop token, on a Hugging Face
folder (SmolLM2-135M-Instruct): ours (``lit_llm.backbone.generate.generate``: float32 eager, then
``compile=True`` in float32, bfloat16 and weight-only int8), transformers' ``generate`` (float32) and, when
``llama_cpp`` imports, llama.cpp (llama-cpp-python) on GGUF files of the same weights (``--gguf`` ...: e.g.
``lit-llm export --format gguf --dtype q8_0`` of the folder, and the Q4_1 file it came from). Every
implementation runs once before timing (compilation); then ``--reps`` rounds, the order rotated, median
tokens/s over whole calls (prefill included). Also the int8 and bfloat16 greedy tokens against float32's on
``--agree`` chat prompts (``--agree_tokens`` each): the share of prompts whose reply is identical and of
tokens equal before the first difference.

    python benchmarks/serve.py throughput --ckpt checkpoints/smollm2 --requests 8 --max_tokens 64 --threads 2
    OMP_NUM_THREADS=1 python benchmarks/serve.py decode --folder checkpoints/smollm2 \\
        --gguf smollm2-q8_0.gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _questions(n: int) -> list[str]:
    from lit_llm.data import tinyworld

    return [p["prompt"] for p in tinyworld.rl_prompts(n, "test")]


# ---- throughput -----------------------------------------------------------------------------------------------


def _one(client, name: str, question: str, max_tokens: int, t_sent: float) -> dict:
    """One streamed chat request: its text, completion tokens and time to first token."""
    stream = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, first, tokens = [], None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t_sent
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"text": "".join(text), "tokens": tokens, "ttft_s": first}


def _round(client, name, questions, max_tokens, concurrent: bool) -> dict:
    results: list[dict | None] = [None] * len(questions)
    t0 = time.perf_counter()
    if concurrent:

        def work(i):
            results[i] = _one(client, name, questions[i], max_tokens, time.perf_counter())

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, q in enumerate(questions):
            results[i] = _one(client, name, q, max_tokens, time.perf_counter())
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "texts": [r["text"] for r in results],
    }


def throughput(args: argparse.Namespace) -> dict:
    from openai import OpenAI

    port = _free_port()
    cmd = [sys.executable, "-m", "lit_llm", "serve", "--ckpt", args.ckpt, "--port", str(port)]
    cmd += ["--max_batch", str(args.requests), "--threads", str(args.threads), "--model_name", "bench"]
    cmd += ["--precision", args.precision, "--quantize", args.quantize, "--log_level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
        questions = _questions(args.requests)
        _round(client, "bench", questions[:2], 8, concurrent=True)  # warm-up
        seq, conc = [], []
        for _ in range(args.reps):
            seq.append(_round(client, "bench", questions, args.max_tokens, concurrent=False))
            conc.append(_round(client, "bench", questions, args.max_tokens, concurrent=True))
    finally:
        proc.terminate()
        proc.wait(60)

    def med(rounds, key):
        return round(statistics.median(r[key] for r in rounds), 3)

    same = all(c["texts"] == seq[0]["texts"] for c in conc + seq)
    out = {
        "ckpt": args.ckpt,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "precision": args.quantize if args.quantize != "none" else args.precision,
        "tokens_per_round": seq[0]["tokens"],
        "sequential_tokens_per_s": med(seq, "tokens_per_s"),
        "concurrent_tokens_per_s": med(conc, "tokens_per_s"),
        "speedup": round(med(conc, "tokens_per_s") / med(seq, "tokens_per_s"), 2),
        "ttft_sequential_median_s": med(seq, "ttft_median_s"),
        "ttft_concurrent_median_s": med(conc, "ttft_median_s"),
        "ttft_concurrent_max_s": med(conc, "ttft_max_s"),
        "concurrent_replies_equal_sequential": same,
        "example": seq[0]["texts"][0],
    }
    return out


# ---- decode ---------------------------------------------------------------------------------------------------


def decode(args: argparse.Namespace) -> dict:
    import transformers

    from lit_llm.backbone.generate import generate
    from lit_llm.checkpoint import load_for_inference
    from lit_llm.formats.hf import import_hf

    torch.set_num_threads(args.threads)
    model, tok = import_hf(args.folder)
    model.eval().requires_grad_(False)
    models = {"fp32": model}
    for precision in ("bf16", "int8", "int4"):
        models[precision] = load_for_inference(args.folder, precision)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    questions = _questions(max(args.agree, 1))
    prompt = tok.prompt_ids(questions[0])
    new = args.new_tokens

    def ours(name, compile):
        m = models[name]
        return lambda: generate(m, [prompt], new, compile=compile).responses[0].tolist()

    def theirs():
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    impls = {
        "transformers generate, float32": theirs,
        "ours, float32 eager (KV cache)": ours("fp32", False),
        "ours, float32, compile": ours("fp32", True),
        "ours, bfloat16, compile": ours("bf16", True),
        "ours, int8 weights, compile": ours("int8", True),
        "ours, int4 weights, compile": ours("int4", True),
    }
    try:
        import llama_cpp  # noqa: F401
        from gguf_llama_cpp import load_llama

        for path in args.gguf:
            llm = load_llama(path, len(prompt) + new + 8, args.threads)

            def run(llm=llm):
                llm.reset()
                out = []
                for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                    out.append(t)
                    if len(out) == new:
                        break
                return out

            impls[f"llama.cpp, {Path(path).name}"] = run
    except ImportError:
        print("llama_cpp is not installed: llama.cpp not measured", file=sys.stderr)

    tokens = {name: fn() for name, fn in impls.items()}  # warm-up (compiles)
    times: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t = time.perf_counter()
            out = impls[name]()
            times[name].append(time.perf_counter() - t)
            assert len(out) == new, (name, len(out))
    ref = tokens["ours, float32 eager (KV cache)"]
    table = {}
    for name in names:
        s = statistics.median(times[name])
        equal = next((i for i, (a, b) in enumerate(zip(tokens[name], ref)) if a != b), new)
        table[name] = {"tokens_per_s": round(new / s, 1), "tokens_equal_fp32_before_first_difference": equal}
    base = table["transformers generate, float32"]["tokens_per_s"]
    for row in table.values():
        row["vs_transformers"] = round(row["tokens_per_s"] / base, 2)
    lcpp = [n for n in names if n.startswith("llama.cpp")]
    for n in lcpp:
        for row in table.values():
            row[f"vs {n}"] = round(row["tokens_per_s"] / table[n]["tokens_per_s"], 2)

    # greedy agreement with float32 on --agree chat prompts (eager, stop at the end of the turn)
    stops = list(tok.stop_ids)
    asked = [tok.prompt_ids(q) for q in questions]

    def reply(m, ids):  # prompt + greedy reply through its stop token
        g = generate(m, [ids], args.agree_tokens, stop_tokens=stops)
        return g.sequences[0][g.valid[0]].tolist()

    ref_replies = [reply(model, ids) for ids in asked]
    agreement = {}
    for precision in ("bf16", "int8", "int4"):
        same, equal_tokens, total = 0, 0, 0
        for ids, r in zip(asked, ref_replies):
            o = reply(models[precision], ids)
            same += o == r
            first = next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
            equal_tokens += first - len(ids)
            total += len(r) - len(ids)
        agreement[precision] = {
            "replies_identical": f"{same}/{len(questions)}",
            "tokens": f"{equal_tokens}/{total}",
        }
    return {
        "new_tokens": new,
        "prompt_tokens": len(prompt),
        "threads": args.threads,
        "table": table,
        "agreement": agreement,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--requests", type=int, default=8)
    a.add_argument("--max_tokens", type=int, default=64)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--precision", default="32", choices=["32", "bf16"])
    a.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    a = sub.add_parser("decode")
    a.add_argument("--folder", required=True)
    a.add_argument("--gguf", nargs="*", default=[])
    a.add_argument("--new_tokens", type=int, default=128)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--agree", type=int, default=20)
    a.add_argument("--agree_tokens", type=int, default=64)
    args = p.parse_args()
    out = throughput(args) if args.cmd == "throughput" else decode(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
