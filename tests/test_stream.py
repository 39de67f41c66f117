"""Streaming prepare of pretraining text (issue 15): same tokens as reading the corpus whole, bounded
tokenizer sample, validation by size, bad input, crash safety, uint32 ids."""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import os
import random

import numpy as np
import pytest

from lit_llm.data import stream
from lit_llm.data.common import split_train_val
from lit_llm.data.text import TextDataModule
from lit_llm.errors import DataError
from lit_llm.tokenizer import Tokenizer

from .conftest import QUIET, ROOT

WORDS = "the cat sat on a mat , while Alice  counted 42 apples ; über naïve 東京 don't it's".split(" ")
SPACES = [" ", " ", " ", "\n", "\n\n", "\r\n", " \n", "\n ", "\t", "  ", "\n\n\n", "\u00a0", "\u3000"]


def messy_text(n_words: int, seed: int = 0) -> str:
    """Words joined by every kind of whitespace run (the places a careless cut changes BPE tokens)."""
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(n_words))


def in_memory_prepare(
    train: list[str], val: list[str], kind: str, vocab: int
) -> tuple[Tokenizer, list, list]:
    """The implementation before streaming: the tokenizer trained on all training documents, every id of
    a split in one list, ``<|eos|>`` after each document."""
    tok = Tokenizer.train(train, kind, vocab)

    def ids(docs):
        out = []
        for enc in tok.encode_batch(docs):
            out += [*enc, tok.eos_id]
        return out

    return tok, ids(train), ids(val)


def prepared(dm: TextDataModule) -> tuple[np.ndarray, np.ndarray]:
    dm.prepare_data()
    meta = json.loads((dm.cache / "meta.json").read_text())
    return tuple(np.fromfile(dm.cache / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val"))


@pytest.mark.parametrize("kind,vocab", [("bpe", 400), ("char", 0)])
def test_text_file_in_pieces_tokenizes_as_whole(tmp_path, monkeypatch, kind, vocab):
    text = messy_text(6000)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    monkeypatch.setattr(stream, "PIECE_CHARS", 300)  # ~100 pieces, cut at many whitespace patterns
    dm = TextDataModule(
        str(path), tokenizer_kind=kind, tokenizer_vocab_size=vocab, seq_len=8, cache_dir=str(tmp_path)
    )
    train, val = prepared(dm)
    cut = int(len(text) * 0.9)
    tok, ref_train, ref_val = in_memory_prepare([text[:cut]], [text[cut:]], kind, vocab)
    assert dm.tokenizer.to_str() == tok.to_str()  # the tokenizer saw the same text
    assert train.tolist() == ref_train and val.tolist() == ref_val


def test_records_folder_match_in_memory_and_workers(tmp_path):
    rng = random.Random(1)
    docs = [messy_text(rng.randint(1, 60), seed=i) for i in range(300)]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    records.insert(5, {"id": "no text"})  # skipped and counted
    records.insert(9, {"text": None})
    lines = [json.dumps(r) for r in records]
    (folder / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(lines[:150]).encode()))
    (folder / "sub" / "b.jsonl.bz2").write_bytes(bz2.compress("\n".join(lines[150:]).encode()))
    (folder / "empty.txt").write_text("  \n")  # skipped and counted
    (folder / "notes.md").write_text("ignored: not a corpus file type")
    kw = dict(tokenizer_vocab_size=400, seq_len=8, cache_dir=str(tmp_path / "c"))
    dm = TextDataModule(str(folder), **kw)
    train, val = prepared(dm)
    ref_tok, ref_train, ref_val = in_memory_prepare(*split_train_val(docs, 0.1, "x"), "bpe", 400)
    assert dm.tokenizer.to_str() == ref_tok.to_str()
    assert train.tolist() == ref_train and val.tolist() == ref_val
    stats = json.loads((dm.cache / "meta.json").read_text())["stats"]
    assert stats["documents"] == 300 and stats["records_without_text"] == 2
    assert stats["empty_files"] == [str(folder / "empty.txt")] and stats["files"] == 3
    # worker processes write the same files; a glob of the same files is the same corpus
    workers = TextDataModule(
        str(folder) + "/**/*.jsonl.*", num_proc=2, tokenizer=str(dm.cache / "tokenizer.json"), **kw
    )
    w_train, w_val = prepared(workers)
    assert np.array_equal(w_train, train) and np.array_equal(w_val, val)


def test_val_docs_holds_out_a_fixed_number_of_documents(tmp_path):
    docs = [f"document number {i} is here." for i in range(50)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    dm = TextDataModule(
        str(path), text_field="body", tokenizer_kind="char", val_docs=3, seq_len=8, cache_dir=str(tmp_path)
    )
    train, val = prepared(dm)
    tok = dm.tokenizer
    assert tok.decode(val.tolist()) == "".join(docs[-3:]) and int((val == tok.eos_id).sum()) == 3
    assert int((train == tok.eos_id).sum()) == 47
    dm.setup()
    assert dm.sample_prompts() == ["document number 47 is", "document number 48 is"]  # from val tokens
    with pytest.raises(DataError, match="cannot hold out 50 for validation"):
        TextDataModule(str(path), text_field="body", val_docs=50, cache_dir=str(tmp_path)).prepare_data()


def test_tokenizer_sample_is_bounded_and_spread():
    sample = stream.SpreadSample(max_chars=1000)
    for i in range(10_000):
        sample.add(f"{i:09d}\n", tag=i)  # 10 chars each: 100 kept pieces at most
    tags = [t for _, t, _ in sample.kept]
    assert sample.chars <= 1000 and len(tags) >= 50  # the budget, and not far below it
    assert tags[0] == 0 and tags[-1] >= 9000  # spans the stream, not only its start
    assert len(set(np.diff(tags))) == 1  # evenly
    small = stream.SpreadSample(max_chars=1000)
    for i in range(30):
        small.add("x" * 10, tag=i)
    assert [t for _, t, _ in small.kept] == list(range(30))  # a corpus within the budget is taken whole


def test_tokenizer_trained_on_sample_of_large_corpus(tmp_path, monkeypatch):
    # the second half of the corpus uses words the first half never does: a sample of only the start
    # would leave them out of the vocabulary
    half = 200
    docs = [f"alpha beta gamma {i}" for i in range(half)] + [f"zyxw vuts {i}" for i in range(half)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    dm = TextDataModule(
        str(path), tokenizer_sample_chars=2000, tokenizer_vocab_size=300, cache_dir=str(tmp_path)
    )
    sample = dm._scan()[2]
    assert sum(map(len, sample)) <= 2000 and len(sample) < len(docs)
    assert any("zyxw" in s for s in sample) and any("alpha" in s for s in sample)
    assert "zyxw" in "".join(dm.tokenizer.tok.get_vocab())


def test_undecodable_bytes_fail_with_offset_or_are_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "LINE_BYTES", 7)  # lines arrive in parts, characters split across reads
    good = "héllo wörld, ünïcode everywhere\n" * 40
    bad_at = len(good.encode()) + len("東京東".encode())
    raw = good.encode() + "東京東".encode() + b"\xff\xfe" + good.encode()
    path = tmp_path / "big.txt"
    path.write_bytes(raw)
    dm = TextDataModule(str(path), tokenizer_kind="char", seq_len=8, cache_dir=str(tmp_path / "a"))
    with pytest.raises(DataError, match=f"undecodable byte at offset {bad_at:,} .*line 41.*on_decode_error"):
        dm.prepare_data()
    assert raw[bad_at] == 0xFF
    dm = TextDataModule(
        str(path), tokenizer_kind="char", seq_len=8, cache_dir=str(tmp_path / "b"), on_decode_error="replace"
    )
    train, val = prepared(dm)
    assert json.loads((dm.cache / "meta.json").read_text())["stats"]["replaced_bytes"] == 2
    assert dm.tokenizer.decode(np.concatenate([train, val]).tolist()) == raw.decode("utf-8", "replace")


def test_no_record_has_the_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"content": "x"}) for _ in range(5)))
    with pytest.raises(DataError, match="is empty.*5 records without text.*set text_field"):
        TextDataModule(str(path), cache_dir=str(tmp_path)).prepare_data()


def test_parquet_files_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"row {i} of the table" for i in range(40)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "t.parquet", row_group_size=7)
    dm = TextDataModule(
        str(tmp_path / "t.parquet"), tokenizer_kind="char", seq_len=8, cache_dir=str(tmp_path)
    )
    train, val = prepared(dm)
    assert dm.tokenizer.decode(val.tolist()) == "".join(docs[-4:])


def _corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(messy_text(3000))
    return path


def test_interrupted_prepare_leaves_no_cache_and_reruns_cleanly(tmp_path, monkeypatch):
    path = _corpus(tmp_path)
    monkeypatch.setattr(stream, "PIECE_CHARS", 500)
    kw = dict(tokenizer_kind="char", seq_len=8, cache_dir=str(tmp_path / "c"))
    real_tokenize, real_encode, calls = stream.tokenize_to_files, stream.encode_pieces, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill mid-prepare, after two batches were written
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(stream, "encode_pieces", crash_on_third)
    monkeypatch.setattr(  # small batches, so the crash comes mid-file
        "lit_llm.data.text.tokenize_to_files", lambda *a, **k: real_tokenize(*a, **k, batch_chars=1000)
    )
    dm = TextDataModule(str(path), **kw)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    # no token file, no meta (only hidden temporary files a rerun resumes from: tests/test_prepare_resume.py)
    assert sorted(p.name for p in dm.cache.iterdir() if not p.name.startswith(".")) == ["tokenizer.json"]
    with pytest.raises(DataError, match="not prepared.*prepare_data"):
        TextDataModule(str(path), **kw).setup()
    monkeypatch.setattr(stream, "encode_pieces", real_encode)
    again = TextDataModule(str(path), **kw)
    train, val = prepared(again)
    again.setup()
    assert len(train) + len(val) == len(path.read_bytes().decode()) + 2  # a char each, two <|eos|>


def test_stale_temp_files_removed_and_truncated_cache_refused(tmp_path):
    path = _corpus(tmp_path)
    kw = dict(tokenizer_kind="char", seq_len=8, cache_dir=str(tmp_path / "c"))
    dm = TextDataModule(str(path), **kw)
    dm.cache.mkdir(parents=True)
    dead = dm.cache / f".train.bin.999999999@{os.uname().nodename}.tmp"  # a killed process's leftover
    other = dm.cache / ".train.bin.999999999@another-node.tmp"  # another machine's, on a shared folder
    dead.write_bytes(b"half")
    other.write_bytes(b"half")
    dm.prepare_data()
    assert not dead.exists() and other.exists()
    with open(dm.cache / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="incomplete.*delete the folder"):
        TextDataModule(str(path), **kw).setup()


def test_disk_full_keeps_previous_files(tmp_path, monkeypatch):
    path = _corpus(tmp_path)
    dm = TextDataModule(str(path), tokenizer_kind="char", seq_len=8, cache_dir=str(tmp_path / "c"))
    dm.tokenizer  # noqa: B018 - trains and caches the tokenizer
    (dm.cache / "train.bin").write_bytes(b"previous")

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = stream.TokenFile.__init__

    def init(self, p):
        real_init(self, p)
        self.f = FullDisk(self.f)

    monkeypatch.setattr(stream.TokenFile, "__init__", init)
    with pytest.raises(OSError, match="disk full.*previous cache is untouched.*cache_dir"):
        dm.prepare_data()
    assert (dm.cache / "train.bin").read_bytes() == b"previous"
    assert sorted(p.name for p in dm.cache.iterdir()) == ["tokenizer.json", "train.bin"]


def test_vocabulary_over_uint16_is_stored_as_uint32(tmp_path):
    base = Tokenizer.train(["abc"], "char")
    base.tok.add_tokens([f"<w{i}>" for i in range(70_000)])
    assert base.vocab_size > 65_536
    tok_path = tmp_path / "tokenizer.json"
    base.save(tok_path)
    text = "".join(f"a<w{i}>b" for i in range(69_990, 70_000)) * 3
    (tmp_path / "t.txt").write_text(text)
    dm = TextDataModule(str(tmp_path / "t.txt"), tokenizer=str(tok_path), seq_len=4, cache_dir=str(tmp_path))
    train, val = prepared(dm)
    assert train.dtype == np.uint32 and int(train.max()) > 65_535
    assert dm.tokenizer.decode(train.tolist(), skip_special=False).startswith("a<w69990>b")
    assert stream.token_dtype(65_536) == "uint16" and stream.token_dtype(65_537) == "uint32"


def test_corpus_config_trains_from_a_folder(tmp_path, monkeypatch):
    from lit_llm.cli import main

    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(3):
        (folder / f"{f}.txt").write_text(messy_text(400, seed=f))
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/pretrain/corpus.yaml"),
            *QUIET,
            *("--data.source", str(folder), "--data.val_docs", "1", "--data.seq_len", "32"),
            *("--data.tokenizer_vocab_size", "300", "--data.batch_size", "2", "--trainer.max_steps", "2"),
            *("--trainer.limit_val_batches", "1", "--trainer.precision", "32-true", "--model.preset", "tiny"),
            *("--model.model_overrides", "{n_layer: 1, n_embd: 32, n_head: 2, n_kv_head: 1}"),
        ]
    )
    assert (tmp_path / "checkpoints/pretrain-corpus/last.ckpt").exists()
    (cache,) = (tmp_path / "data_cache").iterdir()
    assert json.loads((cache / "meta.json").read_text())["stats"]["files"] == 3


def test_prefetch_keeps_order_raises_reader_errors_and_stops_early():
    import threading

    def reader():
        yield from range(5)
        raise DataError("bad byte at offset 7")

    got = []
    with pytest.raises(DataError, match="offset 7"):
        for item in stream.prefetch(reader()):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    endless = stream.prefetch(iter(range(10**9)))
    assert next(endless) == 0
    endless.close()  # the consumer stops early (an error while writing): the reader thread ends too
    assert not any(t.name == "corpus-reader" for t in threading.enumerate())
