"""Scoring a chat policy on held-out prompts with a gold reward (tinyworld's exact answer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lit_llm.backbone.generate import generate
from lit_llm.backbone.model import Transformer
from lit_llm.data.tinyworld import gold_reward
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
            ids = [tok.prompt_ids(p) for p in prompts[i : i + batch_size]]
            out = generate(
                model,
                ids,
                max_new_tokens,
                temperature,
                stop_tokens=[tok.end_id, tok.eos_id],
                pad_id=tok.pad_id,
            )
            replies += [tok.decode(r) for r in out.response_lists()]
    finally:
        model.train(was_training)
    return replies


def gold_score(
    model: Transformer,
    tok: Tokenizer,
    records: Sequence[dict],
    reward: Callable[[str, str], float] = gold_reward,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
) -> tuple[float, list[str]]:
    """Mean gold reward of greedy (or sampled) replies to ``records`` (``[{"prompt", "answer"}]``), and the replies."""
    replies = chat_completions(
        model, tok, [r["prompt"] for r in records], max_new_tokens, temperature=temperature
    )
    scores = [reward(r["answer"], reply) for r, reply in zip(records, replies)]
    return sum(scores) / max(1, len(scores)), replies
