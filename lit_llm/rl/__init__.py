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
"""

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

__all__ = [
    "AdaptiveKLController",
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
