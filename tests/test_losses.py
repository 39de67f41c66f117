"""The supervised losses against values computed by hand (math.log / math.exp, not torch's own functions)."""

from __future__ import annotations

import math

import torch

from lit_llm.losses import (
    IGNORE_INDEX,
    bradley_terry_loss,
    dpo_loss,
    masked_lm_loss,
    next_token_loss,
    sequence_logprobs,
)


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


# ---- DPO: log-probs of replies and the preference losses, by hand ----


def test_sequence_logprobs_summed_and_averaged_by_hand():
    # row 0 scores its second token only; row 1 both tokens
    labels = [[IGNORE_INDEX, 2], [0, 1]]
    row0 = -_nll(LOGITS[0][1], 2)
    row1 = [-_nll(LOGITS[1][0], 0), -_nll(LOGITS[1][1], 1)]
    summed = sequence_logprobs(torch.tensor(LOGITS), torch.tensor(labels))
    assert summed.shape == (2,)
    assert math.isclose(float(summed[0]), row0, rel_tol=1e-6)
    assert math.isclose(float(summed[1]), row1[0] + row1[1], rel_tol=1e-6)
    averaged = sequence_logprobs(torch.tensor(LOGITS), torch.tensor(labels), average=True)
    assert math.isclose(float(averaged[0]), row0, rel_tol=1e-6)
    assert math.isclose(float(averaged[1]), (row1[0] + row1[1]) / 2, rel_tol=1e-6)


def _logsigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# policy / reference log-probs of two pairs: (chosen, rejected) each
PC, PR, RC, RR = [-3.0, -5.0], [-6.0, -4.0], [-4.0, -4.5], [-5.0, -4.5]
# h = (pc - rc) - (pr - rr): pair 0: 1 - (-1) = 2; pair 1: -0.5 - 0.5 = -1
H = [2.0, -1.0]


def _dpo(**kwargs):
    return dpo_loss(*(torch.tensor(x) for x in (PC, PR, RC, RR)), **kwargs)


def test_dpo_loss_is_ln2_when_the_policy_is_the_reference():
    pc, pr = torch.tensor([-3.0, -7.5, -1.0]), torch.tensor([-6.0, -2.0, -1.5])
    loss, stats = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    assert float(stats["margin"]) == 0.0 and float(stats["acc"]) == 0.0  # no pair preferred yet


def test_dpo_sigmoid_loss_and_stats_by_hand():
    beta = 0.5
    loss, stats = _dpo(beta=beta)
    want = -(_logsigmoid(beta * H[0]) + _logsigmoid(beta * H[1])) / 2
    assert math.isclose(float(loss), want, rel_tol=1e-6)
    # implicit rewards beta * (policy - ref): chosen 0.5, -0.25; rejected -0.5, 0.25
    assert math.isclose(float(stats["reward_chosen"]), (0.5 - 0.25) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["reward_rejected"]), (-0.5 + 0.25) / 2, rel_tol=1e-6)
    assert math.isclose(float(stats["margin"]), (1.0 - 0.5) / 2, rel_tol=1e-6)
    assert float(stats["acc"]) == 0.5


def test_dpo_label_smoothing_by_hand():
    beta, eps = 0.5, 0.2
    loss, _ = _dpo(beta=beta, label_smoothing=eps)
    want = sum(-(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h) for h in H) / 2
    assert math.isclose(float(loss), want, rel_tol=1e-6)
    robust, _ = _dpo(beta=beta, label_smoothing=eps, loss_type="robust")
    want = sum((-(1 - eps) * _logsigmoid(beta * h) + eps * _logsigmoid(-beta * h)) / (1 - 2 * eps) for h in H)
    assert math.isclose(float(robust), want / 2, rel_tol=1e-6)


def test_ipo_and_hinge_by_hand():
    beta = 0.25  # IPO's target gap 1 / (2 beta) = 2
    ipo, _ = _dpo(beta=beta, loss_type="ipo")
    assert math.isclose(float(ipo), ((2.0 - 2.0) ** 2 + (-1.0 - 2.0) ** 2) / 2, rel_tol=1e-6)
    hinge, _ = _dpo(beta=beta, loss_type="hinge")
    assert math.isclose(float(hinge), (max(0.0, 1 - 0.5) + max(0.0, 1 + 0.25)) / 2, rel_tol=1e-6)
