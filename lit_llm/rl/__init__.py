"""PPO math for the RLHF stage (pure PyTorch, no Lightning).

All token-level tensors are ``(B, T)`` over the *response* tokens with a ``mask`` that is 1 on real
tokens and 0 on right padding. One PPO step fits together like this:

1. **Rollout.** The policy generates responses for a batch of prompts. Under ``torch.no_grad()`` compute
   ``old_logprobs = logprobs_from_logits(policy_logits, tokens)`` (policy at rollout time),
   ``ref_logprobs`` the same way with the frozen SFT/reference model, ``old_values`` from the value head,
   and ``mask`` for the response tokens. Score in eval mode (no dropout, so that the ratio starts at 1) and
   with the logits divided by the sampling temperature (the distribution the tokens were drawn from).
2. **Scores.** The reward model scores each full (prompt + response) sequence: ``scores`` of shape ``(B,)``.
3. **Rewards.** ``rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)``
   puts a per-token KL penalty ``-beta * kl`` on every token and the score on the last real token.
   ``kl_ctl.update(float(kl.sum(dim=1).mean()), n_steps=B)`` (mean per-sequence KL) adapts ``beta``
   for the next step (:class:`FixedKLController` / :class:`AdaptiveKLController`).
4. **Advantages.** ``advantages, returns = gae(rewards, old_values, mask, gamma, lam)``, then
   ``advantages = masked_whiten(advantages, mask)``.
5. **Optimisation.** For a few epochs over mini-batches of the rollout, recompute ``logprobs`` and
   ``values`` with gradients and minimise
   ``policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)[0]
   + vf_coef * value_loss(values, old_values, returns, mask, clip_eps_value)[0]``
   (optionally minus an entropy bonus from :func:`entropy_from_logits`). Log the returned stats
   (``clipfrac``, ``approx_kl``, ``ratio_mean``, ``vf_clipfrac``) and :func:`explained_variance`.

GRPO (:mod:`lit_llm.rl.grpo`) has no critic: ``G`` replies per prompt, :func:`group_advantages` (reward minus
the group mean, optionally over the group std) and :func:`grpo_loss` (the clipped surrogate with one advantage
per reply plus a k3 KL term to the reference, aggregated per token by :func:`aggregate_loss`).

What both stages share around the math (sampling, temperature-scaled logits, reward sources with clear errors
on bad rewards) is in :mod:`lit_llm.rl.scoring`.
"""

from lit_llm.rl.grpo import aggregate_loss, group_advantages, grpo_loss, zero_spread
from lit_llm.rl.kl_controller import AdaptiveKLController, FixedKLController
from lit_llm.rl.ppo_math import (
    KLKind,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from lit_llm.rl.scoring import (
    RewardError,
    RewardSources,
    Samples,
    check_sampling_for_rl,
    response_logits,
    rollout_table,
    sample_replies,
)

__all__ = [
    "AdaptiveKLController",
    "RewardError",
    "RewardSources",
    "Samples",
    "aggregate_loss",
    "check_sampling_for_rl",
    "group_advantages",
    "grpo_loss",
    "response_logits",
    "rollout_table",
    "sample_replies",
    "zero_spread",
    "FixedKLController",
    "KLKind",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_estimate",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]
