"""The supervised losses against values computed by hand (math.log / math.exp, not torch's own functions)."""

from __future__ import annotations

import math

import torch

from lit_llm.losses import IGNORE_INDEX, bradley_terry_loss, masked_lm_loss, next_token_loss


def _nll(row: list[float], target: int) -> float:
    """``-log softmax(row)[target]`` by hand."""
    return math.log(sum(math.exp(v) for v in row)) - row[target]


LOGITS = [
    [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]],
    [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
]


def test_next_token_loss_by_hand():
    targets = [[1, 0], [0, 2]]
    want = sum(_nll(LOGITS[b][t], targets[b][t]) for b in range(2) for t in range(2)) / 4
    got = next_token_loss(torch.tensor(LOGITS, dtype=torch.bfloat16), torch.tensor(targets))
    assert got.dtype == torch.float32
    assert math.isclose(float(got), want, rel_tol=1e-6)  # these logits are exact in bfloat16


def test_masked_lm_loss_ignores_unlabelled_tokens():
    labels = [[IGNORE_INDEX, 2], [0, 1]]
    labelled = [(0, 1, 2), (1, 0, 0), (1, 1, 1)]
    want = sum(_nll(LOGITS[b][t], y) for b, t, y in labelled) / 3
    loss, acc = masked_lm_loss(torch.tensor(LOGITS), torch.tensor(labels))
    assert math.isclose(float(loss), want, rel_tol=1e-6)
    # argmax: (0,1) -> 2 right, (1,0) -> 0 right, (1,1) -> 2 wrong; the ignored (0,0) would be wrong anyway
    assert math.isclose(float(acc), 2 / 3, rel_tol=1e-6)
    # each labelled token counts once, whichever row: not the mean of per-row means
    per_row = (_nll(LOGITS[0][1], 2) + (_nll(LOGITS[1][0], 0) + _nll(LOGITS[1][1], 1)) / 2) / 2
    assert not math.isclose(float(loss), per_row, rel_tol=1e-4)
    nothing, _ = masked_lm_loss(torch.tensor(LOGITS), torch.full((2, 2), IGNORE_INDEX))
    assert math.isnan(float(nothing))


def test_bradley_terry_by_hand_with_margin_and_centering():
    rc, rr = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5]

    def neg_logsigmoid(x: float) -> float:
        return math.log(1 + math.exp(-x))

    plain = sum(neg_logsigmoid(c - r) for c, r in zip(rc, rr)) / 3
    got = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr))
    assert math.isclose(float(got), plain, rel_tol=1e-6)
    margin, coef = 0.3, 0.1
    want = sum(neg_logsigmoid(c - r - margin) for c, r in zip(rc, rr)) / 3
    want += coef * sum((c + r) ** 2 for c, r in zip(rc, rr)) / 3
    got = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr), margin=margin, center_coef=coef)
    assert math.isclose(float(got), want, rel_tol=1e-6)
