"""The training losses of the supervised stages, as pure functions of tensors.

* :func:`next_token_loss`: pretraining, cross-entropy of every next token.
* :func:`masked_lm_loss`: SFT (and the reward model's optional LM term), cross-entropy on labelled tokens.
* :func:`bradley_terry_loss`: the reward model, pairwise preference of a chosen over a rejected reply.
* :func:`sequence_logprobs` and :func:`dpo_loss`: direct preference optimisation (DPO and its variants).

The RL objectives (PPO's clipped losses, KL estimators) live in :mod:`lit_llm.rl`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a token that is not trained on (prompt, padding, image placeholder): ``F.cross_entropy``'s default."""


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the targets, in float32 whatever the logits' dtype.

    Args:
        logits: ``(B, T, V)`` scores of the next token at every position.
        targets: ``(B, T)`` the next token ids (already shifted by one against the inputs).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled tokens, and the accuracy of the argmax there.

    Every labelled token counts once, whichever row it is in (a long reply weighs more than a short one).

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` next-token targets, :data:`IGNORE_INDEX` where not trained.

    Returns:
        ``(loss, accuracy)``, both scalars; NaN when no token is labelled.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    keep = labels != IGNORE_INDEX
    with torch.no_grad():
        # right where the label's logit is the row's largest (an exact tie counts as right): amax is ~10x
        # faster than argmax on CPU (0.03 vs 0.32 s for 8 x 192 bfloat16 rows of 49,152 logits)
        target = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        acc = (target >= logits.amax(-1))[keep].float().mean()
    return loss, acc


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0, center_coef: float = 0.0
) -> torch.Tensor:
    """``mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``.

    ``-logsigmoid(r_c - r_r)`` is the negative log-likelihood of the observed preference under the
    Bradley-Terry model ``P(chosen > rejected) = sigmoid(r_c - r_r)``. The centering term (Eisenstein et al.,
    2023) pins the reward's mean near zero, which the pairwise loss alone leaves free.

    Args:
        r_chosen: ``(B,)`` scores of the chosen replies.
        r_rejected: ``(B,)`` scores of the rejected replies.
        margin: Required score gap (0 = plain Bradley-Terry).
        center_coef: Weight of the centering term.
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust"]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each row's labelled tokens: summed (``log p(reply | prompt)``) or averaged.

    Computed in float32 with ``F.cross_entropy`` (no ``(B, T, V)`` log-softmax tensor is kept).

    Args:
        logits: ``(B, T, V)`` next-token scores.
        labels: ``(B, T)`` next-token targets, :data:`IGNORE_INDEX` where not scored (prompt, padding).
        average: Divide each row's sum by its number of labelled tokens (NaN for a row without any).

    Returns:
        ``(B,)`` float32.
    """
    B, T = labels.shape
    token_logp = -F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(B, T)  # 0 where ignored
    total = token_logp.sum(-1)
    if not average:
        return total
    return total / (labels != IGNORE_INDEX).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (Rafailov et al., 2023) and its one-line variants, from sequence log-probs ``(B,)``.

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``, the difference of the two
    log-ratios, and ``eps = label_smoothing``:

    * ``sigmoid``: ``-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)``: DPO, and with
      ``eps > 0`` conservative DPO (cDPO, Mitchell 2023): each label is taken as wrong with probability eps.
    * ``robust``: ``(-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)``:
      robust DPO (Chowdhury et al., 2024), an unbiased loss under label noise of rate eps (< 0.5).
    * ``hinge``: ``relu(1 - beta * h)``: SLiC-HF (Zhao et al., 2023).
    * ``ipo``: ``(h - 1 / (2 * beta))^2``: IPO (Azar et al., 2023), which regresses the log-ratio gap to a
      fixed target instead of pushing it to infinity. IPO is defined with log-probs averaged over tokens;
      this function takes whatever log-probs it is given (see ``DPOModule(average_logprobs=...)``).

    Args:
        policy_chosen: ``(B,)`` log-probs of the chosen replies under the policy.
        policy_rejected: ``(B,)`` the same for the rejected replies.
        ref_chosen: ``(B,)`` log-probs of the chosen replies under the frozen reference.
        ref_rejected: ``(B,)`` the same for the rejected replies.
        beta: Strength of the implicit KL constraint to the reference (IPO: the target gap is ``1/(2 beta)``).
        loss_type: ``sigmoid``, ``robust``, ``hinge`` or ``ipo`` (see above).
        label_smoothing: Assumed share of flipped labels, for ``sigmoid`` (cDPO) and ``robust`` only.

    Returns:
        ``(loss, stats)``: the mean loss over pairs, and detached means of ``reward_chosen`` /
        ``reward_rejected`` (the implicit rewards ``beta * (policy - ref)``), ``margin`` (their difference)
        and ``acc`` (the share of pairs whose chosen reply has the higher implicit reward).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to loss_type sigmoid or robust, not {loss_type!r}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of sigmoid, robust, hinge, ipo; got {loss_type!r}")
    reward_chosen, reward_rejected = (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
    stats = {
        "reward_chosen": reward_chosen.mean(),
        "reward_rejected": reward_rejected.mean(),
        "margin": (reward_chosen - reward_rejected).mean(),
        "acc": (reward_chosen > reward_rejected).float().mean(),
    }
    return losses.mean(), stats
