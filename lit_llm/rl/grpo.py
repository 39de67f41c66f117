"""GRPO math (Shao et al. 2024, DeepSeekMath): group-relative advantages and the clipped token-level loss.

Pure PyTorch, no Lightning. A rollout holds ``G`` replies to each prompt, the replies of one prompt in
consecutive rows (``prompts.repeat_interleave(G)``): rewards are ``(B,)`` with ``B = n_prompts * G``, and
token-level tensors are ``(B, T)`` over the reply tokens with a ``mask`` that is 1 on real tokens.

No critic: the baseline of a reply is the mean reward of its group, so a reply's advantage says how much
better it did than its siblings, and every token of the reply gets that advantage.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_llm.rl.ppo_math import _zero_padding, kl_estimate, masked_mean

Aggregation = Literal["token", "sequence"]

# added to the group std before dividing by it (as DeepSeekMath's and TRL's implementations do)
STD_EPS = 1e-4


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """``(B,)`` rewards -> ``(B // G, G)``, one row per prompt."""
    if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size} replies"
        )
    return rewards.float().view(-1, group_size)


def zero_spread(rewards: Tensor, group_size: int) -> Tensor:
    """``(B // G,)`` True for each group whose replies all got the same reward (no learning signal)."""
    g = _groups(rewards, group_size)
    return g.amax(-1) == g.amin(-1)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: bool = False) -> Tensor:
    """Each reply's reward minus the mean reward of its group, optionally divided by the group's std.

    Args:
        rewards: ``(B,)`` one scalar reward per reply; rows ``g*G .. g*G+G-1`` are the replies to prompt ``g``.
        group_size: ``G``, the replies per prompt.
        scale_rewards: Divide by the group's (unbiased) std plus ``1e-4`` (DeepSeekMath's GRPO); otherwise
            only the mean is subtracted (Dr. GRPO, Liu et al. 2025, which shows that dividing by the std
            weights each prompt by ``1 / std`` and so favours prompts that are nearly always or nearly never
            solved).

    Returns:
        ``(B,)`` advantages. A group whose rewards are all equal gets exactly 0 (never NaN), with or without
        scaling: it carries no information about which reply is better.
    """
    g = _groups(rewards, group_size)  # (n_prompts, G)
    adv = g - g.mean(-1, keepdim=True)
    if scale_rewards:
        # a group of one reply has no std (G >= 2 is required by the stage; here it just stays centred)
        std = g.std(-1, keepdim=True) if group_size > 1 else torch.ones_like(adv[:, :1])
        adv = adv / (std + STD_EPS)
    # the mean of equal floats can differ from them in the last bit: zero-spread groups are set to 0 exactly
    flat = torch.where(zero_spread(rewards, group_size)[:, None], torch.zeros_like(adv), adv)
    return flat.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def aggregate_loss(per_token: Tensor, mask: Tensor, level: Aggregation = "token") -> Tensor:
    """Reduce ``(B, T)`` per-token losses to a scalar.

    Args:
        per_token: ``(B, T)`` losses of each reply token.
        mask: ``(B, T)`` 1 on real reply tokens, 0 on padding.
        level: ``token``: the sum over every real token of the batch divided by the number of real tokens
            (DAPO, Dr. GRPO: every token weighs the same, whatever the length of its reply). ``sequence``:
            the mean over each reply, then the mean over replies (the original GRPO): a token of a short
            reply weighs more than one of a long reply, so short good replies and long bad ones are favoured
            (a length bias).

    Returns:
        A scalar tensor.
    """
    if level == "token":
        return masked_mean(per_token, mask)
    if level == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    raise ValueError(f"unknown loss aggregation {level!r}; expected 'token' or 'sequence'")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    level: Aggregation = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss: PPO's clipped surrogate with one advantage per reply, plus a KL penalty as a loss term.

    Per real token ``t`` of reply ``b``, with ``r = exp(logprobs - old_logprobs)``:
    ``loss[b, t] = -min(r * A[b], clip(r, 1 - eps, 1 + eps) * A[b]) + kl_coef * k3[b, t]``, where
    ``k3 = exp(ref - logprobs) - 1 - (ref - logprobs)`` estimates ``KL(pi || pi_ref)`` (unbiased, >= 0;
    its gradient pulls the policy towards the reference). The per-token losses are reduced by
    :func:`aggregate_loss`.

    Args:
        logprobs: ``(B, T)`` log-probs of the reply tokens under the current policy (with gradients).
        old_logprobs: ``(B, T)`` the same under the policy that sampled them (rollout time).
        advantages: ``(B,)`` one advantage per reply (:func:`group_advantages`).
        mask: ``(B, T)`` 1 on real reply tokens.
        clip_eps: Clip range of the ratio.
        ref_logprobs: ``(B, T)`` log-probs under the frozen reference; ``None`` (with ``kl_coef`` 0) leaves
            the KL term out.
        kl_coef: Weight of the KL term.
        level: Loss aggregation, see :func:`aggregate_loss`.

    Returns:
        ``(loss, stats)``; ``stats`` holds detached scalars ``clipfrac`` (share of tokens where the clip is
        active), ``approx_kl`` (k3 estimate of ``KL(pi_old || pi)``), ``ratio_mean`` and, with a reference,
        ``kl`` (mean k3 per token to the reference).
    """
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    keep = mask.bool()
    # a zero log-ratio on padding: exp() of garbage there can never produce inf/nan
    log_ratio = _zero_padding(logprobs - old_logprobs, keep)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(ratio.dtype)  # (B, 1): every token of a reply has the reply's advantage
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    stats: dict[str, Tensor] = {}
    if ref_logprobs is not None:
        kl = _zero_padding(kl_estimate(logprobs, ref_logprobs, "k3"), keep)
        if kl_coef:
            per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl.detach(), keep)
    loss = aggregate_loss(per_token, keep, level)
    with torch.no_grad():
        stats["clipfrac"] = masked_mean((clipped > unclipped).to(ratio.dtype), keep)
        stats["approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, keep)
        stats["ratio_mean"] = masked_mean(ratio, keep)
    return loss, stats
