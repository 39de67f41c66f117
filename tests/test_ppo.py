"""PPO: a known reward is learnt with bounded KL; the pipeline runs end to end."""

from __future__ import annotations

import json
import math

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
            "--model.warmup_steps",
            "2",
        ]
    )
    reward = _scalars(tmp_path / "checkpoints/logs/ppo", "ppo/reward_fn")
    kl = _scalars(tmp_path / "checkpoints/logs/ppo", "ppo/kl")
    ratio = _scalars(tmp_path / "checkpoints/logs/ppo", "ppo/ratio_mean")
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.3 and last > 0.6, reward
    # the first rollout is sampled from the reference itself: its KL is 0 up to rounding
    assert abs(kl[0]) < 1e-4, kl
    # then the KL grows as the reward is learnt, but stays small: under 2 nats per token of the (at most 8
    # tokens long) replies, with kl_coef 0.01; a policy that drifts without bound would exceed it
    assert all(math.isfinite(k) and -0.5 < k < 2 * 8 for k in kl), kl
    assert kl[-1] > 0.1, kl
    # each iteration stays inside the trust region: the mean ratio of an iteration's minibatches is near 1
    assert all(abs(r - 1) < 0.1 for r in ratio), ratio


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
    assert "lit-llm pipeline on tinyworld" in out and "points" in out and "by question difficulty" in out
    summary = json.loads((tmp_path / "checkpoints/pipeline_summary.json").read_text())
    assert set(summary["minutes"]) == {"pretrain", "sft", "reward", "ppo"}
    # the summary's gold reward is the gold scorer on the PPO checkpoint's greedy replies, recomputed here
    from lit_llm.checkpoint import load_backbone
    from lit_llm.data import tinyworld
    from lit_llm.evaluation import chat_completions

    model, tok, _ = load_backbone(tmp_path / "checkpoints/ppo/last.ckpt")
    records = tinyworld.rl_prompts(8, "test")
    replies = chat_completions(model.eval(), tok, [r["prompt"] for r in records], 48, temperature=0.0)
    gold = sum(tinyworld.gold_score(r, y) for r, y in zip(records, replies)) / len(records)
    assert summary["ppo_gold"] == pytest.approx(gold)
    # a few PPO iterations from the SFT policy at a small learning rate: the KL to it is small
    assert math.isfinite(summary["ppo_kl"]) and abs(summary["ppo_kl"]) < 1.0, summary["ppo_kl"]
    assert 0.0 <= summary["ppo_kl_sft"] < 1.0, summary["ppo_kl_sft"]
    by = summary["ppo_gold_by_difficulty"]
    counts = {d: sum(r["difficulty"] == int(d) for r in records) for d in by}
    assert sum(by[d] * counts[d] for d in by) == pytest.approx(summary["ppo_gold"] * len(records))
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (tmp_path / f"checkpoints/{stage}/last.ckpt").is_file()
    # GRPO and DPO from the same SFT checkpoint, in one summary with PPO's yardsticks
    main(
        [
            "pipeline",
            "--workdir",
            str(tmp_path),
            "--fast",
            "--skip",
            "pretrain",
            "sft",
            "--align",
            "grpo",
            "dpo",
        ]
    )
    out = capsys.readouterr().out
    both = json.loads((tmp_path / "checkpoints/pipeline_summary.json").read_text())
    assert both["align"] == ["grpo", "dpo"] and set(both["minutes"]) == {"grpo", "dpo"}
    assert both["sft_gold"] == summary["sft_gold"]  # the same SFT policy on the same prompts
    for name in ("grpo", "dpo"):
        assert (tmp_path / f"checkpoints/{name}/last.ckpt").is_file()
        assert math.isfinite(both[f"{name}_kl_sft"]) and name in out
    # the accurate reward model's two steps, then PPO against it, from the same SFT policy
    main(["pipeline", "--workdir", str(tmp_path), "--fast", "--skip", "pretrain", "sft", "--reward_long"])
    from lit_llm.checkpoint import load_checkpoint

    assert (tmp_path / "checkpoints/reward-person/last.ckpt").is_file()
    reward = load_checkpoint(str(tmp_path / "checkpoints/reward/last.ckpt"))["hyper_parameters"]
    assert reward["init_from"] == "checkpoints/reward-person/last.ckpt"
