"""Generation as small pure functions: logits -> probabilities -> token, prefill, decode, stream.

``generate`` decodes a batch of prompts of different lengths: prompts are left-padded, padded keys are
masked out of attention, and RoPE positions count only real tokens, so every row gets exactly the tokens
it would get alone. A preallocated KV cache makes each new token cost one position's compute.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lit_llm.backbone.cache import KVCache
from lit_llm.backbone.masks import padding_mask, positions_from_padding
from lit_llm.backbone.model import Transformer


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Next-token probabilities ``(B, V)`` from logits ``(B, V)``.

    Args:
        logits: Unnormalised scores for the next token.
        temperature: Divides the logits; must be positive here (greedy decoding does not call this).
        top_k: Keep only the ``k`` most likely tokens (``None`` or 0: off, as in Hugging Face).
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``
            (``None`` or 1: off).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 means greedy decoding: take the argmax instead of sampling")
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
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


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that have no meaning (instead of NaN probabilities or a crash later).

    Raises:
        ValueError: naming the setting (the CLI and the stages turn it into a one-line user error).
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row ``(B,)``: greedy (argmax) when ``temperature == 0``, else sampled."""
    if temperature == 0:
        return logits.float().argmax(dim=-1)  # float32: CPU's bfloat16 argmax is several times slower
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


def _next_token_logits(
    model: Transformer,
    idx: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(B, V)`` for the token after ``idx``: the head runs on the last position only."""
    return model.lm_head(model.hidden(idx, positions, mask, cache, images)[:, -1])


_compiled_steps: dict[str, Callable] = {}
# compiled decoding sizes its cache, and the part of it each step attends over, in multiples of this many
# positions: one trace per bucket, and no step reads more than 63 empty slots
STATIC_CACHE_BUCKET = 64


def compiled_next_token_logits(frozen: bool = False, cuda_graphs: bool = False) -> Callable:
    """:func:`_next_token_logits` through ``torch.compile`` (built once; traced per model and shape).

    ``frozen`` compiles with Inductor's weight freezing: the weights become constants of the compiled code
    (on CPU, pre-packed for oneDNN), which makes bfloat16 decoding faster but means later changes to the
    weights are not seen. ``cuda_graphs`` replays each step as one CUDA graph (a decode step of a small model
    is otherwise dominated by kernel launches); the returned logits are overwritten by the next step.
    """
    key = ("frozen" if frozen else "default") + ("-cudagraphs" if cuda_graphs else "")
    if key not in _compiled_steps:
        # one trace per (model, dtype, batch size, cache length): Dynamo's default limit of 8 traces per
        # function would silently fall back to eager after a few models or batch sizes
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        options = {"freezing": frozen, "triton.cudagraphs": cuda_graphs}
        _compiled_steps[key] = torch.compile(_next_token_logits, dynamic=False, options=options)
    return _compiled_steps[key]


_graph_caches: OrderedDict[tuple, KVCache] = OrderedDict()  # idle CUDA-graph caches, reused (LRU of 4)


def _static_cache(model: Transformer, B: int, n_keys: int, dtype, device: torch.device):
    """``(cache, pool_key)``: a fixed-shape cache; on CUDA one kept across calls at a fixed address.

    A CUDA graph replays the same memory addresses, so the graphed step may only write to buffers whose
    address never changes (``mark_static_address``), and each new cache costs a new graph. A decode takes its
    cache out of the pool while it runs and gives it back when it ends (:func:`_release_cache`), so decodes
    that overlap (two ``stream`` iterators) never share one. Reusing an idle cache is safe: every slot a step
    can see has been rewritten by this decode's prefill or steps; the mask hides the rest.
    """
    if device.type != "cuda":
        return model.new_cache(B, n_keys, dtype, static=True), None
    c = model.config
    key = (id(model), c.n_layer, c.n_kv_head, c.head_dim, B, n_keys, dtype, str(device))
    cache = _graph_caches.pop(key, None)
    if cache is None:
        cache = model.new_cache(B, n_keys, dtype, static=True)
        for t in (*cache.k, *cache.v, cache.pos):
            torch._dynamo.mark_static_address(t)
    return cache, key


def _release_cache(key: tuple | None, cache: KVCache) -> None:
    """Give a CUDA-graph cache back to the pool when its decode ends."""
    if key is None:
        return
    _graph_caches[key] = cache
    _graph_caches.move_to_end(key)
    while len(_graph_caches) > 4:
        _graph_caches.popitem(last=False)


def _bucket(n: int, limit: int) -> int:
    """``n`` rounded up to a multiple of :data:`STATIC_CACHE_BUCKET`, at most ``limit``."""
    return min(limit, -(-n // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET)


def _check_compile(model: Transformer, compile: bool | str, use_cache: bool) -> None:
    if compile not in (False, True, "frozen"):
        raise ValueError(f"compile must be False, True or 'frozen', got {compile!r}")
    if compile and not use_cache:
        raise ValueError("compile decodes with the KV cache: it cannot be combined with use_cache=False")
    if compile == "frozen" and any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "compile='frozen' bakes the weights into the compiled code, so later updates would be ignored: "
            "call model.requires_grad_(False) first to mark them final (or use compile=True)"
        )


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
    compile: bool | str = False,
    images: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(token (B,), was_live (B,), ids_so_far, valid_so_far)`` after each new token.

    ``images`` enter the prefill only: their features sit in the KV cache from then on (without a cache,
    every step recomputes the whole sequence, images included).
    """
    _check_compile(model, compile, use_cache)
    check_sampling(temperature, top_k, top_p)
    compile, frozen = bool(compile), compile == "frozen"
    device = model.embed_tokens.weight.device
    ids, valid = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    total = P + max_new_tokens
    if total > model.config.block_size and model.config.pos == "learned":
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds block_size")
    ids = torch.cat([ids, torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)], 1)
    valid = torch.cat([valid, torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)], 1)
    positions = positions_from_padding(valid)  # real tokens count 0, 1, 2, ...
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    live = torch.ones(B, dtype=torch.bool, device=device)
    # float32 keys/values on CPU whatever the weights' dtype: CPU's bfloat16 attention kernel is the slower one
    # for a single query (figures: benchmarks/BENCHMARKS.md, decoding)
    cache_dtype = torch.float32 if device.type == "cpu" else None
    if compile:
        # a fixed-shape cache whose length is rounded up to a bucket, so that other prompt lengths reuse the
        # compiled steps; each step attends over the filled slots, also rounded up (StaticKVCache.visible)
        n_keys = _bucket(total, total + STATIC_CACHE_BUCKET)
        valid = torch.cat([valid, torch.zeros((B, n_keys - total), dtype=torch.bool, device=device)], 1)
        cache, pool_key = _static_cache(model, B, n_keys, cache_dtype, device)
        cache.index, cache.visible = torch.arange(P, device=device), _bucket(P, n_keys)
        step_logits = compiled_next_token_logits(frozen, device.type == "cuda")
    else:
        cache, pool_key = (model.new_cache(B, total, cache_dtype) if use_cache else None), None
        step_logits = _next_token_logits
    try:
        # prefill, eager: it runs once per call and its shape changes with the prompt length
        n_visible = cache.visible if compile else None
        logits = _next_token_logits(
            model, ids[:, :P], positions[:, :P], padding_mask(valid, 0, P, n_visible), cache, images
        )
        if compile:
            cache.index = torch.zeros(1, dtype=torch.long, device=device)  # one slot per step from now on
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
            if cache is None:  # recompute the whole sequence
                logits = _next_token_logits(
                    model,
                    ids[:, : t + 1],
                    positions[:, : t + 1],
                    padding_mask(valid, 0, t + 1),
                    None,
                    images,
                )
                continue
            if compile:
                cache.index.fill_(t)
                cache.visible = n_visible = _bucket(t + 1, n_keys)
            mask = padding_mask(valid, t, 1, n_visible)
            # fresh (B, 1) tensors rather than views into ids/positions: a compiled step sees the same layout
            logits = step_logits(model, tok[:, None], positions[:, t : t + 1].clone(), mask, cache)
    finally:  # also when the caller stops iterating early
        _release_cache(pool_key, cache)


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
    compile: bool | str = False,
    images: torch.Tensor | None = None,
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
        compile: Run each decode step through ``torch.compile`` over a fixed-shape cache
            (:class:`~lit_llm.backbone.cache.StaticKVCache`): the first call per model, batch size and total
            length compiles (tens of seconds), later ones replay it. Worth it for long or repeated decoding.
            ``"frozen"`` also freezes the weights into the compiled code (meant for bfloat16 on CPU; see
            benchmarks/BENCHMARKS.md for when it pays); the model's parameters must have
            ``requires_grad=False``, and changes to them are not seen later.
        images: Image tiles ``(n_tiles, C, S, S)`` for a model with a vision tower: their features replace
            the ``<|patch|>`` tokens of the prompts (row 0's tiles first), in the prefill only.
    """
    P = max(len(p) for p in prompts) if prompts else 0
    steps = _decode(
        model,
        prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        pad_id,
        generator,
        use_cache,
        compile,
        images,
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
    compile: bool | str = False,
    images: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are decoded (the stop token included); ``compile`` and
    ``images`` as in :func:`generate`."""
    for tok, was_live, _, _ in _decode(
        model,
        [prompt],
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        0,
        generator,
        True,
        compile,
        images,
    ):
        if bool(was_live[0]):
            yield int(tok[0])
