"""A preallocated key/value cache for incremental decoding.

Keys and values of every layer live in tensors allocated once, ``(B, n_kv_head, max_len, head_dim)``; each
forward pass writes its new keys/values at ``[length, length + T)`` and attends over ``[0, length + T)``.
No concatenation, no reallocation while generating.

The cache also remembers the position of every stored key, ``(B, max_len)``: layers that attend locally
(chunked or sliding-window attention) compare query and key positions, and with left-padded batches a
key's position is not its index in the cache. Those layers keep every key and mask the far ones out (exact
and simple; a rolling buffer of ``window`` / ``chunk`` keys would save memory on long generations).

:class:`StaticKVCache` is the fixed-shape variant for compiled decoding: it writes at slots the caller names
and always returns the whole buffers, so every decode step has the same shapes and ``torch.compile`` traces it
once (the mask, not a slice, hides the empty slots).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers plus the number of positions already filled.

    Attributes:
        static: False here: ``update`` returns the filled prefix ``[0, length)``; see :class:`StaticKVCache`.

    Args:
        n_layer: Number of transformer blocks.
        batch_size: Rows decoded together.
        n_kv_head: Key/value heads per layer.
        max_len: Longest total sequence (prompt plus new tokens).
        head_dim: Width of one head.
        dtype: Storage dtype (use the model's compute dtype).
        device: Storage device.
    """

    static = False

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.pos = torch.zeros((batch_size, max_len), dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ``(B, n_kv_head, T, hd)`` at the current length; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        self.k[layer][:, :, start:end] = k.to(self.k[layer].dtype)
        self.v[layer][:, :, start:end] = v.to(self.v[layer].dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def update_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Store the positions ``(B, T)`` of the new keys; return the positions of all keys ``(B, S)``."""
        start, end = self.length, self.length + positions.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_len}")
        self.pos[:, start:end] = positions
        return self.pos[:, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward pass, after all layers)."""
        self.length += n

    def reset(self) -> None:
        self.length = 0


class StaticKVCache(KVCache):
    """A KV cache whose shapes never change, for ``torch.compile``-d decoding.

    Before each forward pass the caller sets :attr:`index` (the slots it writes, ``(T,)`` long) and
    :attr:`visible` (how many leading slots attention reads, all of them by default), and passes explicit
    ``positions`` and a boolean mask over the ``visible`` slots (empty and future slots False). ``update``
    writes with ``index_copy_`` and returns the first ``visible`` slots, and the model does not advance
    :attr:`length`: a decode step depends on no Python integer but ``visible``, so a compiled step is traced
    once per ``visible`` value (callers round it up to a few buckets) and replayed for every token.
    """

    static = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.index = torch.zeros(0, dtype=torch.long, device=self.pos.device)
        self.visible = self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``(B, n_kv_head, T, hd)`` at slots :attr:`index`; return the visible slots."""
        self.k[layer].index_copy_(2, self.index, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.index, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, : self.visible], self.v[layer][:, :, : self.visible]

    def update_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Write the positions ``(B, T)`` at slots :attr:`index`; return the positions of the visible slots."""
        self.pos.index_copy_(1, self.index, positions)
        return self.pos[:, : self.visible]


class SlotKVCache(KVCache):
    """A KV cache whose rows are independent sequences of different lengths: continuous batching.

    Each row (a *slot*) holds one sequence; a forward pass runs on the rows ``[row_start, row_start + B)``
    (:attr:`rows`) and writes the new keys of row ``b`` at its own slots ``cols[b]`` (``(B, T)`` long), so a
    row that has just joined and a row deep into its reply decode in the same step. Like
    :class:`StaticKVCache`, the caller passes explicit ``positions`` and a mask over the first :attr:`visible`
    slots (a row's unwritten and stale slots False), and the model does not advance a shared length.

    The scheduler keeps its live rows packed at the front (:meth:`move_row` fills a finished row's place with
    the last live row), so the rows of a step are one contiguous block: a view, never a gather.
    """

    static = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows = slice(0, 0)
        self.cols = torch.zeros((0, 1), dtype=torch.long, device=self.pos.device)
        self.visible = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``(B, n_kv_head, T, hd)`` of row ``b`` at slots ``cols[b]``; return the visible slots
        of the rows ``(B, n_kv_head, visible, hd)``."""
        K, V = self.k[layer][self.rows], self.v[layer][self.rows]
        b = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1), broadcast against cols (B, T)
        # advanced indices on dims 0 and 2 around a slice: the indexed shape is (B, T, n_kv_head, hd)
        K[b, :, self.cols] = k.transpose(1, 2).to(K.dtype)
        V[b, :, self.cols] = v.transpose(1, 2).to(V.dtype)
        return K[:, :, : self.visible], V[:, :, : self.visible]

    def update_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Write the positions ``(B, T)`` at slots ``cols``; return those of the visible slots ``(B, visible)``."""
        P = self.pos[self.rows]
        P[torch.arange(positions.shape[0], device=positions.device)[:, None], self.cols] = positions
        return P[:, : self.visible]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` slots of row ``src`` into row ``dst`` (every layer, and the positions)."""
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]
        self.pos[dst, :length] = self.pos[src, :length]
