"""Token-level PPO math for RLHF: masked statistics, KL estimators, rewards, GAE and the PPO losses.

Every function here is pure PyTorch (no Lightning) and works on tensors shaped ``(B, T)`` over the
*response* tokens, together with a ``mask`` of the same shape that is 1 (or ``True``) on real response
tokens and 0 on padding after the end of a response. Masked reductions ignore padded positions exactly:
padded entries are replaced by zeros with :func:`torch.where` before any arithmetic, so even ``nan``/``inf``
garbage in padding cannot leak into the result.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_llm.backbone.masks import last_token_index

KLKind = Literal["k1", "k2", "k3"]

_WHITEN_EPS = 1e-8


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Return ``mask`` as a bool tensor broadcast to the shape of ``like``."""
    return mask.bool().expand_as(like)


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """Replace padded entries of ``x`` by exact zeros (also removes nan/inf stored in padding)."""
    keep = _bool_mask(mask, x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Float dtype used for reductions: half precision inputs are upcast to float32."""
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        return torch.float32
    return x.dtype


# ---------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set.

    Args:
        x: Values, shape ``(B, T)`` (any shape broadcast-compatible with ``mask``).
        mask: 1/``True`` on real tokens, 0/``False`` on padding, shape ``(B, T)``.
        dim: Reduce only along this dimension (e.g. ``dim=1`` gives a per-sequence mean of shape ``(B,)``).
            ``None`` reduces over all elements to a scalar.

    Returns:
        Scalar tensor if ``dim is None``, otherwise ``x`` reduced along ``dim``. A reduction over zero
        real tokens yields ``nan`` (0 / 0).
    """
    keep = _bool_mask(mask, x)
    values = _zero_padding(x, keep)
    count = keep.to(values.dtype)
    if dim is None:
        return values.sum() / count.sum()
    return values.sum(dim=dim) / count.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is set.

    Args:
        x: Values, shape ``(B, T)``.
        mask: 1/``True`` on real tokens, 0/``False`` on padding, shape ``(B, T)``.
        unbiased: Apply Bessel's correction ``n / (n - 1)`` where ``n`` is the number of real tokens.

    Returns:
        Scalar tensor with the masked variance.

    Raises:
        ValueError: If there are no real tokens, or only one token while ``unbiased=True``.
    """
    keep = _bool_mask(mask, x)
    n = int(keep.sum().item())
    if n == 0 or (unbiased and n < 2):
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} unmasked element(s), got {n} "
            f"(unbiased={unbiased})."
        )
    mean = masked_mean(x, keep)
    var = masked_mean((x - mean) ** 2, keep)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to unit variance (and optionally zero mean) using masked statistics.

    ``(x - mean) / sqrt(var + 1e-8)`` with ``mean``/``var`` (unbiased) computed over real tokens only. With
    ``shift_mean=False`` the mean is added back, i.e. only the scale changes.

    Args:
        x: Values, shape ``(B, T)``, typically advantages.
        mask: 1/``True`` on real tokens, 0/``False`` on padding, shape ``(B, T)``.
        shift_mean: If ``True`` the result has zero masked mean, otherwise it keeps the original mean.

    Returns:
        Whitened tensor of shape ``(B, T)``; padded positions are set to exactly 0. With a single real
        token the variance is undefined: the token is only centred (0, or its value with
        ``shift_mean=False``).

    Raises:
        ValueError: If there is no real token.
    """
    keep = _bool_mask(mask, x)
    mean = masked_mean(x, keep)
    if int(keep.sum()) == 1:
        return _zero_padding(x - mean if shift_mean else x, keep)
    var = masked_var(x, keep, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, keep)


# ---------------------------------------------------------------------------------------------------------
# KL estimators and rewards
# ---------------------------------------------------------------------------------------------------------


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token Monte-Carlo estimate of ``KL(pi || pi_ref)`` from samples drawn from ``pi``.

    With ``log_ratio = logprobs - ref_logprobs = log pi(x) - log pi_ref(x)`` (Schulman, "Approximating KL
    divergence", 2020):

    * ``k1 = log_ratio``: unbiased, high variance, can be negative per token.
    * ``k2 = 0.5 * log_ratio**2``: biased (exact to second order for nearby distributions), always >= 0.
    * ``k3 = exp(-log_ratio) - 1 + log_ratio``: unbiased and always >= 0, lower variance than ``k1``.

    Args:
        logprobs: Log-probabilities of the sampled tokens under the policy, shape ``(B, T)``.
        ref_logprobs: Log-probabilities of the same tokens under the reference model, shape ``(B, T)``.
        kind: Which estimator to use: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        Per-token KL estimate, shape ``(B, T)`` (padding is *not* masked here).

    Raises:
        ValueError: On an unknown ``kind``.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # expm1 keeps precision when log_ratio is close to 0.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator kind {kind!r}; expected 'k1', 'k2' or 'k3'.")


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: a KL penalty on every token plus the sequence score on the last token.

    ``rewards[b, t] = -kl_coef * kl[b, t]`` for every real token and ``scores[b]`` (optionally clipped to
    ``[-clip, clip]``) is added at the last real token of row ``b`` (InstructGPT / Ziegler et al. 2019).

    Args:
        scores: Reward-model score of each full sequence, shape ``(B,)``.
        logprobs: Policy log-probabilities of the response tokens at rollout time, shape ``(B, T)``.
        ref_logprobs: Reference-model log-probabilities of the same tokens, shape ``(B, T)``.
        mask: 1/``True`` on real response tokens, 0/``False`` on padding, shape ``(B, T)``. Rows may have
            different lengths; each row needs at least one real token.
        kl_coef: Weight ``beta`` of the per-token KL penalty.
        kind: KL estimator, see :func:`kl_estimate`.
        clip: If given, scores are clipped to ``[-clip, clip]`` before being added.

    Returns:
        ``(rewards, kl)``, both shape ``(B, T)`` and exactly 0 on padding.

    Raises:
        ValueError: If a row of ``mask`` has no real token or ``scores`` has the wrong shape.
    """
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"scores must have shape (B,)={(logprobs.shape[0],)}, got {tuple(scores.shape)}.")
    last = last_token_index(mask)
    kl = _zero_padding(kl_estimate(logprobs, ref_logprobs, kind), mask)
    rewards = -kl_coef * kl
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)
    return rewards, kl


# ---------------------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ---------------------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the value
    after the last real token is 0 (the episode ends there). The backward scan loops over ``T`` and is
    vectorised over the batch.

    Args:
        rewards: Per-token rewards, shape ``(B, T)`` (e.g. from :func:`compute_rewards`).
        values: Value-head predictions ``V_t`` for each response token, shape ``(B, T)``.
        mask: 1/``True`` on real tokens, 0/``False`` on padding, shape ``(B, T)``. Must be right-padded
            (a prefix of ones followed by zeros in every row).
        gamma: Discount factor.
        lam: GAE ``lambda``; ``lam=0`` gives one-step TD errors, ``lam=1`` Monte-Carlo returns minus values.

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values``, both ``(B, T)`` and 0 on padding.

    Raises:
        ValueError: If ``mask`` is not right-padded.
    """
    keep = mask.bool()
    if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise ValueError("gae expects a right-padded mask (ones followed by zeros in every row).")
    rewards = _zero_padding(rewards, keep)
    values = _zero_padding(values, keep)
    # Because padded values are 0, values[:, t + 1] is automatically 0 after the last real token.
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    running = torch.zeros_like(deltas[:, 0])
    reversed_advantages = []
    for t in reversed(range(deltas.shape[1])):
        # On padding delta is 0 and running is still 0, so advantages stay 0 there.
        running = deltas[:, t] + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = _zero_padding(advantages + values, keep)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    With ``r = exp(logprobs - old_logprobs)`` the per-token loss is
    ``-min(r * A, clip(r, 1 - eps, 1 + eps) * A)``, averaged over real tokens.

    Args:
        logprobs: Log-probabilities of the rollout tokens under the current policy (with grad), ``(B, T)``.
        old_logprobs: Log-probabilities under the policy that generated the rollout, ``(B, T)``.
        advantages: Advantage estimates (usually whitened), ``(B, T)``.
        mask: 1/``True`` on real tokens, 0/``False`` on padding, ``(B, T)``.
        clip_eps: Clip range ``eps`` of the ratio.

    Returns:
        ``(loss, stats)`` where ``loss`` is a scalar tensor and ``stats`` holds detached scalar tensors:

        * ``clipfrac``: fraction of real tokens where the clipped term is the active one (gradient is 0).
        * ``approx_kl``: masked mean of the k3 estimator ``(r - 1) - log r`` of ``KL(pi_old || pi)``
          (unbiased since tokens are sampled from ``pi_old``; always >= 0).
        * ``ratio_mean``: masked mean of ``r``.
    """
    keep = _bool_mask(mask, logprobs)
    # Zero log-ratio on padding so exp() of garbage can never produce inf/nan in values or gradients.
    log_ratio = _zero_padding(logprobs - old_logprobs, keep)
    ratio = torch.exp(log_ratio)
    advantages = _zero_padding(advantages, keep)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), keep),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),
            "ratio_mean": masked_mean(ratio, keep),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss used by PPO for language models.

    ``v_clip = clip(v, old - eps, old + eps)``; per-token loss ``0.5 * max((v - R)^2, (v_clip - R)^2)``,
    averaged over real tokens.

    Args:
        values: Current value predictions (with grad), ``(B, T)``.
        old_values: Value predictions at rollout time, ``(B, T)``.
        returns: GAE returns (targets), ``(B, T)``.
        mask: 1/``True`` on real tokens, 0/``False`` on padding, ``(B, T)``.
        clip_eps: Maximum change of the value prediction relative to ``old_values``.

    Returns:
        ``(loss, stats)``: scalar loss and detached stats with ``vf_clipfrac`` (fraction of real tokens
        where the clipped squared error is strictly larger and therefore the active one).
    """
    keep = _bool_mask(mask, values)
    values = _zero_padding(values, keep)
    old_values = _zero_padding(old_values, keep)
    returns = _zero_padding(returns, keep)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_err = (values - returns).square()
    clipped_err = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), keep)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_err > unclipped_err).to(values.dtype), keep)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# Logit utilities and diagnostics
# ---------------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution given by ``logits`` over the last dimension.

    Computed as ``logsumexp(z) - sum(softmax(z) * z)`` on max-centred logits, which is stable for large
    logits and handles ``-inf`` logits (zero-probability tokens contribute exactly 0). Half precision is
    upcast to float32.

    Args:
        logits: Unnormalised log-probabilities, shape ``(B, T, V)``.

    Returns:
        Entropy in nats, shape ``(B, T)``, in float32 for half-precision inputs, else ``logits.dtype``.
    """
    logits = logits.to(_compute_dtype(logits))
    # Centre on the max logit first: entropy is shift invariant and both terms then stay O(log V) instead
    # of cancelling two large numbers when logits carry a large common offset.
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(
        probs > 0, probs * logits, torch.zeros((), dtype=logits.dtype, device=logits.device)
    )
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of ``tokens`` under ``softmax(logits)``.

    Computed as ``logits[token] - logsumexp(logits)``, which avoids materialising the full log-softmax.
    Half precision is upcast to float32.

    Args:
        logits: Unnormalised log-probabilities, shape ``(B, T, V)``; position ``t`` must be the logits
            that *predict* ``tokens[:, t]`` (i.e. already shifted by one w.r.t. the input ids).
        tokens: Token ids, shape ``(B, T)``, integer dtype.

    Returns:
        Log-probabilities, shape ``(B, T)``.
    """
    logits = logits.to(_compute_dtype(logits))
    picked = torch.gather(logits, dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """Fraction of the return variance explained by the value predictions: ``1 - Var[R - V] / Var[R]``.

    1 means a perfect predictor, 0 a predictor no better than the (masked) mean return and negative
    values a predictor worse than that. Variances are masked (same normalisation for both terms).

    Args:
        values: Value predictions ``V``, shape ``(B, T)``.
        returns: Targets ``R``, shape ``(B, T)``.
        mask: 1/``True`` on real tokens, 0/``False`` on padding, shape ``(B, T)``.

    Returns:
        Python float; ``nan`` when ``Var[R]`` is 0.
    """
    with torch.no_grad():
        values = values.to(_compute_dtype(values))
        returns = returns.to(values.dtype)
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        if float(var_returns) == 0.0:
            return float("nan")
        return float(1.0 - var_residual / var_returns)
