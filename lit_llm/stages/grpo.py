"""RL with GRPO (Shao et al. 2024, DeepSeekMath), manual optimisation: a group of replies per prompt, no critic.

One iteration: sample ``group_size`` replies to each prompt of the batch -> reward them (a verifier function,
a reward model, or their weighted sum) -> advantage of each reply = its reward minus its group's mean
(optionally over the group's std) -> epochs of clipped-ratio updates over minibatches of the replies, with a
KL penalty to the frozen SFT reference as a loss term. The math lives in ``lit_llm.rl.grpo``; sampling,
temperature-scaled log-probs and the reward sources are shared with PPO in ``lit_llm.rl.scoring``.

As in PPO, every token is scored with the logits divided by the sampling ``temperature`` (the distribution
the replies were sampled from; ``top_k`` / ``top_p`` only truncate the sampling), and the rollout is scored
in eval mode, so that at the first minibatch the ratio is exactly 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lit_llm import rl
from lit_llm.errors import UserError
from lit_llm.rl.scoring import check_sampling_for_rl, response_logits
from lit_llm.stages.base import RLStage
from lit_llm.transforms import gathered


@dataclass
class GroupRollout(rl.Samples):
    """What a GRPO rollout hands to the updates: ``B = n_prompts * group_size`` sampled replies
    (``rl.Samples``), a group's replies in consecutive rows, and what GRPO computed about them.

    Attributes:
        logprobs: ``(B, N)`` rollout-time (eval mode, temperature-scaled) policy log-probs of ``resp``.
        ref_logprobs: The same for the frozen reference; ``None`` without a KL term (``kl_coef`` 0).
        advantages: ``(B,)`` group-relative advantage of each reply (a minibatch's rows keep the
            advantages computed over their whole groups).
        rewards: ``(B,)`` total reward of each reply.
        parts: ``(B,)`` parts of the reward and the gold reward, by name.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    rewards: torch.Tensor
    parts: dict[str, torch.Tensor]


class GRPOModule(RLStage):
    """GRPO on a chat policy: no critic, the baseline of a reply is the mean reward of its group.

    One training batch of ``data.batch_size`` prompts is one iteration of ``batch_size * group_size`` replies.

    Args:
        init_from: The SFT checkpoint: the policy (and, with ``kl_coef > 0``, the frozen reference) start from it.
        reward_model: A reward-model checkpoint (``lit-llm fit --config configs/reward/...``).
        reward_fn: A Python reward ``"module:function"`` taking ``(record, reply) -> float``, e.g. the verifier
            ``lit_llm.data.tinyworld:gold_score`` (RL with verifiable rewards). A function that raises or
            returns NaN stops the run with an error naming it, the prompt and the reply.
        reward_model_weight: Weight of the reward model's score in the total reward.
        reward_fn_weight: Weight of ``reward_fn`` in the total reward.
        gold_fn: Gold reward ``"module:function"`` logged (never optimised unless also given as ``reward_fn``);
            by default the DataModule's ``gold_reward`` (tinyworld: is the answer right?).
        group_size: Replies sampled per prompt (``G`` >= 2: a group of one has no baseline but itself).
        scale_rewards: Divide each group's centred rewards by the group's std (DeepSeekMath's GRPO). Off by
            default, as in Dr. GRPO (Liu et al. 2025): dividing by the std weights each prompt by ``1 / std``,
            so prompts that are almost always or almost never solved (small std) get the largest updates;
            without it the advantage is an ordinary policy gradient with a per-prompt baseline. Turn it on to
            make the step size independent of the reward's scale (e.g. a reward model's arbitrary units).
        max_new_tokens: Longest sampled reply.
        temperature: Sampling temperature of rollouts (> 0); GRPO scores tokens with the logits divided by it.
        top_k: Top-k filter of rollouts (``None`` or 0: off).
        top_p: Nucleus filter of rollouts (``None`` or 1: off). Both truncate only the sampling; the ratio is
            one of the temperature-scaled untruncated distributions.
        ppo_epochs: Passes over each rollout (1: every update is on-policy and the clip never acts).
        minibatch_size: Replies per gradient step.
        clip_eps: Policy ratio clip.
        kl_coef: Weight of the KL-to-reference loss term (k3 estimator per token). 0 drops the term and keeps
            no reference model at all (less memory, one forward pass less per rollout).
        max_grad_norm: Gradient clipping of the policy.
        disable_dropout: Run the updates without dropout too (the rollout is always scored without), so the
            first minibatch compares the policy with itself; only matters for models built with dropout.
        eval_max_new_tokens: Reply length when scoring held-out prompts.
        (other arguments: see ``Stage``; the learning rate follows warmup + cosine, stepped once per
        iteration, and ``weight_decay`` applies to matrices only)

    The loss is aggregated per token over the minibatch: the sum of the per-token losses over every reply
    token of the minibatch divided by their number (DAPO, Dr. GRPO). The original GRPO averages each reply
    first, which gives a token of a short reply more weight than one of a long reply: short correct replies
    are pushed up harder, and long wrong ones pushed down more gently (a length bias).
    """

    stage_name = "grpo"

    def __init__(
        self,
        init_from: str | None = None,
        reward_model: str | None = None,
        reward_fn: str | None = None,
        reward_model_weight: float = 1.0,
        reward_fn_weight: float = 1.0,
        gold_fn: str | None = None,
        group_size: int = 8,
        scale_rewards: bool = False,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        ppo_epochs: int = 1,
        minibatch_size: int = 64,
        clip_eps: float = 0.2,
        kl_coef: float = 0.04,
        max_grad_norm: float = 1.0,
        disable_dropout: bool = True,
        eval_max_new_tokens: int = 48,
        **kwargs: Any,
    ) -> None:
        check_sampling_for_rl("grpo", temperature, top_k, top_p)
        if group_size < 2:
            raise UserError(
                f"grpo: group_size must be at least 2, got {group_size}: the advantage is a reply's reward "
                "minus the mean of its group, which is 0 for a group of one reply"
            )
        for name, value in (("ppo_epochs", ppo_epochs), ("minibatch_size", minibatch_size)):
            if value < 1:
                raise UserError(f"grpo: {name} must be at least 1, got {value}")
        if kl_coef < 0 or clip_eps <= 0:
            raise UserError(f"grpo: kl_coef must be >= 0 and clip_eps > 0, got {kl_coef} and {clip_eps}")
        kwargs.setdefault("learning_rate", 1e-5)
        kwargs.setdefault("warmup_steps", 10)
        kwargs.setdefault("min_lr_ratio", 1.0)
        kwargs.setdefault("weight_decay", 0.0)
        super().__init__(init_from=init_from, **kwargs)
        self.init_rewards(reward_model, reward_fn, reward_model_weight, reward_fn_weight, gold_fn)
        # the frozen reference exists only for the KL term: without it, no copy of the policy is kept
        # (named in checkpoints by path and weight hash, not stored)
        self.set_frozen("ref", self.frozen_reference() if kl_coef > 0 else None, init_from, "reference")

    def configure_optimizers(self):
        """The policy's optimizer (``optimizer``: AdamW, or Muon beside AdamW; no decay on norms and biases)
        with warmup + cosine.

        With manual optimisation Lightning counts training batches, i.e. GRPO iterations, in
        ``estimated_stepping_batches``: the schedule is stepped once per iteration in ``training_step``.
        """
        opt = self.build_optimizer(self.model, self.hparams.learning_rate)
        return [opt], [self.lr_scheduler(opt)]

    # -------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def rollout(self, records: list[dict]) -> GroupRollout:
        """Sample ``group_size`` replies to each record, score and reward them (no gradients).

        The log-probs are computed in eval mode (no dropout), so the first minibatch's ratio is exactly 1;
        the caller switches the policy back to training mode for the updates.
        """
        hp = self.hparams
        G = hp.group_size
        grouped = [r for r in records for _ in range(G)]  # each group's replies in consecutive rows
        self.model.eval()
        with gathered(self.model):  # sharded: whole for decoding, each rank for its own number of steps
            s = rl.sample_replies(
                self.model, self.tokenizer, grouped, hp.max_new_tokens, hp.temperature, hp.top_k, hp.top_p
            )
        logprobs = rl.logprobs_from_logits(
            response_logits(self.model, s.seq, s.valid, s.P, hp.temperature), s.resp
        )  # (B, N)
        ref_logprobs = None
        if self.ref is not None:
            ref_logprobs = rl.logprobs_from_logits(
                response_logits(self.ref, s.seq, s.valid, s.P, hp.temperature), s.resp
            )
        rewards, parts = self.score_replies(grouped, s.replies)
        return GroupRollout(
            **vars(s),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            advantages=rl.group_advantages(rewards, G, hp.scale_rewards),
            rewards=rewards,
            parts=parts,
        )

    def _update(self, mb: GroupRollout) -> dict[str, torch.Tensor]:
        """One gradient step of the policy on a minibatch of replies; its stats."""
        hp = self.hparams
        opt = self.optimizers()
        logits = response_logits(self.model, mb.seq, mb.valid, mb.P, hp.temperature)  # (b, N, V)
        logprobs = rl.logprobs_from_logits(logits, mb.resp)
        loss, stats = rl.grpo_loss(
            logprobs, mb.logprobs, mb.advantages, mb.mask, hp.clip_eps, mb.ref_logprobs, hp.kl_coef
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"grpo: non-finite loss {loss.item()} at step {self.global_step}; stopping, the last good "
                "checkpoint is kept. Lower the learning rate."
            )
        opt.zero_grad()
        self.manual_backward(loss * self.token_weight(mb.mask))  # the token mean of the global minibatch
        self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        with torch.no_grad():
            stats["entropy"] = rl.masked_mean(rl.entropy_from_logits(logits.detach()), mb.mask)
        stats["loss"] = loss
        return {k: v.detach().float() for k, v in stats.items()}

    def training_step(self, records: list[dict], batch_idx: int) -> None:
        """One GRPO iteration: rollout, epochs of minibatch updates, the learning-rate schedule, logging."""
        hp = self.hparams
        t0 = time.perf_counter()
        ro = self.rollout(records)
        self.model.train(not hp.disable_dropout)
        B = ro.seq.shape[0]
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.ppo_epochs):
            for idx in torch.randperm(B, device=self.device).split(hp.minibatch_size):
                for k, v in self._update(ro.select(idx)).items():
                    stats.setdefault(k, []).append(v)
        self.step_schedulers()
        step_time = time.perf_counter() - t0
        groups = ro.rewards.view(-1, hp.group_size)
        log = {f"grpo/{k}": torch.stack(v).mean() for k, v in stats.items()}
        log.update(
            {
                "grpo/reward_mean": ro.rewards.mean(),
                "grpo/reward_std": ro.rewards.std() if B > 1 else torch.zeros(()),
                "grpo/group_reward_std": groups.std(-1).mean(),
                "grpo/zero_spread_fraction": rl.zero_spread(ro.rewards, hp.group_size).float().mean(),
                "grpo/reply_len": ro.mask.sum(-1).mean(),
                "grpo/ended_fraction": ro.ended.float().mean(),
                "perf/rollout_tokens_per_sec": ro.mask.sum() / ro.gen_time,
                "perf/generate_fraction": torch.tensor(ro.gen_time / step_time),
            }
        )
        if ro.ref_logprobs is not None:
            # KL to the reference per reply (sum over its tokens) at rollout time, comparable with ppo/kl
            kl = rl.kl_estimate(ro.logprobs, ro.ref_logprobs, "k3") * ro.mask
            log["grpo/kl_seq"] = kl.sum(-1).mean()
        for k, v in ro.parts.items():
            log[f"grpo/{k}"] = v.float().mean()
        self.log_dict({k: v.to(self.device).float() for k, v in log.items()}, on_step=True, sync_dist=True)
        self.log("train/reward", ro.rewards.mean(), prog_bar=True, sync_dist=True)
        self._last_rollout = (
            [r for r in records for _ in range(hp.group_size)],
            ro.replies,
            ro.rewards.tolist(),
        )
