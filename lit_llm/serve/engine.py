"""Continuous batching: requests that arrive at different times decode together in one loop.

The engine owns the model and a :class:`~lit_llm.backbone.cache.SlotKVCache` of ``max_batch`` rows. One
background thread runs the loop:

1. **Admit.** While a row is free and a request waits, the request's prompt is prefilled alone into the
   next free row (in chunks of ``prefill_chunk`` tokens, so a long prompt is not one huge attention matrix),
   and its first token is sampled from the prefill's last logits.
2. **Decode.** One forward pass over all live rows: each row feeds its last token at its own position and
   attends over its own slots only (the mask hides the rest), so a row gets the same tokens it would get
   decoding alone, whoever shares the batch.
3. **Retire.** A row that emitted a stop token, reached its ``max_tokens`` or was cancelled (its client left,
   or a stop string was seen) frees its row at once; the last live row moves into its place, so live rows
   stay packed at the front of the cache and the next waiting request takes the freed row on the next pass.

Events reach the caller through the request's ``emit`` callback, called from the engine thread:
``("token", id)`` for every new token, then exactly one ``("done", reason)`` (``"stop"``: a stop token;
``"length"``: ``max_tokens`` or the context was reached; ``"cancelled"``) or ``("error", message)``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lit_llm.backbone.cache import SlotKVCache
from lit_llm.backbone.generate import check_sampling, sample
from lit_llm.backbone.masks import causal_mask
from lit_llm.backbone.model import Transformer

Event = tuple[str, object]


@dataclass(eq=False)
class Request:
    """One sequence to continue.

    Args:
        prompt: Token ids (at least one).
        max_tokens: Most new tokens (the stop token counts).
        emit: Called from the engine thread with each event (see the module docstring); must not block.
        temperature: 0 for greedy, else the sampling temperature.
        top_p: Nucleus sampling threshold (``None`` or 1: off).
        top_k: Sample among the ``k`` most likely tokens (``None`` or 0: off).
        seed: Seed of this request's own random generator (``None``: a fresh random seed), so a seeded
            request samples the same tokens whatever else is in the batch.
        stop_ids: Token ids that end the reply (kept as its last token).
    """

    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """Stop this request at the next step (its row is freed, a ``("done", "cancelled")`` follows)."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    req: Request
    length: int  # slots filled in the cache (prompt + new tokens fed so far)
    last: int  # the token to feed next
    made: int  # new tokens emitted
    generator: torch.Generator | None


class Engine:
    """The model behind a server: a thread that batches every live request into one decode loop.

    Args:
        model: The language model (eval mode, no gradients: see ``load_for_inference``).
        max_batch: Rows decoded together; more requests wait for a free row.
        context: Longest sequence (prompt + reply) of one request; at most the model's ``block_size``. The cache
            holds ``max_batch x context`` positions per layer.
        prefill_chunk: Prompt tokens prefilled per forward pass.
        paused: Start with the loop paused (:meth:`resume` starts it): requests submitted meanwhile are
            admitted together, which makes a batch deterministic in tests.
    """

    def __init__(
        self,
        model: Transformer,
        max_batch: int = 8,
        context: int | None = None,
        prefill_chunk: int = 512,
        paused: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        block = model.config.block_size
        self.context = min(context or block, block)
        if self.context < 2:
            raise ValueError(f"context must be at least 2 tokens, got {self.context}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        device = model.embed_tokens.weight.device
        # float32 keys/values on CPU whatever the weights' dtype, as generate does (faster attention there)
        dtype = torch.float32 if device.type == "cpu" else model.embed_tokens.weight.dtype
        c = model.config
        self.cache = SlotKVCache(c.n_layer, max_batch, c.n_kv_head, self.context, c.head_dim, dtype, device)
        self.device = device
        self.rows: list[_Row] = []
        self.pending: collections.deque[Request] = collections.deque()
        self.steps = 0  # decode passes run (for tests and metrics)
        self.max_live = 0  # the most rows ever decoded in one pass
        self._cv = threading.Condition()
        self._stopping = False
        self._paused = paused
        self._thread = threading.Thread(target=self._run, name="lit-llm-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side ---------------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue ``req``; its events start arriving from the engine thread.

        Raises:
            ValueError: An empty prompt, ``max_tokens < 1``, prompt + ``max_tokens`` beyond :attr:`context`, or
                meaningless sampling settings (nothing is queued).
        """
        if len(req.prompt) == 0:
            raise ValueError("the prompt encodes to no tokens")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if len(req.prompt) + req.max_tokens > self.context:
            raise ValueError(
                f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                f"context of {self.context} tokens: shorten the prompt or ask for fewer tokens"
            )
        check_sampling(req.temperature, req.top_k, req.top_p)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self.pending.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt: Sequence[int], max_tokens: int, **kwargs) -> tuple[list[int], str]:
        """Submit one request and wait for it: ``(new tokens, finish reason)`` (a convenience for scripts)."""
        done = threading.Event()
        out: list[int] = []
        end: list[object] = []

        def emit(event: Event) -> None:
            if event[0] == "token":
                out.append(int(event[1]))
            else:
                end.append(event)
                done.set()

        self.submit(Request(prompt, max_tokens, emit, **kwargs))
        done.wait()
        kind, value = end[0]
        if kind == "error":
            raise RuntimeError(str(value))
        return out, str(value)

    def pause(self) -> None:
        """Hold the loop after its current pass (live rows wait; nothing is lost)."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop: live and waiting requests end ``cancelled``; the thread exits."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and (self._paused or (not self.pending and not self.rows)):
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self.rows:
                        self._step()
                except Exception as err:  # noqa: BLE001 - a failure ends the requests it hit, not the server
                    message = f"{type(err).__name__}: {err}"
                    for row in self.rows:
                        row.req.emit(("error", message))
                    self.rows.clear()
        for row in self.rows:
            row.req.emit(("done", "cancelled"))
        self.rows.clear()
        while self.pending:
            self.pending.popleft().emit(("done", "cancelled"))

    def _admit(self) -> None:
        while len(self.rows) < self.max_batch:
            with self._cv:
                if not self.pending:
                    return
                req = self.pending.popleft()
            if req.cancelled:
                req.emit(("done", "cancelled"))
                continue
            try:
                logits = self._prefill(len(self.rows), req.prompt)
            except Exception as err:  # noqa: BLE001 - this request fails alone
                req.emit(("error", f"{type(err).__name__}: {err}"))
                continue
            gen = None
            if req.temperature > 0:
                gen = torch.Generator(device=self.device)
                if req.seed is None:
                    gen.seed()
                else:
                    gen.manual_seed(req.seed)
            row = _Row(req, length=len(req.prompt), last=-1, made=0, generator=gen)
            self.rows.append(row)
            self._take(len(self.rows) - 1, logits)

    def _prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        """Prefill ``prompt`` into row ``slot`` in chunks; logits ``(1, V)`` of the next token."""
        cache = self.cache
        ids = torch.as_tensor(list(prompt), dtype=torch.long, device=self.device)[None]  # (1, P)
        cache.rows = slice(slot, slot + 1)
        hidden = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            end = min(start + self.prefill_chunk, ids.shape[1])
            cols = torch.arange(start, end, device=self.device)[None]  # (1, T)
            cache.cols, cache.visible = cols, end
            mask = causal_mask(end - start, start, end, self.device)  # (1, 1, T, end)
            hidden = self.model.hidden(ids[:, start:end], cols, mask, cache)
        return self.model.lm_head(hidden[:, -1])

    def _step(self) -> None:
        """One decode pass over every live row, then each row takes its token."""
        cache, n = self.cache, len(self.rows)
        lengths = torch.tensor([r.length for r in self.rows], dtype=torch.long, device=self.device)
        tokens = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        visible = int(lengths.max()) + 1
        cache.rows, cache.cols, cache.visible = slice(0, n), lengths[:, None], visible
        # row b sees its own slots 0..length_b (the new key included), nothing of an earlier occupant
        mask = (torch.arange(visible, device=self.device)[None] <= lengths[:, None])[:, None, None]
        logits = self.model.lm_head(self.model.hidden(tokens, lengths[:, None], mask, cache)[:, -1])
        self.steps += 1
        self.max_live = max(self.max_live, n)
        for r in self.rows:
            r.length += 1
        # retire from the back, so that moving the last live row never moves a row not yet visited
        for i in reversed(range(n)):
            self._take(i, logits[i : i + 1])

    def _take(self, i: int, logits: torch.Tensor) -> None:
        """Row ``i`` samples its next token from ``logits`` ``(1, V)``, emits it, and retires if it is done."""
        row = self.rows[i]
        req = row.req
        if req.cancelled:
            self._retire(i, "cancelled")
            return
        tok = int(sample(logits, req.temperature, req.top_k, req.top_p, row.generator)[0])
        row.last, row.made = tok, row.made + 1
        req.emit(("token", tok))
        if tok in req.stop_ids:
            self._retire(i, "stop")
        elif row.made >= req.max_tokens or row.length >= self.context:
            self._retire(i, "length")

    def _retire(self, i: int, reason: str) -> None:
        row = self.rows[i]
        last = len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self.cache.move_row(last, i, moved.length)
            self.rows[i] = moved
        self.rows.pop()
        row.req.emit(("done", reason))
