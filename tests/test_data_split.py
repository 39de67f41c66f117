"""Data read exactly once (issue 26): the prepared token stream split over ranks x DataLoader workers, with
no window read twice or lost beyond the documented remainder, and a mid-epoch resume without repeats or gaps.

Ranks are simulated in one process: ``torch.distributed`` is made to report a world of 2 and a rank, and the
training loader is built as the CLI builds it (``make_resumable(datamodule).train_dataloader()``), so its
``ResumableSampler`` takes ``num_replicas`` / ``rank`` from there, as under DDP.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch.distributed as dist

from lit_llm.data.text import TextDataModule
from lit_llm.resumable import ResumableDataLoader, make_resumable

SEQ_LEN, BATCH, WORLD = 16, 3, 2
TRAIN_DOCS = 24  # 16 tokens each (15 characters + <|eos|>): 24 * 16 tokens, (24 * 16 - 1) // 16 = 23 windows


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    """A small corpus prepared by TextDataModule (char tokenizer), its windows all different (so a window's
    content names its position)."""
    folder = tmp_path_factory.mktemp("split")
    rng = random.Random(0)
    path = folder / "docs.jsonl"
    docs = ["".join(rng.choice("abcdefghijklmnop ") for _ in range(15)) for _ in range(TRAIN_DOCS + 2)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dm = TextDataModule(
        str(path),
        tokenizer_kind="char",
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        val_docs=2,
        num_workers=2,
        cache_dir=str(folder / "cache"),
    )
    dm.prepare_data()
    dm.setup()
    return dm


def _loader(dm: TextDataModule, rank: int, world: int, monkeypatch) -> ResumableDataLoader:
    """The training loader rank ``rank`` of ``world`` builds (as under DDP)."""
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    loader = make_resumable(dm).train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and loader.num_workers == dm.num_workers
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (world, rank)
    return loader


def _windows(dm: TextDataModule, batches) -> list[int]:
    """The window index of every sequence of the batches (checked against the token file: x and y)."""
    tokens = np.asarray(dm.train_set.tokens).astype(np.int64)
    index = {tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN].tobytes(): i for i in range(len(dm.train_set))}
    out = []
    for x, y in batches:
        for xi, yi in zip(x.numpy(), y.numpy()):
            i = index[xi.tobytes()]
            assert (yi == tokens[i * SEQ_LEN + 1 : (i + 1) * SEQ_LEN + 1]).all()
            out.append(i)
    return out


def _epoch(loader: ResumableDataLoader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_windows_of_the_token_file_and_their_remainder(datamodule):
    """Windows are consecutive ``seq_len`` inputs; only the last ``(T - 1) % seq_len`` tokens are never a
    target (fewer than one sequence)."""
    tokens = np.asarray(datamodule.train_set.tokens)
    assert len(tokens) == TRAIN_DOCS * (SEQ_LEN)
    n = len(datamodule.train_set)
    assert n == (len(tokens) - 1) // SEQ_LEN == TRAIN_DOCS - 1
    windows = [datamodule.train_set[i] for i in range(n)]
    assert len({x.numpy().tobytes() for x, _ in windows}) == n  # the fixture's windows are all different
    inputs = np.concatenate([x.numpy() for x, _ in windows])
    targets = np.concatenate([y.numpy() for _, y in windows])
    assert (inputs == tokens[: n * SEQ_LEN]).all() and (targets == tokens[1 : n * SEQ_LEN + 1]).all()
    assert len(tokens) - (n * SEQ_LEN + 1) == (len(tokens) - 1) % SEQ_LEN == SEQ_LEN - 1


def test_two_ranks_two_workers_read_every_window_once(datamodule, monkeypatch):
    """2 ranks x 2 workers, batch 3: each epoch reads 23 // 6 = 3 global batches, every window at most once,
    and leaves out exactly 23 % 6 = 5 windows (the end of that epoch's order: others each epoch). With the
    sampler padding the uneven tail (the bug fixed here), rank 1 read a window of rank 0 again and each rank
    took a 4th step."""
    n = len(datamodule.train_set)
    left_out = []
    for epoch in (0, 1):
        per_rank = [
            _windows(datamodule, _epoch(_loader(datamodule, r, WORLD, monkeypatch), epoch)) for r in (0, 1)
        ]
        seen = Counter(per_rank[0] + per_rank[1])
        assert max(seen.values()) == 1, f"read twice: {[i for i, c in seen.items() if c > 1]}"
        assert [len(w) for w in per_rank] == [n // (WORLD * BATCH) * BATCH] * WORLD
        assert len(seen) == n - n % (WORLD * BATCH) == 18
        left_out.append(set(range(n)) - set(seen))
    assert left_out[0] != left_out[1]  # the remainder moves with the shuffle: no window is lost for good

    # the same global batches (as sets) as one process with batch 2 * 3, step for step
    with monkeypatch.context() as m:
        m.setattr(datamodule, "batch_size", WORLD * BATCH)
        single = _epoch(_loader(datamodule, 0, 1, m), 1)
    per_rank = [_epoch(_loader(datamodule, r, WORLD, monkeypatch), 1) for r in (0, 1)]
    assert len(single) == len(per_rank[0]) == len(per_rank[1]) == 3
    for step, batch in enumerate(single):
        ranks = _windows(datamodule, [per_rank[0][step], per_rank[1][step]])
        assert sorted(_windows(datamodule, [batch])) == sorted(ranks)


@pytest.mark.parametrize("k", [1, 2])
def test_resume_mid_epoch_on_two_ranks_continues_without_repeats_or_gaps(datamodule, monkeypatch, k):
    """After k batches each rank saves the loader's state; fresh loaders that load it read exactly the rest
    of the epoch (with 2 workers each, whose prefetched batches were never trained on)."""
    for rank in (0, 1):
        whole = _windows(datamodule, _epoch(_loader(datamodule, rank, WORLD, monkeypatch), 1))
        first = _loader(datamodule, rank, WORLD, monkeypatch)
        first.sampler.set_epoch(1)
        it = iter(first)
        head = _windows(datamodule, [next(it) for _ in range(k)])
        state = first.state_dict()
        assert state["epoch"] == 1 and state["samples"] == k * WORLD * BATCH
        del it
        fresh = _loader(datamodule, rank, WORLD, monkeypatch)
        fresh.load_state_dict(state)
        tail = _windows(datamodule, _epoch(fresh, 1))
        assert head + tail == whole


def test_resume_with_another_world_size_keeps_the_order_and_warns_when_the_global_batch_changes(
    datamodule, monkeypatch
):
    """State saved by 2 ranks (batch 3) after one step: 1 process with the same global batch (6) continues
    with the windows the 2 ranks would have read next, silently; 1 process with global batch 4 continues at
    the same sample (nothing repeated) and warns that its batches differ from the first run's."""
    import warnings

    first = _loader(datamodule, 0, WORLD, monkeypatch)
    first.sampler.set_epoch(1)
    next(iter(first))
    state = first.state_dict()
    assert state["samples"] == WORLD * BATCH
    ranks_rest = [_epoch(_loader(datamodule, r, WORLD, monkeypatch), 1)[1:] for r in (0, 1)]
    read = [
        w
        for r in (0, 1)
        for w in _windows(datamodule, _epoch(_loader(datamodule, r, WORLD, monkeypatch), 1)[:1])
    ]
    for global_batch, warns in ((WORLD * BATCH, False), (4, True)):
        with monkeypatch.context() as m:
            m.setattr(datamodule, "batch_size", global_batch)
            one = _loader(datamodule, 0, 1, m)
            one.load_state_dict(state)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rest = _epoch(one, 1)
        messages = [str(w.message) for w in caught if "another batch size" in str(w.message)]
        assert bool(messages) == warns, messages
        got = _windows(datamodule, rest)
        assert not set(got) & set(read)  # nothing already trained on is read again
        if not warns:  # the same global batches as the 2 ranks, step for step
            assert len(rest) == len(ranks_rest[0])
            for step, batch in enumerate(rest):
                want = _windows(datamodule, [ranks_rest[0][step], ranks_rest[1][step]])
                assert sorted(_windows(datamodule, [batch])) == sorted(want)
        else:
            assert "6 samples were consumed" in messages[0] and "global batch 4" in messages[0]
