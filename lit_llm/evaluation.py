"""Using trained models on text: a chat policy's replies, their gold score, a reward model's scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lit_llm.backbone.generate import left_pad
from lit_llm.backbone.heads import ScalarHeadModel
from lit_llm.backbone.model import Transformer
from lit_llm.checkpoint import load_backbone, load_checkpoint
from lit_llm.errors import CheckpointError
from lit_llm.rl.ppo_math import kl_estimate, logprobs_from_logits
from lit_llm.rl.scoring import response_logits, sample_replies
from lit_llm.tokenizer import Tokenizer


@torch.no_grad()
def chat_completions(
    model: Transformer,
    tok: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 64,
    temperature: float = 0.0,
) -> list[str]:
    """Greedy (or sampled) replies of a chat model to single-turn prompts, decoded to text."""
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            records = [{"prompt": p} for p in prompts[i : i + batch_size]]
            replies += sample_replies(model, tok, records, max_new_tokens, temperature).replies
    finally:
        model.train(was_training)
    return replies


def gold_score(
    model: Transformer,
    tok: Tokenizer,
    records: Sequence[dict],
    scorer: Callable[[dict, str], float],
    max_new_tokens: int = 48,
    temperature: float = 0.0,
) -> tuple[float, list[str]]:
    """Mean ``scorer(record, reply)`` of greedy (or sampled) replies to ``records`` (``[{"prompt", ...}]``),
    and the replies. ``scorer`` comes with the data (e.g. ``lit_llm.data.tinyworld.gold_score``)."""
    replies = chat_completions(
        model, tok, [r["prompt"] for r in records], max_new_tokens, temperature=temperature
    )
    scores = [scorer(r, reply) for r, reply in zip(records, replies)]
    return sum(scores) / max(1, len(scores)), replies


class RewardModel(ScalarHeadModel):
    """A trained reward model, usable on its own: ``RewardModel.load(ckpt).score(tok, prompts, responses)``."""

    @classmethod
    def load(cls, path: str) -> tuple[RewardModel, Tokenizer]:
        """The reward model of a ``reward`` stage checkpoint (backbone + ``value_head``), in eval mode."""
        backbone, tok, meta = load_backbone(path)
        if meta.get("stage") != "reward":
            raise CheckpointError(f"{path} is a {meta.get('stage')!r} checkpoint, not a reward model")
        rm = cls(backbone)
        state = load_checkpoint(path)["state_dict"]
        head = {k[len("value_head.") :]: v for k, v in state.items() if k.startswith("value_head.")}
        if not head:
            raise CheckpointError(f"{path} has no value_head weights")
        rm.value_head.load_state_dict(head)
        return rm.eval(), tok

    @torch.no_grad()
    def score(
        self, tok: Tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int | None = None
    ) -> torch.Tensor:
        """Rewards ``(N,)`` of (prompt, response) pairs, rendered with the chat template (the last ``max_len``
        tokens kept, as in training)."""
        max_len = max_len or self.model.config.block_size
        seqs = [
            tok.render_chat([{"role": "user", "content": p}, {"role": "assistant", "content": r}])[0][
                -max_len:
            ]
            for p, r in zip(prompts, responses)
        ]
        ids, valid = left_pad(seqs, tok.pad_id, self.value_head.weight.device)
        return self(ids, valid)


def score_by_difficulty(
    records: Sequence[dict], replies: Sequence[str], scorer: Callable[[dict, str], float]
) -> dict[int, float]:
    """Mean ``scorer(record, reply)`` per ``record["difficulty"]`` (records without one count as 0)."""
    sums: dict[int, list[float]] = {}
    for r, reply in zip(records, replies):
        sums.setdefault(int(r.get("difficulty", 0)), []).append(scorer(r, reply))
    return {d: sum(v) / len(v) for d, v in sorted(sums.items())}


@torch.no_grad()
def sampled_kl(
    policy: Transformer,
    reference: Transformer,
    tok: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> float:
    """Monte-Carlo ``KL(policy || reference)`` per reply, in nats: replies are sampled from the policy at
    ``temperature`` and each contributes the sum over its tokens (the stop token included) of the k3
    estimator ``r - 1 - log r``, ``r = q(y_t) / p(y_t)``: per token an unbiased, never negative estimate of
    the KL of that step's distributions, so the sum estimates the KL of whole replies (chain rule). Both
    models score with the same temperature. The same yardstick for every aligned policy (PPO, GRPO, DPO),
    whatever each logged while training."""
    was = policy.training, reference.training
    policy.eval()
    reference.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, len(prompts), batch_size):
            records = [{"prompt": p} for p in prompts[i : i + batch_size]]
            s = sample_replies(policy, tok, records, max_new_tokens, temperature, generator=generator)
            lp = logprobs_from_logits(response_logits(policy, s.seq, s.valid, s.P, temperature), s.resp)
            lq = logprobs_from_logits(response_logits(reference, s.seq, s.valid, s.P, temperature), s.resp)
            total += float((kl_estimate(lp, lq, "k3") * s.mask).sum())
            n += len(records)
    finally:
        policy.train(was[0])
        reference.train(was[1])
    return total / max(n, 1)
