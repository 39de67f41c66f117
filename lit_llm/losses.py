"""The training losses of the supervised stages, as pure functions of tensors.

* :func:`next_token_loss`: pretraining, cross-entropy of every next token.
* :func:`masked_lm_loss`: SFT (and the reward model's optional LM term), cross-entropy on labelled tokens.
* :func:`bradley_terry_loss`: the reward model, pairwise preference of a chosen over a rejected reply.

The RL objectives (PPO's clipped losses, KL estimators) live in :mod:`lit_llm.rl`.
"""

from __future__ import annotations

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
    acc = (logits.argmax(-1)[keep] == labels[keep]).float().mean()
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
