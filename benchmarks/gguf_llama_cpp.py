"""llama.cpp on our GGUF export against our own decoding (issue 18): same tokens? how fast?

For each checkpoint: export it with ``lit_llm.formats.gguf.export_gguf``, load the file in llama.cpp (through
``llama-cpp-python``), and on held-out tinyworld test prompts check

- **chat template**: the file's Jinja chat template, rendered by llama-cpp-python's own
  ``Jinja2ChatFormatter`` and tokenized by llama.cpp (special tokens parsed), gives our
  ``Tokenizer.prompt_ids`` tokens; the bare question text tokenizes alike too;
- **chat mode**: ``create_chat_completion`` (llama-cpp-python's chat API, template taken from the file,
  temperature 0) replies with our greedy reply's text;
- **greedy tokens**: llama.cpp's greedy continuation (``temp=0``) equals ours (``generate``, float32, KV cache),
  up to and including the first ``<|end|>`` / ``<|eos|>`` or ``--new-tokens``;
- **decode speed** (``--speed``), one thread each: new tokens per second over whole calls (prefill included)
  with a fixed number of new tokens and no stop token, for llama.cpp (f32 and q8_0 files) and for our decoders
  (float32 eager, float32 ``compile=True``, int8 weights ``compile=True``), on the same prompts. Every
  implementation runs once before timing (compilation happens there); the median of ``--reps`` is reported.

llama-cpp-python compiles llama.cpp from source and is not a dependency. Run it from a separate venv that
also sees the project's packages (a ``.pth`` file naming the project venv's ``site-packages``)::

    python -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install numpy llama-cpp-python
    echo /path/to/.venv/lib/python3.11/site-packages > /tmp/gguf-venv/lib/python3.11/site-packages/project.pth
    OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/gguf-venv/bin/python benchmarks/gguf_llama_cpp.py \\
        --ckpt checkpoints/sft/last.ckpt checkpoints/ppo/last.ckpt --speed

(On the shared 2-core machine the full ``pip install`` was stopped once ``libllama.so`` was built: it goes on
to compile llama.cpp's ``common`` library, which the bindings do not use. The bindings then ran from the
unpacked sdist: ``PYTHONPATH=.:/tmp/llama_cpp_python-0.3.36 LLAMA_CPP_LIB_PATH=<folder with libllama.so
and libggml*.so>``, with ``diskcache jinja2 typing-extensions`` installed in the venv.)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lit_llm.backbone.generate import generate
from lit_llm.checkpoint import load_for_inference
from lit_llm.data import tinyworld
from lit_llm.formats.gguf import export_gguf


def load_llama(path: str | Path, n_ctx: int, threads: int = 1, **kw: Any) -> Any:
    """A ``llama_cpp.Llama`` on ``path`` with ``threads`` threads, without ggml's AMX weight buffers.

    On CPUs that report AMX, ggml repacks the weights for AMX tiles; where the kernel does not grant the tile
    state (as on this machine, a VM) the first product dies with an illegal instruction. Without those extra
    buffer types llama.cpp runs its AVX-512 kernels, the ones our bfloat16/int8 paths compare with.
    """
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama

    default = capi.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    capi.llama_model_default_params = without_extra_buffers
    try:
        return Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, **kw
        )
    finally:
        capi.llama_model_default_params = default


def _llama(path: Path, n_ctx: int) -> Any:
    return load_llama(path, n_ctx, n_batch=n_ctx)


def _llama_greedy(llm: Any, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    out: list[int] = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(t))
        if t in stops or len(out) >= max_new:
            break
    return out


def _our_greedy(model, prompt: list[int], max_new: int, stops: list[int], compile=False) -> list[int]:
    return generate(model, [prompt], max_new, stop_tokens=stops, compile=compile).response_lists()[0]


def compare(
    ckpt: str | Path, out: str | Path, n_prompts: int = 20, max_new_tokens: int = 48, dtype: str = "f32"
) -> dict:
    """Export ``ckpt`` to ``out`` (``dtype``) and compare llama.cpp's prompt tokens and greedy tokens with ours
    (float32)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, tok, _ = load_for_inference(ckpt)
    path = export_gguf(model, tok, out, dtype=dtype)
    llm = _llama(path, model.config.block_size)
    t = tok.tok.id_to_token
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token=t(tok.eos_id), bos_token=t(tok.bos_id))
    stops = tok.stop_ids
    res: dict[str, Any] = {
        "n_prompts": n_prompts,
        "prompt_tokens_equal": 0,
        "greedy_equal": 0,
        "chat_completion_equal": 0,
        "mismatches": [],
    }
    res["tokens_compared"] = res["tokens_equal"] = 0
    for rec in tinyworld.rl_prompts(n_prompts, "test"):
        ours_prompt = tok.prompt_ids(rec["prompt"])
        rendered = formatter(messages=[{"role": "user", "content": rec["prompt"]}]).prompt
        theirs_prompt = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
        bare = llm.tokenize(rec["prompt"].encode("utf-8"), add_bos=False, special=False)
        same_prompt = theirs_prompt == ours_prompt and bare == tok.encode(rec["prompt"])
        res["prompt_tokens_equal"] += same_prompt
        max_new = min(max_new_tokens, model.config.block_size - len(ours_prompt))
        ours = _our_greedy(model, ours_prompt, max_new, stops)
        theirs = _llama_greedy(llm, ours_prompt, max_new, set(stops))
        res["greedy_equal"] += ours == theirs
        # llama-cpp-python's chat mode end to end: template from the file, its own stop handling
        chat = llm.create_chat_completion(
            messages=[{"role": "user", "content": rec["prompt"]}],
            temperature=0.0,
            top_k=1,
            max_tokens=max_new,
        )
        res["chat_completion_equal"] += chat["choices"][0]["message"]["content"] == tok.decode(ours)
        n = max(len(ours), len(theirs))
        res["tokens_compared"] += n
        res["tokens_equal"] += sum(a == b for a, b in zip(ours, theirs))
        if ours != theirs or not same_prompt:
            res["mismatches"].append(
                {"prompt": rec["prompt"], "ours": tok.decode(ours), "llama.cpp": tok.decode(theirs)}
            )
    res["example"] = {"prompt": rendered, "reply": tok.decode(ours, skip_special=False)}
    return res


def logits_vs_llama_cpp(model, tok, path: str | Path, text: str, dtype: str = "f32") -> float:
    """Largest absolute difference between llama.cpp's logits and ours on every position of ``text``."""
    import numpy as np

    ids = tok.encode(text)
    export_gguf(model, tok, path, dtype=dtype)
    llm = load_llama(path, model.config.block_size, logits_all=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float().numpy()
    return float(np.abs(theirs - ours).max())


def speed(ckpt: str | Path, folder: Path, n_prompts: int, new_tokens: int, reps: int) -> dict[str, float]:
    """New tokens per second of a checkpoint on tinyworld test prompts (see :func:`speed_model`)."""
    model, tok, _ = load_for_inference(ckpt)
    prompts = [tok.prompt_ids(r["prompt"]) for r in tinyworld.rl_prompts(n_prompts, "test")]
    quantized = {p: load_for_inference(ckpt, precision=p)[0] for p in ("int8", "int4")}
    return speed_model(model, quantized, tok, prompts, folder, new_tokens, reps)


def speed_preset(preset: str, folder: Path, n_prompts: int, new_tokens: int, reps: int) -> dict[str, float]:
    """The same on a randomly initialised preset (seed 0) with random 32-token prompts, as decode.py does."""
    from lit_llm.backbone import ModelConfig, Transformer
    from lit_llm.backbone.quantize import quantize_int4, quantize_int8
    from lit_llm.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset)).eval().requires_grad_(False)
    # as load_for_inference(precision='int8' / 'int4')
    quantized = {
        "int8": quantize_int8(copy.deepcopy(model).to(torch.bfloat16)),
        "int4": quantize_int4(copy.deepcopy(model).to(torch.bfloat16)),
    }
    tok = Tokenizer.train(tinyworld.pretrain_text(300), "bpe", 400)  # metadata only: ids above 400 are pads
    prompts = torch.randint(7, model.config.vocab_size, (n_prompts, 32)).tolist()
    return speed_model(model, quantized, tok, prompts, folder, new_tokens, reps)


def speed_model(model, quantized, tok, prompts, folder: Path, new_tokens: int, reps: int) -> dict[str, float]:
    """New tokens per second, one thread, same prompts and lengths for every implementation."""
    torch.set_num_threads(1)
    new = min(new_tokens, model.config.block_size - max(len(p) for p in prompts))
    runs = {
        "ours float32 eager": lambda p: _our_greedy(model, p, new, []),
        "ours float32 compile": lambda p: _our_greedy(model, p, new, [], compile=True),
    }
    for name, q in quantized.items():
        runs[f"ours {name} compile"] = lambda p, q=q: _our_greedy(q, p, new, [], compile=True)
    for dtype in ("f32", "q8_0"):
        llm = _llama(
            export_gguf(model, tok, folder / f"speed-{dtype}.gguf", dtype=dtype), model.config.block_size
        )
        runs[f"llama.cpp {dtype}"] = lambda p, llm=llm: _llama_greedy(llm, p, new, set())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: compilation, llama.cpp's first graph
        fn(prompts[0])
    for r in range(reps):
        names = list(runs)
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            start = time.perf_counter()
            for p in prompts:
                assert len(runs[name](p)) == new
            times[name].append(time.perf_counter() - start)
    return {k: len(prompts) * new / statistics.median(v) for k, v in times.items()} | {"new_tokens": new}


# the converter's own tokenizer detection knows pre-tokenizers only by a hash of a known vocabulary; ours is
# trained here, so the wrapper names it ("gpt-2") and skips the SentencePiece / Llama-HF vocab attempts
_CONVERTER_WRAPPER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
def _none(self):
    raise FileNotFoundError("not a SentencePiece tokenizer")
base.TextModel._set_vocab_sentencepiece = _none
base.TextModel._set_vocab_llama_hf = _none
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# keys only one side writes by design: the converter's file naming, our chat template and end-of-turn token
# (and so the header's key count)
_EXPECTED_KEYS = {
    "general.name",
    "general.size_label",
    "general.type",
    "tokenizer.chat_template",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
}


def crosscheck_converter(model, tok, llama_cpp_dir: str | Path, folder: str | Path) -> dict[str, Any]:
    """Our ``export_gguf`` against llama.cpp's ``convert_hf_to_gguf.py`` run on our ``export_hf`` folder.

    Returns the tensor names and metadata keys on which the two float32 files differ (tensors compared
    exactly, and the largest relative difference), leaving out the keys in ``_EXPECTED_KEYS``.
    """
    import subprocess

    import gguf
    import numpy as np

    from lit_llm.formats.hf import export_hf

    folder = Path(folder)
    export_hf(model, tok, folder / "hf")
    ours = export_gguf(model, tok, folder / "ours.gguf")
    theirs = folder / "theirs.gguf"
    cmd = [sys.executable, "-c", _CONVERTER_WRAPPER, str(llama_cpp_dir), str(folder / "hf")]
    subprocess.run([*cmd, "--outfile", str(theirs), "--outtype", "f32"], check=True, capture_output=True)
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = ({t.name: np.array(t.data) for t in r.tensors} for r in (a, b))
    fa, fb = ({k: r.fields[k].contents() for k in r.fields} for r in (a, b))
    return {
        "tensors": len(ta),
        "tensor_names_differ": sorted(set(ta) ^ set(tb)),
        "tensors_differ": [k for k in ta if k in tb and not np.array_equal(ta[k], tb[k])],
        # largest relative difference (rope_freqs: ours is a ratio of float32 frequencies, theirs in float64)
        "max_rel_diff": max(
            float(np.max(np.abs(ta[k] - tb[k]) / np.maximum(np.abs(tb[k]), 1e-30))) for k in ta if k in tb
        ),
        "keys_differ": sorted(
            k
            for k in set(fa) | set(fb)
            if fa.get(k) != fb.get(k) and k not in _EXPECTED_KEYS and not k.startswith("GGUF.")
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="*", default=[], help="lit_llm checkpoints (SFT, PPO, ...)")
    p.add_argument("--out", default="/tmp/gguf-bench", help="folder for the exported files")
    p.add_argument("--prompts", type=int, default=20, help="held-out tinyworld test prompts")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt (stops at <|end|>)")
    p.add_argument("--speed", action="store_true", help="also time decoding (one thread)")
    p.add_argument("--speed-tokens", type=int, default=64, help="new tokens per prompt when timing")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--speed-preset", default=None, help="time a random model of this preset instead (e.g. small)"
    )
    p.add_argument("--dtype", default="f32", help="GGUF dtype of the file compared token by token")
    p.add_argument("--converter", default=None, help="a llama.cpp source folder: compare with its converter")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp itself (converter check only)")
    a = p.parse_args(argv)
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.speed_preset:
        r = {"speed_tokens_per_s": speed_preset(a.speed_preset, folder, a.prompts, a.speed_tokens, a.reps)}
        print(json.dumps({a.speed_preset: r}, indent=1), flush=True)
        results[a.speed_preset] = r
    for ckpt in a.ckpt:
        name, r = Path(ckpt).parent.name, {}
        if a.converter:
            model, tok, _ = load_for_inference(ckpt)
            r["converter"] = crosscheck_converter(model, tok, a.converter, folder / f"{name}-xcheck")
        if not a.no_llama:
            r.update(compare(ckpt, folder / f"{name}-{a.dtype}.gguf", a.prompts, a.new_tokens, a.dtype))
        if a.speed:
            r["speed_tokens_per_s"] = speed(ckpt, folder, a.prompts, a.speed_tokens, a.reps)
        results[str(ckpt)] = r
        print(json.dumps({str(ckpt): r}, indent=1), flush=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
