"""The litdata path (issue 15): token chunks optimized from a corpus, streamed back in windows, resumable.

litdata is optional (it is not in the README's install): these tests skip without it."""

from __future__ import annotations

import json

import pytest

litdata = pytest.importorskip("litdata")

from lit_llm.data.chunks import ChunkedTextDataModule  # noqa: E402
from lit_llm.errors import DataError  # noqa: E402
from lit_llm.tokenizer import Tokenizer  # noqa: E402


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = {}
    for f in range(3):
        docs[f] = [f"file {f} doc {i} " * (i % 5 + 1) for i in range(60)]
        (folder / f"part{f}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[f]))
    tok = Tokenizer.train(["file doc 0123456789 "], "char")
    tok.save(tmp_path / "tokenizer.json")
    return folder, docs, tok


@pytest.mark.slow
def test_optimized_chunks_stream_the_corpus_tokens_and_resume(tmp_path):
    folder, docs, tok = _corpus(tmp_path)
    kw = dict(tokenizer=str(tmp_path / "tokenizer.json"), seq_len=15, batch_size=4)
    dm = ChunkedTextDataModule(str(tmp_path / "chunks"), source=str(folder), **kw)
    dm.prepare_data()
    dm.setup()
    ref = []  # the corpus as TextDataModule tokenizes it: each document's ids, then <|eos|>
    for d in docs[0] + docs[1]:
        ref += [*tok.encode(d), tok.eos_id]
    windows = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert len(windows) == len(ref) // 16  # non-overlapping windows of seq_len + 1
    unshuffled = litdata.StreamingDataset(
        str(tmp_path / "chunks/train"), item_loader=litdata.TokensLoader(16)
    )
    flat = [int(t) for i in range(len(unshuffled)) for t in unshuffled[i]]
    assert flat == ref[: len(flat)]
    ref_val = [t for d in docs[2] for t in [*tok.encode(d), tok.eos_id]]  # the last file is held out
    assert [int(t) for t in dm.val_set[0]] == ref_val[:16]
    # a loader's position survives a restart mid-epoch (what a resumed run needs)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        x, y = next(it)
    assert x.shape == (4, 15) and (x[:, 1:] == y[:, :-1]).all()
    state = loader.state_dict()
    expected = next(it)[0]
    resumed = ChunkedTextDataModule(str(tmp_path / "chunks"), **kw)  # no source: already optimized
    resumed.prepare_data()
    resumed.setup()
    again = resumed.train_dataloader()
    again.load_state_dict(state)
    assert (next(iter(again))[0] == expected).all()


def test_missing_chunks_and_too_few_files_are_clear(tmp_path):
    folder, _, _ = _corpus(tmp_path)
    kw = dict(tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no optimized token chunks.*set source"):
        ChunkedTextDataModule(str(tmp_path / "none"), **kw).prepare_data()
    with pytest.raises(DataError, match="3 files.*val_files=3"):
        ChunkedTextDataModule(str(tmp_path / "c"), source=str(folder), val_files=3, **kw).prepare_data()
    with pytest.raises(DataError, match="no index.json.*prepare_data"):
        ChunkedTextDataModule(str(tmp_path / "none"), **kw).setup()
    with pytest.raises(DataError, match="no tokenizer.json; set tokenizer or source"):
        ChunkedTextDataModule(str(tmp_path / "none")).vocab_size  # noqa: B018


def test_new_tokenizer_is_trained_on_training_files_and_saved(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in (("a", "abc"), ("b", "bcd"), ("c", "xyz")):  # c, the last, is held out
        (folder / f"{name}.txt").write_text(text * 10)
    dm = ChunkedTextDataModule(str(tmp_path / "out"), source=str(folder), tokenizer_kind="char")
    chars = set(dm.tokenizer.tok.get_vocab())
    assert {"a", "d"} <= chars and not {"x", "y", "z"} & chars
    assert ChunkedTextDataModule(str(tmp_path / "out")).vocab_size == dm.vocab_size  # saved, reused
