"""An interrupted prepare resumes from its last finished shard (issue 26): a real ``prepare_data`` in a
subprocess is killed (SIGTERM, SIGKILL) after its first shard, the next prepare skips the finished shards and
publishes the same bytes as an uninterrupted run; another corpus stamp or tokenizer starts over."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_llm.data import stream
from lit_llm.data.text import TextDataModule
from lit_llm.tokenizer import Tokenizer

from .conftest import ROOT

SHARD_CHARS, PIECE_CHARS = 30_000, 4_000
WORDS = "the cat sat on a mat while Alice counted apples und über naïve 東京 don't it's 42 7".split()

# the prepare step as `lit-llm fit` runs it (TextDataModule.prepare_data), each batch slowed down so that a
# kill surely lands mid-run; it prints the characters it tokenized
SCRIPT = """
import os, sys, time
from lit_llm.data import stream
from lit_llm.data.text import TextDataModule

stream.SHARD_CHARS, stream.PIECE_CHARS = int(sys.argv[4]), int(sys.argv[5])
real, chars = stream.encode_pieces, [0]

def slow(texts, *args, **kwargs):
    time.sleep(float(sys.argv[6]))
    chars[0] += sum(map(len, texts))
    return real(texts, *args, **kwargs)

stream.encode_pieces = slow
TextDataModule(sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3], seq_len=16).prepare_data()
print("TOKENIZED", chars[0])
"""


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) + ("\n" if rng.random() < 0.1 else "") for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 3 .jsonl files and a .txt file (about 300,000 characters: 10 shards of 30,000), its
    tokenizer, and the files of an uninterrupted prepare."""
    root = tmp_path_factory.mktemp("prepare")
    rng = random.Random(0)
    folder = root / "corpus"
    folder.mkdir()
    for i in range(3):
        docs = [{"text": _text(rng, rng.randint(50, 400))} for _ in range(120)]
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "zbook.txt").write_text(_text(rng, 12_000))  # one document of many pieces
    tok = Tokenizer.train([_text(rng, 3000)], "bpe", 300)
    tok.save(root / "tokenizer.json")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stream, "SHARD_CHARS", SHARD_CHARS)
        m.setattr(stream, "PIECE_CHARS", PIECE_CHARS)
        ref = _dm(folder, root / "tokenizer.json", root / "reference")
        ref.prepare_data()
        shards = ref._scan()[3]
    assert shards >= 8
    # with one shard (the default shard size) the files are the same: sharding changes no byte
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stream, "PIECE_CHARS", PIECE_CHARS)
        whole = _dm(folder, root / "tokenizer.json", root / "one-shard")
        whole.prepare_data()
        assert whole._scan()[3] == 1
    assert _published(whole.cache) == _published(ref.cache)
    return {"folder": folder, "tokenizer": root / "tokenizer.json", "ref": ref.cache, "shards": shards}


def _dm(folder: Path, tokenizer: Path, cache: Path) -> TextDataModule:
    return TextDataModule(str(folder), tokenizer=str(tokenizer), cache_dir=str(cache), seq_len=16)


def _published(cache: Path) -> dict[str, bytes]:
    return {name: (cache / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


def _progress(cache: Path) -> dict | None:
    for path in cache.glob(".prepare.*.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # replaced while being read
            return None
    return None


def _killed_run(corpus, cache_dir: Path, sig: int) -> dict:
    """A prepare in a subprocess, sent ``sig`` once it has finished its first shard; its progress file."""
    cmd = [sys.executable, "-c", SCRIPT, str(corpus["folder"]), str(corpus["tokenizer"]), str(cache_dir)]
    cmd += [str(SHARD_CHARS), str(PIECE_CHARS), "0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    caches = []
    while time.monotonic() < deadline and proc.poll() is None:
        caches = [p for p in cache_dir.glob("*") if p.is_dir()]
        state = _progress(caches[0]) if caches else None
        if state and state["done"] >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -sig, err.decode()[-3000:]  # killed, not finished
    (cache,) = caches
    assert not (cache / "meta.json").exists() and not (cache / "train.bin").exists()
    state = _progress(cache)
    assert 1 <= state["done"] < corpus["shards"], state
    return state


def _rerun(corpus, cache_dir: Path, monkeypatch, caplog) -> tuple[TextDataModule, int]:
    """The next prepare (in this process, another pid than the killed one); the characters it tokenized."""
    monkeypatch.setattr(stream, "SHARD_CHARS", SHARD_CHARS)
    monkeypatch.setattr(stream, "PIECE_CHARS", PIECE_CHARS)
    real, chars = stream.encode_pieces, [0]

    def counting(texts, *args, **kwargs):
        chars[0] += sum(map(len, texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(stream, "encode_pieces", counting)
    dm = _dm(corpus["folder"], corpus["tokenizer"], cache_dir)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    return dm, chars[0]


def _chars_from_shard(corpus, first: int) -> int:
    """Characters of the pieces in shards ``first``, ``first + 1``, ... (what a resume tokenizes)."""
    shards, total = stream.Shards(SHARD_CHARS), 0
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stream, "PIECE_CHARS", PIECE_CHARS)
        for text, _ in stream.Corpus(str(corpus["folder"])).pieces(stream.CorpusStats()):
            total += len(text) if shards.add(len(text)) >= first else 0
    return total


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_prepare_resumes_from_its_last_shard(corpus, tmp_path, monkeypatch, caplog, sig):
    state = _killed_run(corpus, tmp_path, sig)
    done, n = state["done"], corpus["shards"]
    dm, tokenized = _rerun(corpus, tmp_path, monkeypatch, caplog)
    assert f"resuming from shard {done + 1}/{n} (the {done} finished shards" in caplog.text
    assert tokenized == _chars_from_shard(corpus, done) < _chars_from_shard(corpus, 0)  # finished: skipped
    assert _published(dm.cache) == _published(corpus["ref"])  # byte for byte
    assert sorted(p.name for p in dm.cache.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    dm.setup()


def test_another_corpus_stamp_or_tokenizer_starts_over(corpus, tmp_path, monkeypatch, caplog):
    """A progress file whose corpus stamp differs (as left by a prepare of an edited corpus) is not resumed:
    everything is tokenized again, with the same result; so is one made with another tokenizer."""
    _killed_run(corpus, tmp_path, signal.SIGKILL)
    (progress,) = next(tmp_path.glob("*")).glob(".prepare.*.json")
    state = json.loads(progress.read_text())
    state["identity"]["stamp"][0][1] += 1  # a file of another size
    progress.write_text(json.dumps(state))
    dm, tokenized = _rerun(corpus, tmp_path, monkeypatch, caplog)
    assert "an interrupted prepare there was of another stamp; starting over" in caplog.text
    assert "resuming" not in caplog.text
    assert tokenized == _chars_from_shard(corpus, 0)
    assert _published(dm.cache) == _published(corpus["ref"])
    assert sorted(p.name for p in dm.cache.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    # another tokenizer at the same path (the cache folder is the same): interrupted, then started over
    caplog.clear()
    other = Tokenizer.train([_text(random.Random(1), 3000)], "bpe", 280)
    tokenizer = tmp_path / "other.json"
    other.save(tokenizer)
    killed = _dm(corpus["folder"], tokenizer, tmp_path / "c2")
    real = stream.encode_pieces

    def interrupt_second(texts, *args, _calls=[], **kwargs):  # noqa: B006 - the call counter
        _calls.append(1)
        if len(_calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the first shard
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(stream, "encode_pieces", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        killed.prepare_data()
    assert _progress(killed.cache)["done"] == 1
    Tokenizer.train([_text(random.Random(2), 3000)], "bpe", 290).save(tokenizer)
    monkeypatch.setattr(stream, "encode_pieces", real)
    dm, tokenized = _rerun({**corpus, "tokenizer": tokenizer}, tmp_path / "c2", monkeypatch, caplog)
    assert dm.cache == killed.cache
    assert "another tokenizer; starting over" in caplog.text and "resuming" not in caplog.text
    assert tokenized == _chars_from_shard(corpus, 0)
    fresh = _dm(corpus["folder"], tokenizer, tmp_path / "fresh")
    fresh.prepare_data()
    assert _published(dm.cache) == _published(fresh.cache)


def test_interrupted_worker_prepare_resumes(corpus, tmp_path, monkeypatch, caplog):
    """The same with tokenizer worker processes (num_proc=2) and about 3 batches a shard, interrupted in the
    middle of a shard: the batches written after the last finished shard are cut off, the rest resumed."""
    monkeypatch.setattr(stream, "SHARD_CHARS", SHARD_CHARS)
    monkeypatch.setattr(stream, "PIECE_CHARS", PIECE_CHARS)
    real_tokenize = stream.tokenize_to_files
    monkeypatch.setattr(
        "lit_llm.data.text.tokenize_to_files", lambda *a, **k: real_tokenize(*a, **k, batch_chars=10_000)
    )
    real_call, calls = stream.Progress.__call__, []

    def interrupt_at_eleventh_batch(self, docs, tokens):
        real_call(self, docs, tokens)
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt

    monkeypatch.setattr(stream.Progress, "__call__", interrupt_at_eleventh_batch)
    kw = dict(tokenizer=str(corpus["tokenizer"]), cache_dir=str(tmp_path), seq_len=16, num_proc=2)
    killed = TextDataModule(str(corpus["folder"]), **kw)
    with pytest.raises(KeyboardInterrupt):
        killed.prepare_data()
    state = _progress(killed.cache)
    done, n = state["done"], corpus["shards"]
    assert 2 <= done < n
    written = {s: (killed.cache / name).stat().st_size for s, name in state["tmp"].items()}
    assert written["train"] > state["files"]["train"][0]  # batches of the unfinished shard were written
    monkeypatch.setattr(stream.Progress, "__call__", real_call)
    dm = TextDataModule(str(corpus["folder"]), **kw)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert f"resuming from shard {done + 1}/{n}" in caplog.text
    assert _published(dm.cache) == _published(corpus["ref"])
