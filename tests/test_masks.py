"""Masks and positions by hand, and the models that depend on them: packing, left-padded scoring, batched
generation. The model tests use learned positions, which see a wrong position that RoPE (relative) hides."""

from __future__ import annotations

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.backbone.generate import generate
from lit_llm.backbone.masks import (
    causal_mask,
    last_token_index,
    local_mask,
    packed_mask,
    padding_mask,
    positions_from_padding,
    positions_from_segments,
)


def _m(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_causal_mask_by_hand():
    assert torch.equal(causal_mask(3), _m([[1, 0, 0], [1, 1, 0], [1, 1, 1]])[None, None])
    # two queries after two cached keys, five key slots (the last one is future for both)
    want = _m([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    assert torch.equal(causal_mask(2, q_start=2, n_keys=5), want[None, None])
    assert causal_mask(2, q_start=2).shape == (1, 1, 2, 4)


def test_padding_mask_left_right_and_fully_padded_rows():
    valid = _m([[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    m = padding_mask(valid)
    assert m.shape == (3, 1, 3, 3)
    left = _m([[1, 0, 0], [0, 1, 0], [0, 1, 1]])  # padded query 0 sees only itself
    right = _m([[1, 0, 0], [1, 1, 0], [1, 1, 1]])  # trailing pad query sees the real keys and itself
    empty = _m([[1, 0, 0], [0, 1, 0], [0, 0, 1]])  # only the diagonal
    assert torch.equal(m[:, 0], torch.stack([left, right, empty]))
    # one decoding query at absolute index 2 over 4 slots: slot 3 is future
    step = padding_mask(_m([[0, 1, 1, 1]]), q_start=2, q_len=1, n_keys=4)
    assert torch.equal(step[0, 0], _m([[0, 1, 1, 0]]))


def test_packed_mask_by_hand():
    m = packed_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    want = _m(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(m, want[None, None])


def test_local_mask_chunk_and_window():
    pos = torch.arange(5)[None]
    chunk = _m(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(local_mask(pos, pos, 2, None)[0, 0], chunk)
    # q - k < 2: the key itself and the one before (and, without causality, every later key)
    window = _m(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(local_mask(pos, pos, None, 2)[0, 0], window)
    assert torch.equal(local_mask(pos, pos, 2, 2)[0, 0], chunk & window)
    assert bool(local_mask(pos, pos, None, None).all())


def test_positions_by_hand():
    valid = _m([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_padding(valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 2, 2]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]]


def test_last_token_index_and_empty_rows():
    valid = _m([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    assert last_token_index(valid).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match=r"rows \[0, 2\] are all padding"):
        last_token_index(_m([[0, 0], [0, 1], [0, 0]]))


def _learned_model(vocab: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(
        "tiny", pos="learned", vocab_size=vocab, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2
    )
    return Transformer(cfg).float().eval()


def test_packed_logits_equal_unpacked_with_learned_positions():
    from lit_llm.data.sft import collate_packed
    from lit_llm.losses import IGNORE_INDEX, masked_lm_loss

    model = _learned_model()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 5, 9):
        x = torch.randint(1, 64, (n,), generator=g).tolist()
        y = [IGNORE_INDEX] * 2 + torch.randint(1, 64, (n - 2,), generator=g).tolist()
        examples.append((x, y))
    packed = collate_packed([examples], 24, pad_id=0)
    with torch.no_grad():
        logits = model(packed["input_ids"], packed["positions"], packed["attn_mask"])[0]
        start, alone_logits, alone_labels = 0, [], []
        for x, y in examples:
            alone = model(torch.tensor([x]))[0]
            torch.testing.assert_close(logits[start : start + len(x)], alone, atol=1e-5, rtol=1e-5)
            start += len(x)
            alone_logits.append(alone)
            alone_labels.append(torch.tensor(y))
        lp, _ = masked_lm_loss(logits[None], packed["labels"])
        lu, _ = masked_lm_loss(torch.cat(alone_logits)[None], torch.cat(alone_labels)[None])
    torch.testing.assert_close(lp, lu, atol=1e-5, rtol=1e-5)


def test_left_padded_scores_equal_scores_alone_with_learned_positions():
    from lit_llm.backbone.generate import left_pad
    from lit_llm.backbone.heads import ScalarHeadModel

    torch.manual_seed(0)
    scorer = ScalarHeadModel(_learned_model()).eval()
    seqs = [[5, 9, 3, 7, 1, 2], [4, 8], [11, 12, 13, 14]]
    ids, valid = left_pad(seqs, pad_id=0)
    with torch.no_grad():
        batch = scorer(ids, valid)
        alone = torch.stack(
            [scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))[0] for s in seqs]
        )
        values = scorer.values(ids, valid)
        for i, s in enumerate(seqs):
            own = scorer.values(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))[0]
            torch.testing.assert_close(values[i, -len(s) :], own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_batched_generation_stops_rows_independently():
    model = _learned_model(seed=3)
    prompts = [[5, 9, 3], [7, 1, 2, 8, 6], [11, 4]]
    free = [generate(model, [p], 12).response_lists()[0] for p in prompts]
    # stop on a token row 0 emits early that rows 1 and 2 never emit before their later steps
    stop = None
    for step, t in enumerate(free[0][:6]):
        first_other = [r.index(t) if t in r else len(r) for r in free[1:]]
        if min(first_other) > step + 2:
            stop = t
            break
    assert stop is not None, free
    alone = [generate(model, [p], 12, stop_tokens=[stop]).response_lists()[0] for p in prompts]
    lengths = [len(r) for r in alone]
    assert lengths[0] < max(lengths[1:]), (alone, stop)  # rows really stop at different steps
    batch = generate(model, prompts, 12, stop_tokens=[stop])
    assert batch.response_lists() == alone
    # also without the KV cache
    assert generate(model, prompts, 12, stop_tokens=[stop], use_cache=False).response_lists() == alone


def test_reward_model_scores_a_left_padded_batch_as_each_alone():
    from lit_llm.data import tinyworld
    from lit_llm.evaluation import RewardModel
    from lit_llm.tokenizer import Tokenizer

    tok = Tokenizer.train(tinyworld.pretrain_text(20), "char")
    rm = RewardModel(_learned_model(vocab=tok.vocab_size, seed=5)).eval()
    prompts = ["Where is Alice?", "Hi", "Bob has 3 cups. How many cups does Bob have?"]
    responses = ["Alice is in the park.", "Hello there, I am here.", "3"]
    batch = rm.score(tok, prompts, responses)
    alone = torch.cat([rm.score(tok, [p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert batch.std() > 1e-3  # distinct scores: the comparison is not of constants
