"""GRPO on tiny models: refused settings, no reference without a KL term, clear errors on bad rewards, ratio 1
at the first minibatch, zero-spread groups leave the policy alone, a verifier reward is learnt, the CLI fits."""

from __future__ import annotations

import pytest
import torch

from lit_llm.cli import main

from .conftest import QUIET, ROOT

PROMPTS = ["Where is the cat?", "Who has the apple?", "What is in the box?", "Where does Tom live?"]
RECORDS = [{"prompt": p} for p in PROMPTS]
CONFIG = str(ROOT / "configs/grpo/tinyworld.yaml")


def digit_one_bonus(record: dict, response: str) -> float:
    """A simple, known reward: 1 when the reply contains the digit 1."""
    return float("1" in response)


def length_reward(record: dict, response: str) -> float:
    """Longer replies are better: sampled replies differ in length, so every group has a spread."""
    return len(response) / 10


def constant_reward(record: dict, response: str) -> float:
    return 0.5


def nan_reward(record: dict, response: str) -> float:
    return float("nan") if "box" in record["prompt"] else 1.0


def raising_reward(record: dict, response: str) -> float:
    return {"right": 1.0}[response]


@pytest.fixture(scope="module")
def ckpts(rl_ckpts):
    return rl_ckpts


def _module(ckpts, policy="sft", **kw):
    from lit_llm.stages.grpo import GRPOModule

    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("group_size", 2)
    kw.setdefault("reward_fn", "tests.test_grpo:digit_one_bonus")
    return GRPOModule(init_from=ckpts[policy], **kw)


def test_group_size_below_two_is_refused(ckpts):
    from lit_llm.errors import UserError

    for g in (1, 0):
        with pytest.raises(UserError, match=f"group_size must be at least 2, got {g}"):
            _module(ckpts, group_size=g)


def test_refuses_a_missing_reward_and_bad_settings(ckpts):
    from lit_llm.errors import UserError

    with pytest.raises(UserError, match="GRPO needs a reward"):
        _module(ckpts, reward_fn=None)
    for kw in (dict(temperature=0.0), dict(top_p=1.5), dict(kl_coef=-0.1), dict(minibatch_size=0)):
        with pytest.raises(UserError):
            _module(ckpts, **kw)


def test_kl_coef_zero_keeps_no_reference_and_no_kl_term(ckpts, fit_rl):
    torch.manual_seed(0)
    m = _module(ckpts, kl_coef=0.0)
    assert m.ref is None
    assert not any(k.startswith("ref.") for k in m.state_dict())
    trainer, calls = fit_rl(m, RECORDS)
    assert calls and all("kl" not in c for c in calls)
    assert "grpo/kl" not in trainer.callback_metrics and "grpo/kl_seq" not in trainer.callback_metrics
    # with a KL term the reference is a frozen copy, and the KL is measured and logged
    torch.manual_seed(0)
    m = _module(ckpts, kl_coef=0.1)
    assert m.ref is not None and not any(p.requires_grad for p in m.ref.parameters())
    trainer, calls = fit_rl(m, RECORDS)
    assert "kl" in calls[0] and "grpo/kl" in trainer.callback_metrics


@pytest.mark.parametrize("fn, what", [("nan_reward", "returned nan"), ("raising_reward", "raised KeyError")])
def test_a_bad_reward_fn_is_a_clear_error(ckpts, fn, what):
    from lit_llm.rl import RewardError

    torch.manual_seed(0)
    m = _module(ckpts, reward_fn=f"tests.test_grpo:{fn}")
    with pytest.raises(RewardError) as info:
        m.rollout(RECORDS)
    msg = str(info.value)
    assert f"reward_fn tests.test_grpo:{fn} {what}" in msg, msg
    assert "on prompt '" in msg and "and reply '" in msg, msg
    if fn == "nan_reward":
        assert "What is in the box?" in msg, msg


def test_groups_are_consecutive_replies_to_one_prompt(ckpts):
    torch.manual_seed(0)
    m = _module(ckpts, group_size=3, temperature=1.5)
    ro = m.rollout(RECORDS[:2])
    assert ro.seq.shape[0] == 6 and ro.advantages.shape == (6,)
    # every group's advantages sum to 0 (reward minus the group's mean)
    torch.testing.assert_close(ro.advantages.view(2, 3).sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        ro.advantages, ro.rewards - ro.rewards.view(2, 3).mean(-1).repeat_interleave(3)
    )


def test_first_minibatch_has_ratio_one(ckpts, fit_rl):
    """Temperature-scaled log-probs of the policy that sampled, scored in eval mode: the first update compares
    the policy with itself even for a model built with dropout; the second epoch sees the updated policy."""
    torch.manual_seed(0)
    m = _module(
        ckpts,
        policy="sft_dropout",
        reward_fn="tests.test_grpo:length_reward",
        temperature=0.7,
        top_k=20,
        ppo_epochs=2,
        minibatch_size=8,
        learning_rate=1e-2,
        kl_coef=0.1,
    )
    _, calls = fit_rl(m, RECORDS)
    first = calls[0]
    assert abs(float(first["ratio_mean"]) - 1) < 1e-5
    assert float(first["approx_kl"]) < 1e-8 and float(first["clipfrac"]) == 0.0
    assert float(first["kl"]) < 1e-8  # the reference starts as the policy
    assert len(calls) == 2 and float(calls[1]["approx_kl"]) > 1e-6


def test_zero_spread_groups_leave_the_policy_unchanged(ckpts, fit_rl):
    """Every reply gets the same reward: no group carries a signal, and (without a KL term) nothing moves."""
    torch.manual_seed(0)
    m = _module(ckpts, reward_fn="tests.test_grpo:constant_reward", kl_coef=0.0, learning_rate=1e-2)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    trainer, calls = fit_rl(m, RECORDS)
    assert float(trainer.callback_metrics["grpo/zero_spread_fraction"]) == 1.0
    assert float(trainer.callback_metrics["grpo/reward_mean"]) == pytest.approx(0.5)
    assert all(torch.equal(v, m.model.state_dict()[k]) for k, v in before.items())


def test_learning_rate_schedule_and_no_decay_on_norms(ckpts, fit_rl):
    from lit_llm.stages.base import lr_lambda

    torch.manual_seed(0)
    m = _module(ckpts, warmup_steps=2, min_lr_ratio=0.5, learning_rate=1e-3, weight_decay=0.1)
    trainer, _ = fit_rl(m, RECORDS, batches=3, batch_size=1)
    total = int(trainer.estimated_stepping_batches)
    assert total == 3  # one stepping batch per GRPO iteration
    opt = m.optimizers()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(3, 2, total, 0.5))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    # only the policy is optimised (the reference is frozen)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in m.model.parameters()}


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next(logdir.glob("version_*"))))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


@pytest.mark.slow
def test_grpo_learns_a_verifier_reward(sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            CONFIG,
            *QUIET,
            "--trainer.precision",
            "32-true",
            "--model.init_from",
            str(sft_ckpt),
            "--model.reward_fn",
            "tests.test_grpo:digit_one_bonus",
            "--model.learning_rate",
            "0.002",
            "--model.group_size",
            "4",
            "--model.ppo_epochs",
            "1",
            "--model.minibatch_size",
            "32",
            "--model.max_new_tokens",
            "8",
            "--model.kl_coef",
            "0.01",
            "--model.warmup_steps",
            "2",
            "--trainer.limit_train_batches",
            "25",
            "--trainer.val_check_interval",
            "25",
            "--trainer.log_every_n_steps",
            "1",
            "--data.batch_size",
            "8",
            "--data.val_prompts",
            "16",
        ]
    )
    logs = tmp_path / "checkpoints/logs/grpo"
    reward = _scalars(logs, "grpo/reward_fn")
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.3 and last > 0.6, reward
    kl = _scalars(logs, "grpo/kl")
    assert abs(kl[0]) < 1e-5, kl  # the first update compares the policy with the reference it started as
    for tag in ("grpo/zero_spread_fraction", "grpo/entropy", "grpo/clipfrac", "grpo/reply_len"):
        assert _scalars(logs, tag), tag
    assert _scalars(logs, "val/gold_reward")
    assert (tmp_path / "checkpoints/grpo/last.ckpt").is_file()


FAST = [
    *QUIET,
    "--trainer.fast_dev_run",
    "1",
    "--trainer.precision",
    "32-true",
    "--model.group_size",
    "2",
    "--model.max_new_tokens",
    "4",
    "--model.eval_max_new_tokens",
    "4",
    "--model.minibatch_size",
    "4",
    "--data.batch_size",
    "2",
    "--data.val_prompts",
    "4",
    "--data.train_prompts",
    "8",
]


def test_fit_through_the_cli(sft_ckpt, ckpts, tmp_path, monkeypatch):
    """Both shipped GRPO configs fit through ``lit-llm fit`` (the verifier and the reward-model variant)."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", CONFIG, *FAST, "--model.init_from", str(sft_ckpt)])
    rm_config = str(ROOT / "configs/grpo/tinyworld-rm.yaml")
    main(
        [
            "fit",
            "--config",
            rm_config,
            *FAST,
            "--model.init_from",
            str(sft_ckpt),
            "--model.reward_model",
            ckpts["reward"],
        ]
    )


def test_fewer_prompts_than_one_rollout_is_a_clear_error(tmp_path):
    import json

    from lit_llm.data.prompts import PromptDataModule
    from lit_llm.errors import DataError

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}"}) for i in range(5)) + "\n")
    dm = PromptDataModule(source=str(path), batch_size=8)
    dm.setup()
    with pytest.raises(DataError, match="fewer than one rollout of batch_size=8"):
        dm.train_dataloader()
