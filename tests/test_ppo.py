"""PPO: a known reward is learnt with bounded KL; the pipeline runs end to end."""

from __future__ import annotations

import json

import pytest

from lit_llm.cli import main

from .conftest import QUIET, ROOT


def digit_one_bonus(record: dict, response: str) -> float:
    """A simple, known reward: 1 when the reply contains the digit 1."""
    return float("1" in response)


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next(logdir.glob("version_*"))))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


@pytest.mark.slow
def test_ppo_learns_a_known_reward_with_bounded_kl(sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/ppo/tinyworld.yaml"),
            *QUIET,
            "--trainer.precision",
            "32-true",
            "--model.init_from",
            str(sft_ckpt),
            "--model.reward_model",
            "null",
            "--model.critic",
            "policy",
            "--model.reward_fn",
            "tests.test_ppo:digit_one_bonus",
            "--model.learning_rate",
            "0.001",
            "--model.critic_learning_rate",
            "0.001",
            "--model.kl_coef",
            "0.01",
            "--model.ppo_epochs",
            "2",
            "--model.minibatch_size",
            "16",
            "--model.max_new_tokens",
            "8",
            "--trainer.limit_train_batches",
            "30",
            "--trainer.val_check_interval",
            "30",
            "--trainer.log_every_n_steps",
            "1",
            "--data.batch_size",
            "32",
            "--data.val_prompts",
            "16",
        ]
    )
    reward = _scalars(tmp_path / "checkpoints/logs/ppo", "ppo/reward_fn")
    kl = _scalars(tmp_path / "checkpoints/logs/ppo", "ppo/kl")
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.3 and last > 0.6, reward
    assert all(k == k and abs(k) < 50 for k in kl), kl


def test_ppo_refuses_a_missing_reward(sft_ckpt):
    from lit_llm.stages import PPOModule

    with pytest.raises(ValueError, match="PPO needs a reward"):
        PPOModule(init_from=str(sft_ckpt))
    with pytest.raises(ValueError, match="cannot import function"):
        PPOModule(init_from=str(sft_ckpt), reward_fn="tests.test_ppo:nope", critic="policy")


@pytest.mark.slow
def test_pipeline_runs_end_to_end(tmp_path, capsys):
    main(["pipeline", "--workdir", str(tmp_path), "--fast"])
    out = capsys.readouterr().out
    assert "lit-llm pipeline on tinyworld" in out and "gold reward change" in out
    summary = json.loads((tmp_path / "checkpoints/pipeline_summary.json").read_text())
    assert set(summary["minutes"]) == {"pretrain", "sft", "reward", "ppo"}
    assert 0.0 <= summary["ppo_gold"] <= 1.0 and summary["ppo_kl"] is not None
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (tmp_path / f"checkpoints/{stage}/last.ckpt").is_file()
    # the accurate reward model's two steps, then PPO against it, from the same SFT policy
    main(["pipeline", "--workdir", str(tmp_path), "--fast", "--skip", "pretrain", "sft", "--reward_long"])
    from lit_llm.checkpoint import load_checkpoint

    assert (tmp_path / "checkpoints/reward-person/last.ckpt").is_file()
    reward = load_checkpoint(str(tmp_path / "checkpoints/reward/last.ckpt"))["hyper_parameters"]
    assert reward["init_from"] == "checkpoints/reward-person/last.ckpt"
