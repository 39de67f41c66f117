"""Preparing pretraining data at scale (issue 15): peak memory and tokens/s of three ways to tokenize a corpus.

* ``in-memory``: the implementation before streaming (every record read into Python, every id of a split
  collected in one ``list[int]``, then written), reproduced here;
* ``nanogpt``: nanoGPT's OpenWebText ``prepare.py`` method (``datasets`` loads the corpus, ``.map`` with
  ``num_proc`` tokenizes it, then the ids are written to a ``np.memmap`` in shards);
* ``stream``: ``TextDataModule.prepare_data`` (:mod:`lit_llm.data.stream`).

All three use the same BPE tokenizer (trained once on a sample of the corpus and passed in), the same
``.jsonl`` corpus and the same number of worker processes. Each runs in its own process; its peak memory is
the largest sum of the resident set sizes of that process and its children, polled every 50 ms. Then it
checks that the three wrote the same tokens, and times how long training from the prepared corpus takes to
reach its first step.

    OMP_NUM_THREADS=1 python benchmarks/prepare.py --sizes 100 1000 --num_proc 2 --work /tmp/prep-bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the project's shared data folder (next to the checkout, or two levels up from a worktree)
SHAKESPEARE = next(
    (
        p
        for p in (
            ROOT.parent / "shared/data/tinyshakespeare.txt",
            ROOT.parents[1] / "shared/data/tinyshakespeare.txt",
        )
        if p.exists()
    ),
    ROOT.parent / "shared/data/tinyshakespeare.txt",
)


# ----------------------------------------------------------------------------------------- the corpus
def generate(path: Path, megabytes: int, seed: int = 0) -> None:
    """A ``.jsonl`` corpus of about ``megabytes`` MB: documents of 5-60 random lines of Shakespeare."""
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()]
    rng = random.Random(seed)
    target, size = megabytes * 1_000_000, 0
    with open(path, "w") as f:
        while size < target:
            start = rng.randrange(len(lines) - 60)
            doc = "\n".join(lines[start : start + rng.randint(5, 60)])
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)


# ---------------------------------------------------------------------------------------- the methods
def in_memory(corpus: str, tokenizer: str, out: str, num_proc: int) -> int:
    from lit_llm.data.common import read_records, split_train_val
    from lit_llm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    docs = [r["text"] for r in read_records(corpus) if isinstance(r.get("text"), str)]
    total = 0
    for split, part in zip(("train", "val"), split_train_val(docs, 0.1, corpus)):
        ids: list[int] = []
        for enc in tok.encode_batch(part):
            ids.extend(enc)
            ids.append(tok.eos_id)
        np.asarray(ids, dtype=np.uint16).tofile(Path(out) / f"{split}.bin")
        total += len(ids)
    return total


def nanogpt(corpus: str, tokenizer: str, out: str, num_proc: int) -> int:
    """nanoGPT's data/openwebtext/prepare.py, on this corpus and tokenizer (same split as the others)."""
    import datasets
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(tokenizer)
    eos = tok.token_to_id("<|eos|>")
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=str(Path(out) / "hf"))
    n_val = max(1, int(len(ds) * 0.1))
    splits = {"train": ds.select(range(len(ds) - n_val)), "val": ds.select(range(len(ds) - n_val, len(ds)))}

    def process(example):
        ids = tok.encode(example["text"], add_special_tokens=False).ids + [eos]
        return {"ids": ids, "len": len(ids)}

    total = 0
    for split, dset in splits.items():
        tokenized = dset.map(process, remove_columns=["text"], num_proc=num_proc or None)
        arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
        arr = np.memmap(Path(out) / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
        idx, shards = 0, min(1024, len(tokenized))
        for i in range(shards):
            batch = tokenized.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            chunk = np.concatenate(batch["ids"])
            arr[idx : idx + len(chunk)] = chunk
            idx += len(chunk)
        arr.flush()
        total += arr_len
    return total


def stream(corpus: str, tokenizer: str, out: str, num_proc: int) -> int:
    from lit_llm.data.text import TextDataModule

    dm = TextDataModule(corpus, tokenizer=tokenizer, num_proc=num_proc, cache_dir=out)
    dm.prepare_data()
    meta = json.loads((dm.cache / "meta.json").read_text())
    return meta["train_tokens"] + meta["val_tokens"]


def stream_threads(corpus: str, tokenizer: str, out: str, num_proc: int) -> int:
    """``stream`` with ``num_proc=0``: tokenized in the main process (by the threads of ``tokenizers``)."""
    return stream(corpus, tokenizer, out, 0)


METHODS = {"in-memory": in_memory, "nanogpt": nanogpt, "stream": stream, "stream-threads": stream_threads}


# ------------------------------------------------------------------------------------------ measuring
def measure(method: str, corpus: Path, tokenizer: Path, out: Path, num_proc: int) -> dict:
    """Run one method in a child process; its wall time, tokens and peak memory (with its children)."""
    import psutil

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--one", method, str(corpus), str(tokenizer), str(out), str(num_proc)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{method} failed with exit status {proc.returncode}")
    tokens = int(proc.stdout.read().strip().splitlines()[-1])
    return {"method": method, "seconds": seconds, "tokens": tokens, "peak_mb": peak / 2**20}


def first_step_seconds(corpus: Path, tokenizer: Path, cache_dir: Path) -> float:
    """Seconds from a new process's DataModule to the end of the first training step, on a prepared cache."""
    code = f"""
import time; t = time.perf_counter()
from lightning import Trainer
from lit_llm.data.text import TextDataModule
from lit_llm.stages import CausalLM
dm = TextDataModule({str(corpus)!r}, tokenizer={str(tokenizer)!r}, cache_dir={str(cache_dir)!r}, seq_len=256)
model = CausalLM(preset="tiny", vocab_size=dm.vocab_size, block_size=256)
Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0).fit(model, dm)
print(time.perf_counter() - t)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--num_proc", type=int, default=2, help="worker processes (nanogpt and stream)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--work", default="/tmp/prep-bench", help="scratch folder (deleted at the end)")
    parser.add_argument("--in_memory_max_mb", type=int, default=100, help="largest corpus for in-memory")
    parser.add_argument("--compare_max_mb", type=int, default=100, help="largest corpus for all methods")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, corpus, tokenizer, out, num_proc = args.one
        print(METHODS[method](corpus, tokenizer, out, int(num_proc)))
        return

    from lit_llm.data.stream import Corpus, CorpusStats, SpreadSample
    from lit_llm.tokenizer import Tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for mb in args.sizes:
            corpus = work / f"corpus-{mb}mb.jsonl"
            t = time.perf_counter()
            generate(corpus, mb)
            print(
                f"generated {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f}s"
            )
            tokenizer = work / "tokenizer.json"
            if not tokenizer.exists():  # one tokenizer for every method and size
                sample = SpreadSample(20_000_000)
                for text, _ in Corpus(str(corpus)).pieces(CorpusStats()):
                    sample.add(text)
                t = time.perf_counter()
                Tokenizer.train([k[2] for k in sample.kept], "bpe", args.vocab).save(tokenizer)
                print(
                    f"tokenizer ({args.vocab}) trained on a 20M-character sample in {time.perf_counter() - t:.0f}s"
                )
            outs = {}
            for method in args.methods:
                if (method == "in-memory" and mb > args.in_memory_max_mb) or (
                    not method.startswith("stream") and mb > args.compare_max_mb
                ):
                    continue
                out = work / f"{method}-{mb}"
                row = measure(method, corpus, tokenizer, out, args.num_proc)
                row.update(corpus_mb=mb, tokens_per_s=row["tokens"] / row["seconds"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                outs[method] = out
            files = {
                m: [np.fromfile(next(o.rglob(f"{s}.bin")), dtype=np.uint16) for s in ("train", "val")]
                for m, o in outs.items()
            }
            last = args.methods[-1]
            same = {m: all(np.array_equal(a, b) for a, b in zip(f, files[last])) for m, f in files.items()}
            print(f"{mb} MB: same tokens as {last}: {same}", flush=True)
            del files
            if mb == max(args.sizes) and last.startswith("stream"):  # a finished cache: train from it
                seconds = first_step_seconds(corpus, tokenizer, outs[last])
                print(f"first training step on the prepared {mb} MB corpus after {seconds:.1f}s", flush=True)
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            corpus.unlink(missing_ok=True)
    finally:
        print(json.dumps(rows, indent=1))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
