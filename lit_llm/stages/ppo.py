"""RLHF with PPO (manual optimisation): rollout -> score -> KL-shaped rewards -> GAE -> clipped updates.

Four networks: the **policy** (from the SFT checkpoint, trained), the **reference** (a frozen copy of the
SFT policy, for the KL penalty; with ``lora``, the policy itself with its adapters off), the **critic** (a value model, trained) and the **reward model** (frozen).
The math lives in ``lit_llm.rl``; this module only orchestrates and logs.

Every token PPO scores (rollout-time, reference and training log-probs, the entropy) is scored with the
logits divided by the sampling ``temperature``: the policy being optimised is the distribution the rollouts
were sampled from. ``top_k`` / ``top_p`` truncate that sampling distribution, but PPO optimises the
temperature-scaled *untruncated* policy, so the ratio (and the KL to the reference) is one of untruncated
distributions; tokens outside the top-k/top-p set are simply never sampled.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lit_llm import rl
from lit_llm.backbone.heads import ScalarHeadModel
from lit_llm.checkpoint import load_backbone
from lit_llm.errors import UserError
from lit_llm.rl.scoring import check_sampling_for_rl, response_logits
from lit_llm.stages.base import RLStage
from lit_llm.transforms import gathered

# the KL controller's state in a checkpoint (an adaptive beta survives a resume)
KL_CTL_KEY = "lit_llm_ppo_kl_ctl"


@dataclass
class Rollout(rl.Samples):
    """What a rollout hands to the PPO updates: the sampled replies (``rl.Samples``) and, ``(B, N)`` over
    their tokens, what PPO computed about them.

    Attributes:
        logprobs: Rollout-time (eval mode, temperature-scaled) policy log-probs of ``resp``.
        ref_logprobs: The same for the frozen reference.
        values: Rollout-time critic values of the state before each response token.
        advantages: Whitened GAE advantages.
        returns: GAE returns (the critic's targets).
        kl: Per-token KL estimate used in the reward.
        scores: ``(B,)`` total reward of each reply before penalties and whitening.
        parts: ``(B,)`` parts of the reward and the gold reward, by name.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    scores: torch.Tensor
    parts: dict[str, torch.Tensor]


class PPOModule(RLStage):
    """PPO on a chat policy.

    Args:
        init_from: The SFT checkpoint: the policy and the frozen reference start from it.
        reward_model: A reward-model checkpoint (``lit-llm fit --config configs/reward/...``).
        reward_fn: Optional Python reward ``"module:function"`` taking ``(record, response) -> float``;
            e.g. ``lit_llm.data.tinyworld:gold_score``.
        reward_model_weight: Weight of the reward model's score in the total reward.
        reward_fn_weight: Weight of ``reward_fn`` in the total reward.
        gold_fn: Gold reward ``"module:function"`` logged (never optimised unless also given as ``reward_fn``)
            to show whether RLHF really helped; by default the DataModule's ``gold_reward`` (tinyworld: is the
            answer right?), none when the data has none.
        critic: ``reward_model``: a separate value network initialised from the reward model (default; it
            starts out knowing which replies are good, and its updates never disturb the policy) or
            ``policy``: a fresh value head on a copy of the policy's backbone.
        max_new_tokens: Longest sampled reply.
        temperature: Sampling temperature of rollouts (> 0: PPO needs sampling); PPO scores tokens with the
            logits divided by it.
        top_k: Top-k filter of rollouts (``None`` or 0: off).
        top_p: Nucleus filter of rollouts (``None`` or 1: off). Both truncate only the sampling; the ratio
            is one of the temperature-scaled untruncated distributions (see the module docstring).
        ppo_epochs: Passes over each rollout.
        minibatch_size: Sequences per gradient step.
        clip_eps: Policy ratio clip.
        value_clip_eps: Value clip around the rollout's values.
        gamma: Discount.
        lam: GAE lambda.
        kl_coef: Initial KL penalty coefficient (beta).
        kl_target: Target KL per sequence for the adaptive controller; ``None`` keeps ``kl_coef`` fixed.
        kl_horizon: Horizon of the adaptive controller.
        kl_estimator: Per-token KL estimator in the penalty (``k1``, ``k2``, ``k3``).
        whiten_rewards: Whiten scores across the rollout before shaping.
        score_clip: Clip scores to ``[-score_clip, score_clip]``.
        missing_eos_penalty: Subtracted from the score of replies that hit ``max_new_tokens`` without ending.
        entropy_coef: Entropy bonus weight.
        critic_learning_rate: Learning rate of the critic (the policy uses ``learning_rate``); both follow
            the warmup (``warmup_steps``) + cosine (to ``min_lr_ratio``) schedule, stepped once per PPO
            iteration, and ``weight_decay`` applies to both networks' matrices (never to norms, biases).
        max_grad_norm: Gradient clipping of each network.
        target_kl_stop: Stop the epochs of a step early when approximate KL exceeds this.
        disable_dropout: Run the policy and the critic without dropout in the updates too (as TRL does). The
            rollout is always scored without dropout; with dropout in the updates, the ratio at the first
            minibatch is not 1 but the ratio of a dropped-out policy to the policy that sampled, and the
            clip then acts on dropout noise. Only matters for models built with ``dropout > 0``.
        eval_max_new_tokens: Reply length when scoring held-out prompts.
        (other arguments: see ``Stage``)
    """

    stage_name = "ppo"

    def __init__(
        self,
        init_from: str | None = None,
        reward_model: str | None = None,
        reward_fn: str | None = None,
        reward_model_weight: float = 1.0,
        reward_fn_weight: float = 1.0,
        gold_fn: str | None = None,
        critic: Literal["reward_model", "policy"] = "reward_model",
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        ppo_epochs: int = 2,
        minibatch_size: int = 16,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: float = 10000.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k1",
        whiten_rewards: bool = False,
        score_clip: float | None = 5.0,
        missing_eos_penalty: float = 1.0,
        entropy_coef: float = 0.0,
        critic_learning_rate: float = 1e-4,
        max_grad_norm: float = 1.0,
        target_kl_stop: float | None = 0.5,
        disable_dropout: bool = True,
        eval_max_new_tokens: int = 48,
        **kwargs: Any,
    ) -> None:
        check_sampling_for_rl("ppo", temperature, top_k, top_p)
        kwargs.setdefault("learning_rate", 1e-5)
        kwargs.setdefault("warmup_steps", 10)
        kwargs.setdefault("min_lr_ratio", 1.0)
        kwargs.setdefault("weight_decay", 0.0)
        super().__init__(init_from=init_from, **kwargs)
        self.init_rewards(reward_model, reward_fn, reward_model_weight, reward_fn_weight, gold_fn)
        self.set_frozen(
            "ref", self.frozen_reference(), init_from, "reference"
        )  # named in checkpoints, not stored
        if critic == "reward_model":
            if self.rm is None:
                raise UserError("critic='reward_model' needs --model.reward_model (or use critic='policy')")
            self.critic = copy.deepcopy(self.rm).requires_grad_(True).train()
        else:
            self.critic = ScalarHeadModel(load_backbone(init_from)[0])
        self.kl_ctl = (
            rl.AdaptiveKLController(kl_coef, kl_target, kl_horizon)
            if kl_target
            else rl.FixedKLController(kl_coef)
        )

    # ----------------------------------------------------------------------------------------- helpers
    def configure_optimizers(self):
        """The policy's and the critic's optimizers (``optimizer``: AdamW, or Muon beside AdamW; no decay on
        norms and biases), each with warmup + cosine.

        With manual optimisation Lightning counts training batches, i.e. PPO iterations, in
        ``estimated_stepping_batches``: the schedules are stepped once per iteration in ``training_step``.
        """
        policy = self.build_optimizer(self.model, self.hparams.learning_rate)
        critic = self.build_optimizer(self.critic, self.hparams.critic_learning_rate)
        return [policy, critic], [self.lr_scheduler(policy), self.lr_scheduler(critic)]

    def _response_logits(self, model, seq: torch.Tensor, valid: torch.Tensor, P: int) -> torch.Tensor:
        """Temperature-scaled logits that predict each response token ``(B, N, V)`` (positions
        ``P-1 .. P+N-2``): the distribution the rollout sampled from, before any top-k/top-p truncation."""
        return response_logits(model, seq, valid, P, self.hparams.temperature)

    def _values(self, seq: torch.Tensor, valid: torch.Tensor, P: int) -> torch.Tensor:
        """The critic's value of the state before each response token ``(B, N)``."""
        return self.critic.values(seq, valid)[:, P - 1 : -1]

    def _global_whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``masked_whiten`` with the mean and variance of the real entries of every rank (one statistic for
        the whole global batch, as a single process with all of it would compute)."""
        keep = mask.bool().expand_as(x)
        xf = torch.where(keep, x.float(), torch.zeros((), device=x.device))
        sums = self.reduce(torch.stack([xf.sum(), xf.square().sum(), keep.sum().float()]), "sum")
        total, total_sq, n = sums.tolist()
        mean = total / max(n, 1.0)
        if n < 2:
            # one real entry has no spread: centre it (it becomes 0) instead of dividing by an undefined std
            return torch.where(keep, x - mean, torch.zeros_like(x))
        var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
        return torch.where(keep, (x - mean) / math.sqrt(var + 1e-8), torch.zeros_like(x))

    # -------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def rollout(self, records: list[dict]) -> Rollout:
        """Sample replies and compute everything PPO needs about them (no gradients).

        The rollout-time log-probs and values are computed in eval mode (no dropout), so that at the first
        minibatch the policy ratio is exactly 1 and the value clip is centred on the values the update
        starts from. The caller switches the networks back to training mode for the updates.
        """
        hp = self.hparams
        self.model.eval()
        self.critic.eval()
        with gathered(self.model):  # sharded: whole for decoding, each rank for its own number of steps
            s = rl.sample_replies(
                self.model, self.tokenizer, records, hp.max_new_tokens, hp.temperature, hp.top_k, hp.top_p
            )
        logprobs = rl.logprobs_from_logits(self._response_logits(self.model, s.seq, s.valid, s.P), s.resp)
        ref_logprobs = rl.logprobs_from_logits(self._response_logits(self.ref, s.seq, s.valid, s.P), s.resp)
        values = self._values(s.seq, s.valid, s.P)
        raw_scores, parts = self.score_replies(records, s.replies)
        scores = raw_scores - hp.missing_eos_penalty * (~s.ended).float()
        if hp.whiten_rewards:
            scores = self._global_whiten(scores, torch.ones_like(scores))
        rewards, kl = rl.compute_rewards(
            scores, logprobs, ref_logprobs, s.mask, self.kl_ctl.value, hp.kl_estimator, hp.score_clip
        )
        advantages, returns = rl.gae(rewards, values, s.mask, hp.gamma, hp.lam)
        advantages = self._global_whiten(advantages, s.mask)
        return Rollout(
            **vars(s),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            advantages=advantages,
            returns=returns,
            kl=kl,
            scores=raw_scores,
            parts=parts,
        )

    def _update(self, mb: Rollout) -> dict[str, torch.Tensor]:
        """One gradient step of the policy and the critic on a minibatch of the rollout; its stats."""
        hp = self.hparams
        policy_opt, critic_opt = self.optimizers()
        logits = self._response_logits(self.model, mb.seq, mb.valid, mb.P)
        logprobs = rl.logprobs_from_logits(logits, mb.resp)
        pg_loss, pg_stats = rl.policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, hp.clip_eps)
        entropy = rl.masked_mean(rl.entropy_from_logits(logits), mb.mask)
        loss = pg_loss - hp.entropy_coef * entropy
        values = self._values(mb.seq, mb.valid, mb.P)
        vf_loss, vf_stats = rl.value_loss(values, mb.values, mb.returns, mb.mask, hp.value_clip_eps)
        if not (torch.isfinite(loss) and torch.isfinite(vf_loss)):
            raise FloatingPointError(
                f"ppo: non-finite loss at step {self.global_step} (policy {loss.item()}, value "
                f"{vf_loss.item()}); stopping, the last good checkpoint is kept. Lower the learning rates."
            )
        policy_opt.zero_grad()
        critic_opt.zero_grad()
        # every term is a mean over the minibatch's reply tokens: weighted, the mean over every rank's tokens
        self.manual_backward((loss + vf_loss) * self.token_weight(mb.mask))
        self.clip_gradients(policy_opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        self.clip_gradients(critic_opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        policy_opt.step()
        critic_opt.step()
        stats = {**pg_stats, **vf_stats, "policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy}
        return {k: v.detach().float() for k, v in stats.items()}

    def training_step(self, records: list[dict], batch_idx: int) -> None:
        """One PPO iteration: rollout, epochs of minibatch updates (stopping early when the policy moved too
        far), learning-rate schedules, KL-coefficient update, logging."""
        hp = self.hparams
        t0 = time.perf_counter()
        ro = self.rollout(records)
        self.model.train(not hp.disable_dropout)
        self.critic.train(not hp.disable_dropout)
        B = ro.seq.shape[0]
        stats: dict[str, list[torch.Tensor]] = {}
        stop = False
        for _ in range(hp.ppo_epochs):
            for idx in torch.randperm(B, device=self.device).split(hp.minibatch_size):
                for k, v in self._update(ro.select(idx)).items():
                    stats.setdefault(k, []).append(v)
                over = hp.target_kl_stop is not None and bool(stats["approx_kl"][-1] > hp.target_kl_stop)
                # decided together (any rank over the limit stops all): a rank that stopped alone would wait
                # in the next all-reduce while the others wait in their next backward pass
                if self.trainer.strategy.reduce_boolean_decision(over, all=False):
                    stop = True
                    break
            if stop:
                break
        self.step_schedulers()
        # every rank adapts beta from the same (global mean) KL, so the coefficients never drift apart
        kl_seq = self.reduce(ro.kl.sum(-1).mean(), "mean")
        self.kl_ctl.update(float(kl_seq), B * self.trainer.world_size)
        step_time = time.perf_counter() - t0
        mask = ro.mask
        log = {f"ppo/{k}": torch.stack(v).mean() for k, v in stats.items()}
        log.update(
            {
                "ppo/score": ro.scores.mean(),
                "ppo/kl": kl_seq,
                "ppo/kl_coef": torch.tensor(self.kl_ctl.value),
                "ppo/response_len": mask.sum(-1).mean(),
                "ppo/ended_fraction": ro.ended.float().mean(),
                "ppo/explained_variance": torch.tensor(rl.explained_variance(ro.values, ro.returns, mask)),
                "ppo/early_stop": torch.tensor(float(stop)),
                "perf/rollout_tokens_per_sec": mask.sum() / ro.gen_time,
                "perf/generate_fraction": torch.tensor(ro.gen_time / step_time),
            }
        )
        for k, v in ro.parts.items():
            log[f"ppo/{k}"] = v.float().mean()
        self.log_dict({k: v.to(self.device).float() for k, v in log.items()}, on_step=True, sync_dist=True)
        self.log("train/score", ro.scores.mean(), prog_bar=True, sync_dist=True)
        self._last_rollout = (records, ro.replies, ro.scores.tolist())

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[KL_CTL_KEY] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if KL_CTL_KEY in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint[KL_CTL_KEY])
