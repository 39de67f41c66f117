"""Attention masks and token positions: every rule about who may attend to whom, in one place.

All masks are boolean and ``True`` where a query may attend a key, shaped ``(B or 1, 1, T, S)`` for
``F.scaled_dot_product_attention`` (``T`` queries, ``S`` keys; the head dimension broadcasts).

One rule for rows that are (partly or wholly) padding: **every position always sees itself**. A padded
query would otherwise see no key at all, and a softmax over nothing is NaN, which then leaks into the
gradients through the masked arithmetic. With the diagonal kept, a padded position computes something
finite that nobody reads (its label is ignored, its key is hidden from every real query). A row with no
real token at all has positions 0 everywhere and no last token: :func:`last_token_index` refuses it.

Positions are what RoPE rotates by and what a learned position embedding looks up, so they must count
*real* tokens of *one* sequence: left padding does not shift them (:func:`positions_from_padding`), and in a
packed row they restart at 0 with every sequence (:func:`positions_from_segments`).
"""

from __future__ import annotations

import torch


def causal_mask(
    q_len: int, q_start: int = 0, n_keys: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Causal mask ``(1, 1, q_len, S)``: the query at absolute index ``q_start + i`` sees keys ``0..q_start+i``.

    Args:
        q_len: Number of queries ``T``.
        q_start: Absolute index of the first query (the number of keys already cached before it).
        n_keys: Number of keys ``S``; defaults to ``q_start + q_len``. Keys beyond a query are hidden as future.
        device: Where to build the mask.
    """
    S = q_start + q_len if n_keys is None else n_keys
    q_idx = torch.arange(q_start, q_start + q_len, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    return (k_idx <= q_idx)[None, None]


def padding_mask(
    key_valid: torch.Tensor, q_start: int = 0, q_len: int | None = None, n_keys: int | None = None
) -> torch.Tensor:
    """Causal mask that also hides padded keys ``(B, 1, T, S)``; every position sees itself.

    Works for padding on either side (left-padded prompts, right-padded batches) because it reads the
    padding from ``key_valid`` rather than assuming where it is.

    Args:
        key_valid: ``(B, >= S)`` True on real tokens, indexed like the keys.
        q_start: Absolute index of the first query (decoding with a cache: the number of cached keys).
        q_len: Number of queries ``T``; defaults to ``key_valid.shape[1] - q_start``.
        n_keys: Number of keys ``S``; defaults to ``q_start + q_len`` (all slots of a static cache
            may be passed: later slots are hidden as future ones).
    """
    if q_len is None:
        q_len = key_valid.shape[1] - q_start
    S = q_start + q_len if n_keys is None else n_keys
    causal = causal_mask(q_len, q_start, S, key_valid.device)[0]  # (1, T, S)
    mask = causal & key_valid[:, None, :S]  # (B, T, S)
    return (mask | _diagonal(q_len, q_start, S, key_valid.device))[:, None]


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of packed rows ``(B, 1, T, T)``.

    Args:
        segments: ``(B, T)`` the index of the sequence each token belongs to within its row (0, 1, ...),
            ``-1`` on filler. A token sees the earlier tokens of its own sequence only; filler sees itself.
    """
    B, T = segments.shape
    causal = causal_mask(T, device=segments.device)[0]  # (1, T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    real = (segments >= 0)[:, None, :]  # (B, 1, T)
    return ((causal & same & real) | _diagonal(T, 0, T, segments.device))[:, None]


def local_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int | None, window: int | None
) -> torch.Tensor:
    """Which keys a local attention layer allows, by position ``(B, 1, T, S)`` (Llama 4's iRoPE layers).

    Causality and padding are not part of this mask: intersect it with :func:`causal_mask` or
    :func:`padding_mask`.

    Args:
        q_pos: Query positions ``(B, T)``.
        k_pos: Key positions ``(B, S)``.
        chunk_size: Keep keys in the query's chunk, ``k_pos // chunk_size == q_pos // chunk_size``.
        window: Keep keys fewer than ``window`` positions back, ``q_pos - k_pos < window``.
    """
    ok = torch.ones(q_pos.shape[0], q_pos.shape[1], k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
    if chunk_size is not None:
        ok = ok & ((q_pos[:, :, None] // chunk_size) == (k_pos[:, None, :] // chunk_size))  # (B, T, S)
    if window is not None:
        ok = ok & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
    return ok[:, None]  # (B, 1, T, S)


def positions_from_padding(valid: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, T)`` that count real tokens only: 0, 1, 2, ... from each row's first real token.

    Padding before the first real token gets 0; padding after the last keeps the last position (its
    output is never read).
    """
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def positions_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, T)`` of packed rows: each sequence restarts at 0; filler (``-1``) gets 0.

    Args:
        segments: ``(B, T)`` sequence index of each token within its row, ``-1`` on filler (as in
            :func:`packed_mask`); the tokens of one sequence are contiguous.
    """
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    # index of the current sequence's first token: the running maximum of start indices
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return torch.where(segments >= 0, idx - first, torch.zeros_like(idx))


def last_token_index(valid: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of the last real token of every row (any padding side).

    Raises:
        ValueError: If a row has no real token (naming the rows).
    """
    keep = valid.bool()
    empty = ~keep.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"every row needs at least one real token, but rows {rows} are all padding "
            f"(mask shape {tuple(valid.shape)})"
        )
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(keep)
    return torch.where(keep, idx, torch.full_like(idx, -1)).amax(dim=1)


def _diagonal(q_len: int, q_start: int, n_keys: int, device) -> torch.Tensor:
    """``(1, T, S)`` True where the key is the query itself (absolute index ``q_start + i``)."""
    q_idx = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    return (torch.arange(n_keys, device=device)[None, :] == q_idx)[None]
