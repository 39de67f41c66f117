"""What the RL stages (PPO, GRPO) share: sampling replies, scoring their tokens, and rewarding them.

* :func:`check_sampling_for_rl`: the rollout sampling settings, refused as a ``UserError`` when unusable.
* :func:`sample_replies`: a batch of prompt records -> sampled replies as token tensors and text (:class:`Samples`).
* :func:`response_logits`: the temperature-scaled logits that predict each reply token, i.e. the distribution
  the rollout sampled from (before any top-k / top-p truncation).
* :class:`RewardSources`: the reward (a reward model, a Python function, or their weighted sum) and the gold
  reward that is only logged, with clear errors when a reward function fails or returns NaN.
* :func:`select_rows`: a minibatch of a rollout dataclass.
* :func:`rollout_table`: a Markdown table of sampled replies for TensorBoard.

Loading a reward model from a checkpoint stays with the stages (``lit_llm.evaluation.RewardModel.load``):
this module takes any object with its ``score(tokenizer, prompts, replies)`` method.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from lit_llm.backbone.generate import check_sampling, generate
from lit_llm.backbone.masks import padding_mask, positions_from_padding
from lit_llm.errors import UserError

RewardFn = Callable[[dict, str], float]
T = TypeVar("T")


class RewardError(UserError):
    """A reward (or gold) function raised, or returned something that is not a finite number."""


class Scorer(Protocol):
    """What :class:`RewardSources` needs of a reward model (``lit_llm.evaluation.RewardModel``)."""

    def score(self, tok: Any, prompts: Sequence[str], responses: Sequence[str]) -> Tensor: ...


def check_sampling_for_rl(stage: str, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings a policy-gradient stage cannot use (as a ``UserError`` naming ``stage``)."""
    try:
        check_sampling(temperature, top_k, top_p)
    except ValueError as err:
        raise UserError(f"{stage}: {err}") from None
    if temperature <= 0:
        raise UserError(
            f"{stage.upper()} samples its rollouts: temperature must be > 0, got {temperature} "
            "(0 would be greedy)"
        )


def response_logits(model: torch.nn.Module, seq: Tensor, valid: Tensor, P: int, temperature: float) -> Tensor:
    """Temperature-scaled logits that predict each response token.

    Args:
        model: The language model (policy or reference).
        seq: ``(B, P + N)`` left-padded prompts followed by the replies.
        valid: ``(B, P + N)`` True on real tokens.
        P: The padded prompt length.
        temperature: The sampling temperature; the logits are divided by it, so the log-probs are those of
            the distribution the rollout sampled from.

    Returns:
        ``(B, N, V)`` float32 logits at positions ``P-1 .. P+N-2`` (position ``P+t-1`` predicts reply token ``t``).
    """
    logits = model(seq, positions_from_padding(valid), padding_mask(valid))
    return logits[:, P - 1 : -1].float() / temperature


@dataclass
class Samples:
    """Sampled replies to a batch of prompts.

    Attributes:
        seq: ``(B, P + N)`` left-padded prompts followed by the sampled replies.
        valid: ``(B, P + N)`` True on real tokens.
        P: The padded prompt length; ``resp = seq[:, P:]``.
        resp: ``(B, N)`` the sampled reply tokens.
        mask: ``(B, N)`` 1.0 on real reply tokens, 0.0 on padding after a stop.
        replies: The decoded replies.
        ended: ``(B,)`` whether each reply stopped (end or eos token) before ``max_new_tokens``.
        gen_time: Seconds spent generating.
    """

    seq: Tensor
    valid: Tensor
    P: int
    resp: Tensor
    mask: Tensor
    replies: list[str]
    ended: Tensor
    gen_time: float

    def select(self: T, idx: Tensor) -> T:
        """The rows ``idx`` (a minibatch), of this class or a rollout that extends it.

        Tensors and lists are indexed along their first (batch) dimension, dicts of tensors entry by entry;
        everything else (the prompt length, timings, ``None``) is shared.
        """
        picked = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v[idx]
            elif isinstance(v, dict):
                v = {k: t[idx] for k, t in v.items()}
            elif isinstance(v, list):
                v = [v[i] for i in idx.tolist()]
            picked[f.name] = v
        return type(self)(**picked)


@torch.no_grad()
def sample_replies(
    model: torch.nn.Module,
    tok: Any,
    records: Sequence[dict],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample one reply per record (``{"prompt": str, ...}``) from ``model`` (put it in eval mode first).

    Replies stop at the tokenizer's end-of-turn or end-of-text token.
    """
    t0 = time.perf_counter()
    out = generate(
        model,
        [tok.prompt_ids(r["prompt"]) for r in records],
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens=tok.stop_ids,
        pad_id=tok.pad_id,
        generator=generator,
    )
    gen_time = time.perf_counter() - t0
    # clone: generate() runs in inference mode, and autograd may not save inference tensors
    seq, valid, P = out.sequences.clone(), out.valid.clone(), out.prompt_len
    resp = seq[:, P:]
    ended = torch.isin(resp, torch.tensor(tok.stop_ids, device=resp.device)).any(-1)
    return Samples(
        seq=seq,
        valid=valid,
        P=P,
        resp=resp,
        mask=valid[:, P:].float(),  # (B, N)
        replies=[tok.decode(r) for r in out.response_lists()],
        ended=ended,
        gen_time=gen_time,
    )


def function_name(fn: Callable) -> str:
    """``module:qualname`` of a function (the form ``--model.reward_fn`` takes), for error messages."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _short(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def call_scorer(fn: RewardFn, records: Sequence[dict], replies: Sequence[str], role: str) -> list[float]:
    """``[fn(record, reply), ...]`` as floats; a clear error when ``fn`` raises or returns no finite number.

    Args:
        fn: The scorer ``(record, reply) -> float``.
        records: Prompt records (``{"prompt": str, ...}``).
        replies: One reply per record.
        role: What the function is, for the message (``reward_fn``, ``gold_fn``).

    Raises:
        RewardError: Naming the function, the prompt and the reply; a NaN reward would otherwise
            turn the loss into NaN with no hint of where it came from.
    """
    out = []
    for record, reply in zip(records, replies):
        where = f"on prompt {_short(str(record.get('prompt')))} and reply {_short(reply)}"
        try:
            value = float(fn(record, reply))
        except Exception as err:  # noqa: BLE001 - any failure of user code is reported with its input
            raise RewardError(
                f"{role} {function_name(fn)} raised {type(err).__name__}: {err} {where}"
            ) from err
        if not math.isfinite(value):
            raise RewardError(
                f"{role} {function_name(fn)} returned {value} {where}; rewards must be finite numbers"
            )
        out.append(value)
    return out


class RewardSources:
    """The reward of replies: a reward model's score and/or a Python function's, weighted; and the gold reward.

    ``sources(records, replies)`` returns ``(total, parts)``: ``total`` ``(B,)`` is
    ``reward_model_weight * rm_score + reward_fn_weight * reward_fn``; ``parts`` holds each source by name
    (``rm_score``, ``reward_fn``) and ``gold``, the gold reward that is logged but never optimised (unless the
    same function is also ``reward_fn``).

    Args:
        tokenizer: The policy's tokenizer (the reward model renders the chat with it).
        reward_model: A frozen reward model (``lit_llm.evaluation.RewardModel``), or ``None``.
        reward_fn: A verifier ``(record, reply) -> float`` (e.g. ``lit_llm.data.tinyworld:gold_score``), or
            ``None``.
        reward_model_weight: Weight of the reward model's score.
        reward_fn_weight: Weight of ``reward_fn``.
        gold_fn: The gold scorer; when ``None``, the call's ``default_gold`` (the DataModule's) is used.
        reward_model_name: How to name the reward model in errors (its checkpoint path).

    Raises:
        UserError: If neither a reward model nor a reward function is given.
    """

    def __init__(
        self,
        tokenizer: Any,
        reward_model: Scorer | None = None,
        reward_fn: RewardFn | None = None,
        reward_model_weight: float = 1.0,
        reward_fn_weight: float = 1.0,
        gold_fn: RewardFn | None = None,
        reward_model_name: str = "reward model",
    ) -> None:
        if reward_model is None and reward_fn is None:
            raise UserError("no reward: give a reward model and/or a reward function")
        self.tokenizer, self.reward_model, self.reward_fn = tokenizer, reward_model, reward_fn
        self.reward_model_weight, self.reward_fn_weight = reward_model_weight, reward_fn_weight
        self.gold_fn, self.reward_model_name = gold_fn, reward_model_name

    def __call__(
        self,
        records: Sequence[dict],
        replies: Sequence[str],
        device: torch.device | str | None = None,
        default_gold: RewardFn | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total, parts)`` of ``replies`` to ``records``, as float32 tensors on ``device``.

        Raises:
            RewardError: When a function raises or returns NaN/inf, or the reward model scores NaN.
        """
        parts: dict[str, Tensor] = {}
        total = torch.zeros(len(records), device=device)
        if self.reward_model is not None:
            rm_score = self.reward_model.score(self.tokenizer, [r["prompt"] for r in records], replies)
            rm_score = rm_score.float().to(total.device)
            bad = (~torch.isfinite(rm_score)).nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                raise RewardError(
                    f"{self.reward_model_name} scored {rm_score[i].item()} on prompt "
                    f"{_short(str(records[i].get('prompt')))} and reply {_short(replies[i])}"
                )
            parts["rm_score"] = rm_score
            total = total + self.reward_model_weight * rm_score
        if self.reward_fn is not None:
            fn = torch.tensor(call_scorer(self.reward_fn, records, replies, "reward_fn"), device=total.device)
            parts["reward_fn"] = fn
            total = total + self.reward_fn_weight * fn
        gold_fn = self.gold_fn or default_gold
        if gold_fn is not None:
            parts["gold"] = torch.tensor(
                call_scorer(gold_fn, records, replies, "gold_fn"), device=total.device
            )
        return total, parts


def rollout_table(
    records: Sequence[dict], replies: Sequence[str], scores: Sequence[float], n: int = 8
) -> str:
    """A Markdown table of the first ``n`` prompts (their last 80 characters), replies and scores."""
    rows = ["| prompt | response | score |", "|---|---|---|"]
    rows += [
        f"| {r['prompt'][-80:]} | {y!r} | {s:.2f} |" for r, y, s in list(zip(records, replies, scores))[:n]
    ]
    return "\n".join(rows)
