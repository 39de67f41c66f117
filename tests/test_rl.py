"""Numerical tests for lit_llm.rl: hand computations, reference loops and known distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical

from lit_llm.rl import (
    AdaptiveKLController,
    FixedKLController,
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


def _right_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


# ------------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_exactly() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(masked_mean(x, mask.float(), dim=0)[:1], torch.tensor([2.5]))


def test_masked_var_matches_torch_var_on_selected() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g)
    mask = _right_padded_mask([7, 3, 1, 5], 7)
    selected = x[mask.bool()]
    torch.testing.assert_close(masked_var(x, mask), selected.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), selected.var(unbiased=False))
    # Hand-computed: values 1, 2, 3 -> mean 2, biased var 2/3, unbiased var 1.
    small = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    small_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_var(small, small_mask).item() == pytest.approx(1.0)
    assert masked_var(small, small_mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(small, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_masked_whiten() -> None:
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 5.0 * torch.randn(3, 6, generator=g)
    mask = _right_padded_mask([6, 2, 4], 6)
    keep = mask.bool()
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[~keep] == 0)
    # Exact formula on the selected entries.
    sel = x[keep]
    expected = (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8)
    torch.testing.assert_close(w[keep], expected)
    # shift_mean=False keeps the mean, rescales to unit variance.
    w2 = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w2[keep], expected + sel.mean())
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_masked_whiten_single_real_token_is_centred_not_a_crash() -> None:
    x = torch.tensor([[4.0, 9.0], [3.0, -2.0]])
    mask = torch.tensor([[0, 0], [1, 0]])
    w = masked_whiten(x, mask)
    assert torch.equal(w, torch.zeros_like(x))
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.equal(kept, torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    with pytest.raises(ValueError):
        masked_whiten(x, torch.zeros_like(mask))


# ------------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------------


def test_kl_estimators_converge_to_true_kl() -> None:
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())  # ~0.4564
    g = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g).view(400, 500)
    logp, logq = p.log()[samples], q.log()[samples]

    k1 = kl_estimate(logp, logq, "k1")
    k2 = kl_estimate(logp, logq, "k2")
    k3 = kl_estimate(logp, logq, "k3")
    assert k1.shape == k2.shape == k3.shape == (400, 500)
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert torch.all(k3 >= 0)
    assert torch.all(k2 >= 0)
    # Exact per-token formulas.
    log_ratio = logp - logq
    torch.testing.assert_close(k2, 0.5 * log_ratio**2)
    torch.testing.assert_close(k3, torch.exp(-log_ratio) - 1 + log_ratio)
    # k3 per token for a hand value: log_ratio = log 2 -> 0.5 - 1 + log 2.
    one = kl_estimate(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), "k3")
    assert one.item() == pytest.approx(0.5 - 1 + math.log(2.0))
    # k3 is >= 0 also far from the sampling distribution.
    assert torch.all(kl_estimate(torch.randn(100) * 10, torch.randn(100) * 10, "k3") >= 0)
    with pytest.raises(ValueError, match="Unknown KL"):
        kl_estimate(logp, logq, "k4")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------------


def test_compute_rewards_hand_computed() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, float("nan")]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -0.7, -3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -5.0])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, clip=3.0)
    # k1: log_ratio = [[0.5, -1, 0], [-0.5, 0.5, pad]]
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.5, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0], [0.05, -0.05 - 3.0, 0.0]])  # score -5 clipped to -3
    torch.testing.assert_close(rewards, expected)

    # No clip, k3 estimator.
    rewards3, kl3 = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5, kind="k3")
    lr = torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.5, 0.0]])
    k3 = (torch.exp(-lr) - 1 + lr) * mask
    torch.testing.assert_close(kl3, k3)
    expected3 = -0.5 * k3
    expected3[0, 2] += 2.0
    expected3[1, 1] += -5.0
    torch.testing.assert_close(rewards3, expected3)


def test_compute_rewards_requires_a_token_per_row() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_rewards(torch.zeros(2), lp, lp, mask, kl_coef=0.1)
    torch.testing.assert_close(
        last_token_index(torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])), torch.tensor([0, 2, 1])
    )


# ------------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------------


def _reference_gae(
    rewards: list[float], values: list[float], length: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Slow per-row reference: explicit deltas and backward accumulation over the real tokens only."""
    T = len(rewards)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    ret = [adv[t] + values[t] if t < length else 0.0 for t in range(T)]
    return adv, ret


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 0.0)])
def test_gae_matches_reference_loop(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(7)
    B, T = 6, 9
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    mask = _right_padded_mask(lengths, T)
    rewards = torch.randn(B, T, dtype=torch.float64, generator=g)
    values = torch.randn(B, T, dtype=torch.float64, generator=g)
    # Garbage in padding must not matter.
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, float("nan")))
    values = torch.where(mask.bool(), values, torch.full_like(values, 1e6))

    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        ref_adv, ref_ret = _reference_gae(rewards[b].tolist(), values[b].tolist(), lengths[b], gamma, lam)
        torch.testing.assert_close(adv[b], torch.tensor(ref_adv, dtype=torch.float64))
        torch.testing.assert_close(ret[b], torch.tensor(ref_ret, dtype=torch.float64))
    assert torch.all(adv[~mask.bool()] == 0)
    assert torch.all(ret[~mask.bool()] == 0)


def test_gae_special_cases_hand_computed() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 9.0], [1.0, 3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # gamma = lam = 1: advantage = (sum of future rewards) - value.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(
        adv, torch.tensor([[6.0 - 0.5, 5.0 - 1.0, 3.0 - 2.0, 0.0], [-0.5 - 1.0, -1.0 - 3.0, 0, 0]])
    )
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0], [-0.5, -1.0, 0.0, 0.0]]))
    # lam = 0: one-step TD error r_t + gamma * V_{t+1} - V_t, with V after the last token = 0.
    adv0, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    expected0 = torch.tensor(
        [
            [1.0 + 0.5 * 1.0 - 0.5, 2.0 + 0.5 * 2.0 - 1.0, 3.0 - 2.0, 0.0],
            [0.5 + 0.5 * 3.0 - 1.0, -1.0 - 3.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(adv0, expected0)
    with pytest.raises(ValueError, match="right-padded"):
        gae(rewards, values, torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]]), 1.0, 1.0)


# ------------------------------------------------------------------------------------------------------
# PPO losses
# ------------------------------------------------------------------------------------------------------


def test_policy_loss_hand_computed() -> None:
    # Token 0: r = 1.5, A = +1 -> clipped: -min(1.5, 1.2) = -1.2 (clip active, zero gradient)
    # Token 1: r = 0.9, A = +2 -> inside the clip range: -1.8
    # Token 2: r = 0.5, A = +1 -> outside the range but min picks the unclipped term: -0.5
    old = torch.tensor([[-1.0, -2.0, -0.3]])
    ratios = [1.5, 0.9, 0.5]
    new = (old + torch.tensor([[math.log(r) for r in ratios]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.8 - 0.5) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(2.9 / 3, abs=1e-6)
    k3 = sum((r - 1) - math.log(r) for r in ratios) / 3  # approx_kl is the k3 estimator
    assert stats["approx_kl"].item() == pytest.approx(k3, abs=1e-6)
    loss.backward()
    # d(-A r)/d logp = -A r / n for unclipped tokens, 0 for the clipped one.
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -2.0 * 0.9 / 3, -1.0 * 0.5 / 3]]))

    # Negative advantage with r = 0.5 is clipped: -min(-0.5, -0.8) = 0.8.
    loss_neg, stats_neg = policy_loss(
        torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2
    )
    assert loss_neg.item() == pytest.approx(0.8)
    assert stats_neg["clipfrac"].item() == 1.0


def test_policy_loss_ignores_padding() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.3, 0.0]])
    new = old + torch.tensor([[math.log(1.5), math.log(0.9), math.log(0.5), 500.0]])
    adv = torch.tensor([[1.0, 2.0, 1.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-3.5 / 3, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(2.9 / 3, abs=1e-6)
    assert all(torch.isfinite(v) for v in stats.values())


def test_value_loss_hand_computed() -> None:
    # clip_eps = 0.2
    # Token 0: v=1.5, old=1, R=2: (v-R)^2=0.25, v_clip=1.2 -> 0.64 -> clipped wins
    # Token 1: v=0.9, old=1, R=0: inside range, 0.81 both
    # Token 2: v=-0.5, old=0, R=0: (v-R)^2=0.25, v_clip=-0.2 -> 0.04 -> unclipped wins
    values = torch.tensor([[1.5, 0.9, -0.5, 123.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # Gradient (v - R) / n on unclipped tokens, 0 on the clipped one and on padding.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.9 / 3, -0.5 / 3, 0.0]]))


# ------------------------------------------------------------------------------------------------------
# Logit utilities and diagnostics
# ------------------------------------------------------------------------------------------------------


def test_entropy_from_logits_matches_categorical() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    torch.testing.assert_close(entropy_from_logits(logits), Categorical(logits=logits).entropy())
    # A large common offset causes no cancellation: float32 result matches a float64 reference.
    shifted = logits + 1e4
    torch.testing.assert_close(
        entropy_from_logits(shifted), Categorical(logits=shifted.double()).entropy().float()
    )
    big = logits * 1000.0
    ent_big = entropy_from_logits(big)
    assert torch.all(torch.isfinite(ent_big))
    torch.testing.assert_close(ent_big, Categorical(logits=big).entropy(), atol=1e-4, rtol=1e-4)
    # Uniform over V tokens -> log V; -inf logits (banned tokens) contribute exactly 0.
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    banned = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]])
    assert entropy_from_logits(banned).item() == pytest.approx(math.log(2))
    # bf16 input is computed in float32.
    ent_bf16 = entropy_from_logits(logits.bfloat16())
    assert ent_bf16.dtype == torch.float32


def test_logprobs_from_logits_matches_categorical() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, 13, generator=g) * 2
    tokens = torch.randint(0, 13, (3, 6), generator=g)
    lp = logprobs_from_logits(logits, tokens)
    assert lp.shape == (3, 6)
    torch.testing.assert_close(lp, Categorical(logits=logits).log_prob(tokens))
    torch.testing.assert_close(logprobs_from_logits(logits + 1e4, tokens), lp, atol=2e-3, rtol=0)


def test_explained_variance() -> None:
    g = torch.Generator().manual_seed(5)
    returns = torch.randn(4, 8, generator=g)
    mask = _right_padded_mask([8, 5, 3, 1], 8)
    garbage = torch.where(mask.bool(), torch.zeros_like(returns), torch.full_like(returns, 1e6))
    assert explained_variance(returns + garbage, returns, mask) == pytest.approx(1.0)
    mean_predictor = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(mean_predictor, returns, mask) == pytest.approx(0.0, abs=1e-6)
    # Hand-computed: R = [1, 2, 3], V = [1, 1, 1] -> R - V = [0, 1, 2]; Var ratio = 1 -> EV = 0.
    # V = [1, 2, 2] -> R - V = [0, 0, 1], biased var 2/9 vs Var[R] = 2/3 -> EV = 1 - 1/3.
    r = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.ones(1, 3)
    assert explained_variance(torch.tensor([[1.0, 1.0, 1.0]]), r, m) == pytest.approx(0.0)
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), r, m) == pytest.approx(2.0 / 3.0)
    assert math.isnan(explained_variance(r, torch.ones(1, 3), m))


# ------------------------------------------------------------------------------------------------------
# KL controllers
# ------------------------------------------------------------------------------------------------------


def test_fixed_kl_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_adaptive_kl_controller() -> None:
    # Hand-computed: e = 7/6 - 1 = 1/6; mult = 1 + (1/6) * 256 / 10000; value = 0.1 * mult.
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=7.0, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * (1 + (1 / 6) * 256 / 10_000))
    assert ctl.value > 0.1

    low = AdaptiveKLController(0.1, 6.0, 10_000)
    low.update(current_kl=5.0, n_steps=256)
    assert low.value == pytest.approx(0.1 * (1 - (1 / 6) * 256 / 10_000))
    assert low.value < 0.1

    on_target = AdaptiveKLController(0.1, 6.0, 10_000)
    on_target.update(current_kl=6.0, n_steps=256)
    assert on_target.value == pytest.approx(0.1)

    # Proportional error is clipped to [-0.2, 0.2].
    high = AdaptiveKLController(0.1, 6.0, 10_000)
    high.update(current_kl=600.0, n_steps=256)
    assert high.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    zero = AdaptiveKLController(0.1, 6.0, 10_000)
    zero.update(current_kl=0.0, n_steps=256)
    assert zero.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))

    # Repeated updates compound multiplicatively.
    ctl2 = AdaptiveKLController(0.2, 1.0, 100)
    for _ in range(3):
        ctl2.update(current_kl=1.1, n_steps=10)
    assert ctl2.value == pytest.approx(0.2 * (1 + 0.1 * 10 / 100) ** 3)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_kl_controllers_state_dict_round_trip() -> None:
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    ctl.update(current_kl=3.0, n_steps=4)
    restored = AdaptiveKLController(0.1, target=1.0, horizon=10)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value != 0.1
    fixed = FixedKLController(0.3)
    other = FixedKLController(0.05)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3


# ------------------------------------------------------------------------------------------------------
# GRPO: group advantages, loss aggregation, the clipped loss with a KL term; reward sources
# ------------------------------------------------------------------------------------------------------


def test_group_advantages_mean_only_hand_computed() -> None:
    from lit_llm.rl import group_advantages, zero_spread

    # three prompts, G = 3: means 2, 4/3 and 0.9 (whose float32 mean differs from 0.9 in the last bit)
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 0.9, 0.9, 0.9])
    adv = group_advantages(rewards, 3)
    expected = torch.tensor([-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    assert torch.equal(adv[6:], torch.zeros(3))  # a zero-spread group is exactly 0
    assert zero_spread(rewards, 3).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_group_advantages_std_scaled_hand_computed() -> None:
    from lit_llm.rl import group_advantages

    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 0.9, 0.9, 0.9])
    adv = group_advantages(rewards, 3, scale_rewards=True)
    # unbiased stds: 1 for (1, 2, 3); sqrt(((4/3)^2 * 2 + (8/3)^2) / 2) = 4 / sqrt(3) for (0, 0, 4)
    s2 = 4 / math.sqrt(3)
    expected = torch.tensor(
        [
            -1 / 1.0001,
            0.0,
            1 / 1.0001,
            -4 / 3 / (s2 + 1e-4),
            -4 / 3 / (s2 + 1e-4),
            8 / 3 / (s2 + 1e-4),
            0,
            0,
            0,
        ]
    )
    torch.testing.assert_close(adv, expected)
    # the zero-spread group: exactly 0, no NaN or 1/eps blow-up of a rounding error in its mean
    assert torch.equal(adv[6:], torch.zeros(3)) and torch.isfinite(adv).all()


def test_loss_aggregation_token_level_vs_per_sequence_hand_computed() -> None:
    from lit_llm.rl import aggregate_loss

    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 9.0, 9.0, 9.0]])
    mask = _right_padded_mask([4, 1], 4)  # the long reply has 4 tokens, the short one 1 (the 9s are padding)
    # token level: (1 + 1 + 1 + 1 + 4) / 5 tokens; per sequence: (mean 1 + mean 4) / 2 replies
    assert aggregate_loss(per_token, mask).item() == pytest.approx(8 / 5)
    assert aggregate_loss(per_token, mask, "sequence").item() == pytest.approx(5 / 2)


def test_grpo_loss_hand_computed() -> None:
    from lit_llm.rl import grpo_loss

    old = torch.zeros(2, 2)
    # ratios: e^0.5 = 1.65 (clipped to 1.2 for a positive advantage), 1; 0.5 (clipped to 0.8 for a negative one), 1
    new = torch.tensor([[0.5, 0.0], [math.log(0.5), 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = _right_padded_mask([2, 1], 2)
    loss, stats = grpo_loss(new, old, adv, mask, clip_eps=0.2, ref_logprobs=ref, kl_coef=0.5)
    # surrogate per token: row 0: -min(1.65 * 2, 1.2 * 2) = -2.4, -min(2, 2) = -2; row 1: -min(-0.5, -0.8) = 0.8
    k3 = [math.exp(-0.5) - 1 + 0.5, 0.0, math.exp(-math.log(0.5)) - 1 + math.log(0.5)]
    surrogate = [-2.4, -2.0, 0.8]
    expected = sum(s + 0.5 * k for s, k in zip(surrogate, k3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # without a reference there is no KL term and no kl stat
    loss0, stats0 = grpo_loss(new, old, adv, mask, clip_eps=0.2)
    assert loss0.item() == pytest.approx(sum(surrogate) / 3, rel=1e-5) and "kl" not in stats0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(new, old, adv, mask, clip_eps=0.2, kl_coef=0.1)


@pytest.mark.parametrize("scale_rewards", [False, True])
def test_zero_spread_groups_give_zero_gradient_to_the_policy(scale_rewards: bool) -> None:
    from lit_llm.backbone import ModelConfig, Transformer
    from lit_llm.rl import group_advantages, grpo_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=32, n_layer=1, n_embd=32, n_head=2))
    seq = torch.randint(0, 32, (6, 6))
    resp = seq[:, 3:]
    mask = torch.ones(6, 3)

    def grads(rewards: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        logprobs = logprobs_from_logits(model(seq)[:, 2:-1] / 0.7, resp)
        old = (
            logprobs.detach()
        )  # the first minibatch: the policy that sampled, and the reference, are the policy
        adv = group_advantages(rewards, 3, scale_rewards)
        loss, _ = grpo_loss(logprobs, old, adv, mask, 0.2, ref_logprobs=old, kl_coef=0.1)
        loss.backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    # two groups of G=3, each with one reward for all its replies (the float32 mean of three 0.9s is not 0.9)
    assert all(torch.count_nonzero(g) == 0 for g in grads(torch.tensor([0.9, 0.9, 0.9, 3.0, 3.0, 3.0])))
    # a group with a spread moves the policy
    assert any(torch.count_nonzero(g) > 0 for g in grads(torch.tensor([0.9, 0.9, 1.0, 3.0, 3.0, 3.0])))


class _FakeRewardModel:
    def score(self, tok, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


def test_reward_sources_weighted_sum_and_parts() -> None:
    from lit_llm.rl import RewardSources

    records = [{"prompt": "p1"}, {"prompt": "p2"}]
    src = RewardSources(
        None,
        _FakeRewardModel(),
        lambda r, y: float(y == "ab"),
        reward_model_weight=0.5,
        reward_fn_weight=2.0,
        gold_fn=lambda r, y: 7.0,
    )
    total, parts = src(records, ["ab", "xyz"])
    torch.testing.assert_close(total, torch.tensor([0.5 * 2 + 2.0 * 1, 0.5 * 3 + 0.0]))
    torch.testing.assert_close(parts["rm_score"], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(parts["reward_fn"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(parts["gold"], torch.tensor([7.0, 7.0]))
    # the DataModule's gold scorer is the fallback of an unset gold_fn
    _, parts = RewardSources(None, reward_fn=lambda r, y: 1.0)(
        records, ["a", "b"], default_gold=lambda r, y: 3.0
    )
    torch.testing.assert_close(parts["gold"], torch.tensor([3.0, 3.0]))


def nan_on_second(record: dict, reply: str) -> float:
    return float("nan") if record["prompt"] == "second?" else 1.0


def raises_on_second(record: dict, reply: str) -> float:
    return 1.0 / 0 if record["prompt"] == "second?" else 1.0


@pytest.mark.parametrize(
    "fn, what", [(nan_on_second, "returned nan"), (raises_on_second, "raised ZeroDivisionError")]
)
def test_reward_sources_name_the_function_prompt_and_reply_of_a_bad_reward(fn, what) -> None:
    from lit_llm.errors import UserError
    from lit_llm.rl import RewardError, RewardSources

    records = [{"prompt": "first?"}, {"prompt": "second?"}]
    with pytest.raises(RewardError) as info:
        RewardSources(None, reward_fn=fn)(records, ["fine", "the bad reply"])
    msg = str(info.value)
    assert f"reward_fn tests.test_rl:{fn.__name__} {what}" in msg, msg
    assert "'second?'" in msg and "'the bad reply'" in msg, msg
    assert isinstance(info.value, UserError)  # the CLI prints it as one error line
    # a bad gold scorer is named as such
    with pytest.raises(RewardError, match="gold_fn tests.test_rl"):
        RewardSources(None, reward_fn=lambda r, y: 0.0, gold_fn=fn)(records, ["a", "b"])


def test_reward_sources_refuse_a_nan_reward_model_score() -> None:
    from lit_llm.rl import RewardError, RewardSources

    class NaNModel:
        def score(self, tok, prompts, responses):
            return torch.tensor([0.0, float("nan")])

    with pytest.raises(RewardError, match="reward model rm.ckpt scored nan on prompt 'b'"):
        RewardSources(None, NaNModel(), reward_model_name="reward model rm.ckpt")(
            [{"prompt": "a"}, {"prompt": "b"}], ["x", "y"]
        )
