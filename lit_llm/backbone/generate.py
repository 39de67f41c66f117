"""Generation as small pure functions: logits -> probabilities -> token, prefill, decode, stream.

``generate`` decodes a batch of prompts of different lengths: prompts are left-padded, padded keys are
masked out of attention, and RoPE positions count only real tokens, so every row gets exactly the tokens
it would get alone. A preallocated KV cache makes each new token cost one position's compute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lit_llm.backbone.model import Transformer


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Next-token probabilities ``(B, V)`` from logits ``(B, V)``.

    Args:
        logits: Unnormalised scores for the next token.
        temperature: Divides the logits; must be positive here (greedy decoding does not call this).
        top_k: Keep only the ``k`` most likely tokens.
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature} (use 0 for greedy)")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row ``(B,)``: greedy (argmax) when ``temperature == 0``, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None):
    """Left-pad token lists to one length: ``(ids (B, P), valid (B, P) bool)``."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        valid[i, P - len(p) :] = True
    return ids, valid


def attention_mask(key_valid: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """Boolean ``(B, 1, q_len, q_start + q_len)`` mask: causal, padded keys hidden, self always visible.

    A padded query would otherwise see no key at all (a NaN row in softmax); letting every position see
    itself keeps the arithmetic finite, and a padded position's output is never used.
    """
    S = q_start + q_len
    q_pos = torch.arange(q_start, S, device=key_valid.device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None] & key_valid[:, None, :S]  # (B, q_len, S)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


@dataclass
class Generation:
    """Result of :func:`generate`.

    Attributes:
        sequences: ``(B, P + N)`` left-padded prompts followed by the new tokens (pad after a stop).
        valid: ``(B, P + N)`` True on real tokens (not left padding, not after a stop token).
        prompt_len: ``P``, the padded prompt length; responses are ``sequences[:, P:]``.
    """

    sequences: torch.Tensor
    valid: torch.Tensor
    prompt_len: int

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]

    @property
    def response_mask(self) -> torch.Tensor:
        return self.valid[:, self.prompt_len :]

    def response_lists(self) -> list[list[int]]:
        """Each row's new tokens as a list (stop token included, padding dropped)."""
        return [r[m].tolist() for r, m in zip(self.responses, self.response_mask)]


def _decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None,
    use_cache: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(token (B,), was_live (B,), ids_so_far, valid_so_far)`` after each new token."""
    device = model.embed_tokens.weight.device
    ids, valid = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    total = P + max_new_tokens
    if total > model.config.block_size and model.config.pos == "learned":
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds block_size")
    ids = torch.cat([ids, torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)], 1)
    valid = torch.cat([valid, torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)], 1)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # real tokens count 0, 1, 2, ...
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    live = torch.ones(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B, total) if use_cache else None

    logits = model(ids[:, :P], positions[:, :P], attention_mask(valid, 0, P), cache)[:, -1]  # prefill
    for step in range(max_new_tokens):
        t = P + step
        tok = sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(live, tok, torch.full_like(tok, pad_id))
        ids[:, t] = tok
        valid[:, t] = live
        positions[:, t] = positions[:, t - 1] + 1
        was_live = live.clone()
        if stops.numel():
            live = live & ~torch.isin(tok, stops)
        yield tok, was_live, ids[:, : t + 1], valid[:, : t + 1]
        if not bool(live.any()) or step == max_new_tokens - 1:
            return
        if cache is not None:
            logits = model(ids[:, t : t + 1], positions[:, t : t + 1], attention_mask(valid, t, 1), cache)[
                :, -1
            ]
        else:
            logits = model(ids[:, : t + 1], positions[:, : t + 1], attention_mask(valid, 0, t + 1))[:, -1]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Generation:
    """Continue a batch of prompts (token lists of any lengths).

    Args:
        model: The language model (put it in eval mode first).
        prompts: One list of token ids per row.
        max_new_tokens: Upper bound on new tokens per row.
        temperature: 0 for greedy decoding, otherwise the sampling temperature.
        top_k: Sample among the ``k`` most likely tokens only.
        top_p: Nucleus sampling threshold.
        stop_tokens: A row stops after emitting any of these (the stop token is kept in the output).
        pad_id: Filler for left padding and for rows that stopped.
        generator: Random generator for reproducible sampling.
        use_cache: Decode with the KV cache (default) or recompute the whole sequence each step.
    """
    P = max(len(p) for p in prompts) if prompts else 0
    steps = _decode(
        model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id, generator, use_cache
    )
    last = deque(steps, maxlen=1)  # run the decoder to the end, keep its final state
    if not last:  # max_new_tokens == 0
        ids, valid = left_pad(prompts, pad_id, model.embed_tokens.weight.device)
    else:
        ids, valid = last[0][2], last[0][3]
    return Generation(ids.clone(), valid.clone(), P)


@torch.inference_mode()
def stream(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are decoded (the stop token included)."""
    for tok, was_live, _, _ in _decode(
        model, [prompt], max_new_tokens, temperature, top_k, top_p, stop_tokens, 0, generator, True
    ):
        if bool(was_live[0]):
            yield int(tok[0])
