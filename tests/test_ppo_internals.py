"""PPO internals on tiny models: log-prob alignment, ratio 1 at the first minibatch, frozen reference, critic
initialisation, early stopping, the KL coefficient in checkpoints, the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from lit_llm import rl
from lit_llm.backbone.generate import logits_to_probs
from lit_llm.backbone.masks import last_token_index, padding_mask, positions_from_padding

PROMPTS = ["Where is the cat?", "Who has the apple?", "What is in the box?", "Where does Tom live?"]
RECORDS = [{"prompt": p} for p in PROMPTS]


@pytest.fixture(scope="module")
def ckpts(rl_ckpts):
    return rl_ckpts


def _module(ckpts, policy="sft", **kw):
    from lit_llm.stages import PPOModule

    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("warmup_steps", 0)
    return PPOModule(init_from=ckpts[policy], reward_model=ckpts["reward"], **kw)


def _full_logits(model, seq, valid):
    return model(seq, positions_from_padding(valid), padding_mask(valid)).float()


def test_rollout_logprobs_are_the_sampling_logprobs_of_the_sampled_tokens(ckpts):
    torch.manual_seed(0)
    m = _module(ckpts, temperature=0.7)
    ro = m.rollout(RECORDS)
    with torch.no_grad():
        logits = _full_logits(m.model.eval(), ro.seq, ro.valid)
    N = ro.resp.shape[1]
    manual = torch.zeros_like(ro.logprobs)
    for b in range(len(RECORDS)):
        for t in range(N):
            if ro.mask[b, t]:
                pos = ro.P + t  # the token at pos is predicted by the logits at pos - 1
                probs = logits_to_probs(logits[b, pos - 1 : pos], temperature=0.7)[0]
                manual[b, t] = probs[ro.seq[b, pos]].log()
    assert ro.mask.sum() > len(RECORDS)  # more than one token per reply, so a shift would show
    torch.testing.assert_close(ro.logprobs * ro.mask, manual, atol=1e-4, rtol=1e-4)
    # the reference starts as the policy: the same log-probs and a zero KL
    torch.testing.assert_close(ro.ref_logprobs * ro.mask, ro.logprobs * ro.mask)
    assert ro.kl.abs().max() < 1e-5


def test_rollout_scores_in_eval_mode_even_with_dropout(ckpts):
    torch.manual_seed(0)
    m = _module(ckpts, policy="sft_dropout", critic="policy", temperature=0.7)
    assert m.config.dropout == 0.3
    m.model.train()
    m.critic.train()  # as after the updates of a previous iteration
    ro = m.rollout(RECORDS)
    with torch.no_grad():
        m.model.eval()
        m.critic.eval()
        logprobs = rl.logprobs_from_logits(m._response_logits(m.model, ro.seq, ro.valid, ro.P), ro.resp)
        values = m._values(ro.seq, ro.valid, ro.P)
    torch.testing.assert_close(ro.logprobs * ro.mask, logprobs * ro.mask)
    torch.testing.assert_close(ro.values * ro.mask, values * ro.mask)


def test_first_minibatch_has_ratio_one_and_no_kl(ckpts, fit_rl):
    torch.manual_seed(0)
    m = _module(ckpts, temperature=0.7, top_k=20, ppo_epochs=2, minibatch_size=4, learning_rate=1e-3)
    _, calls = fit_rl(m, RECORDS)
    first = calls[0]
    assert abs(float(first["ratio_mean"]) - 1) < 1e-5
    assert float(first["approx_kl"]) < 1e-8
    assert float(first["clipfrac"]) == 0.0
    assert len(calls) == 2  # the second epoch ran with the updated policy


def test_first_minibatch_has_ratio_one_with_dropout_in_the_model(ckpts, fit_rl):
    """A model built with dropout: the updates run without it by default (disable_dropout), so the first
    minibatch compares the policy with itself; with dropout in the updates the ratio is dropout noise."""
    torch.manual_seed(0)
    m = _module(ckpts, policy="sft_dropout", critic="policy", temperature=0.7, minibatch_size=4)
    _, calls = fit_rl(m, RECORDS)
    assert abs(float(calls[0]["ratio_mean"]) - 1) < 1e-5 and float(calls[0]["approx_kl"]) < 1e-8
    torch.manual_seed(0)
    m = _module(
        ckpts, policy="sft_dropout", critic="policy", temperature=0.7, minibatch_size=4, disable_dropout=False
    )
    _, calls = fit_rl(m, RECORDS)
    assert float(calls[0]["approx_kl"]) > 1e-4


def test_reference_frozen_and_policy_trained(ckpts, fit_rl):
    torch.manual_seed(0)
    m = _module(ckpts, learning_rate=1e-2, ppo_epochs=2, minibatch_size=2, target_kl_stop=None)
    ref = {k: v.clone() for k, v in m.ref.state_dict().items()}
    policy = {k: v.clone() for k, v in m.model.state_dict().items()}
    fit_rl(m, RECORDS)
    assert all(torch.equal(v, m.ref.state_dict()[k]) for k, v in ref.items())
    assert any(not torch.equal(v, m.model.state_dict()[k]) for k, v in policy.items())


def test_critic_starts_as_the_reward_model(ckpts):
    torch.manual_seed(0)
    m = _module(ckpts, critic="reward_model")
    ro = m.rollout(RECORDS)
    with torch.no_grad():
        rm_values = m.rm.values(ro.seq, ro.valid)
        rm_scores = m.rm(ro.seq, ro.valid)
    last = last_token_index(ro.valid)
    # the critic's value at each reply's last token is the reward model's score of the whole sequence
    torch.testing.assert_close(rm_values[torch.arange(len(RECORDS)), last], rm_scores)
    with torch.no_grad():
        critic_values = m.critic.values(ro.seq, ro.valid)
    torch.testing.assert_close(critic_values, rm_values)
    # and the rollout's values are the reward model's values of the states before each response token
    torch.testing.assert_close(ro.values * ro.mask, rm_values[:, ro.P - 1 : -1] * ro.mask)


def test_target_kl_stop_stops_early(ckpts, fit_rl):
    torch.manual_seed(0)
    m = _module(ckpts, learning_rate=1e-2, ppo_epochs=2, minibatch_size=1, target_kl_stop=1e-9)
    trainer, calls = fit_rl(m, RECORDS)
    # the first minibatch sees the rollout policy (KL 0); the second sees the updated one and stops the
    # iteration: neither the rest of the epoch nor the second epoch run
    assert len(calls) == 2, [float(c["approx_kl"]) for c in calls]
    assert float(calls[0]["approx_kl"]) < 1e-9 < float(calls[1]["approx_kl"])
    assert float(trainer.callback_metrics["ppo/early_stop"]) == 1.0

    torch.manual_seed(0)
    m = _module(ckpts, learning_rate=1e-2, ppo_epochs=2, minibatch_size=1, target_kl_stop=None)
    trainer, calls = fit_rl(m, RECORDS)
    assert len(calls) == 8 and float(trainer.callback_metrics["ppo/early_stop"]) == 0.0


def test_adaptive_kl_coef_moves_and_survives_a_checkpoint(ckpts, tmp_path, fit_rl):
    torch.manual_seed(0)
    m = _module(ckpts, kl_coef=0.1, kl_target=1.0, kl_horizon=10.0, minibatch_size=4)
    trainer, _ = fit_rl(m, RECORDS)
    assert m.kl_ctl.value != pytest.approx(0.1)
    assert float(trainer.callback_metrics["ppo/kl_coef"]) == pytest.approx(m.kl_ctl.value)
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    resumed = _module(ckpts, kl_coef=0.1, kl_target=1.0, kl_horizon=10.0)
    resumed.on_load_checkpoint(torch.load(path, weights_only=False))
    assert resumed.kl_ctl.value == pytest.approx(m.kl_ctl.value)


def test_learning_rate_schedule_and_no_decay_on_norms(ckpts, fit_rl):
    from lit_llm.stages.base import lr_lambda

    torch.manual_seed(0)
    m = _module(ckpts, warmup_steps=2, min_lr_ratio=0.5, learning_rate=1e-3, weight_decay=0.1)
    trainer, _ = fit_rl(m, RECORDS, batches=3, batch_size=1)
    total = int(trainer.estimated_stepping_batches)
    assert total == 3  # one stepping batch per PPO iteration
    policy_opt, critic_opt = m.optimizers()
    for opt, peak in ((policy_opt, 1e-3), (critic_opt, m.hparams.critic_learning_rate)):
        # stepped once per iteration: after 3 iterations the schedule is at step 3 (warmup 2, then decayed)
        assert opt.param_groups[0]["lr"] == pytest.approx(peak * lr_lambda(3, 2, total, 0.5))
        assert opt.param_groups[0]["lr"] == pytest.approx(peak * 0.5)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
        assert len(no_decay["params"]) > 0


@pytest.mark.parametrize(
    "kw", [dict(temperature=0.0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_refuses_invalid_sampling(ckpts, kw):
    with pytest.raises(ValueError, match="temperature|top_k|top_p"):
        _module(ckpts, **kw)


def test_top_k_zero_and_top_p_one_are_off(ckpts):
    torch.manual_seed(0)
    m = _module(ckpts, top_k=0, top_p=1.0)
    ro = m.rollout(RECORDS)
    assert torch.isfinite(ro.logprobs).all() and torch.isfinite(ro.advantages).all()


def test_global_whiten_handles_a_single_real_token(ckpts):
    m = _module(ckpts)
    x = torch.tensor([[2.0, 5.0], [7.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    w = m._global_whiten(x, mask)
    assert torch.equal(w, torch.zeros_like(x))
    full = torch.ones_like(x)
    torch.testing.assert_close(m._global_whiten(x, full), rl.masked_whiten(x, full))


def test_whitening_statistics_are_global_across_ranks(ckpts):
    """Two ranks holding the same rollout: the statistics are those of both copies together."""
    m = _module(ckpts)
    m.reduce = lambda t, op: t * 2 if op == "sum" else t  # what an all-reduce over two equal ranks returns
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).float()
    both = rl.masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:3]
    torch.testing.assert_close(m._global_whiten(x, mask), both)


def test_early_stop_is_decided_by_all_ranks(ckpts, monkeypatch, fit_rl):
    """Under DDP a rank over target_kl_stop stops every rank: here the local KL is below the limit, and the
    (simulated) other rank is over it, so the iteration stops after its first minibatch."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    def another_rank_is_over(self, decision, all=True):
        return True if not all else decision

    monkeypatch.setattr(SingleDeviceStrategy, "reduce_boolean_decision", another_rank_is_over)
    torch.manual_seed(0)
    m = _module(ckpts, learning_rate=1e-6, ppo_epochs=2, minibatch_size=1, target_kl_stop=10.0)
    trainer, calls = fit_rl(m, RECORDS)
    assert len(calls) == 1 and float(calls[0]["approx_kl"]) < 10.0
    assert float(trainer.callback_metrics["ppo/early_stop"]) == 1.0
