"""What the helper commands share: decoding options and printing tokens as they arrive."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from lit_llm.backbone.generate import check_sampling
from lit_llm.errors import UserError
from lit_llm.tokenizer import Tokenizer

COMPILE = {"off": False, "on": True, "frozen": "frozen"}


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    """Length, temperature, top-k / top-p, seed, weight precision and compilation of decoding
    (``max_new_tokens=None``: the command picks the default from the model, see ``lit-llm chat``)."""
    p.add_argument(
        "--max_new_tokens",
        type=positive_int,
        default=max_new_tokens,
        help="longest reply in tokens"
        + (
            " (default: 128, or half the model's context when that is shorter)"
            if max_new_tokens is None
            else ""
        ),
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy; otherwise the sampling temperature"
    )
    p.add_argument(
        "--top_k", type=int, default=None, help="sample among the k most likely tokens (0 or unset: off)"
    )
    p.add_argument(
        "--top_p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (1 or unset: off)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of sampling")
    p.add_argument(
        "--base",
        default=None,
        help="for a LoRA adapter checkpoint: its base checkpoint, when it is no longer where the adapter "
        "checkpoint says (its weights must still be the same; checked by hash)",
    )
    p.add_argument(
        "--precision",
        choices=["32", "bf16", "int8", "int4"],
        default="32",
        help="weights while decoding: float32 (exact), bfloat16, or int8 / int4 weight-only with bfloat16 "
        "activations (int4: llama.cpp's Q4_1 layout, fastest on CPU, least exact; greedy tokens can differ "
        "where two logits nearly tie)",
    )
    p.add_argument(
        "--compile",
        choices=list(COMPILE),
        default="off",
        help="torch.compile the decode step: the first call compiles (tens of seconds), so it pays off for "
        "long outputs; 'frozen' also bakes the weights into the compiled code (a CPU option)",
    )


def add_template_arg(p: argparse.ArgumentParser) -> None:
    """``--chat_template FILE``: a Jinja chat template in place of the model's own (or for a model without one)."""
    p.add_argument(
        "--chat_template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file used instead of the model's own (for a base model without one, or "
        "to try another); rendered as transformers' apply_chat_template renders it",
    )


def add_image_args(p: argparse.ArgumentParser) -> None:
    """``--image`` (and its tiling) for a model with a vision tower."""
    p.add_argument(
        "--image",
        default=None,
        help="an image file (PNG, JPEG, ...) the model sees after the prompt text; needs a vision checkpoint",
    )
    p.add_argument(
        "--max_tiles",
        type=positive_int,
        default=1,
        help="most tiles the image is cut into (plus a global tile)",
    )


def load_image_input(
    path: str, model: Any, tok: Tokenizer, max_tiles: int, ckpt: str
) -> tuple[Any, list[int]]:
    """The normalised tiles of the image at ``path`` and their placeholder ids, for ``model``.

    Raises:
        UserError: For a text-only checkpoint, a tokenizer without image tokens, or an unreadable image.
    """
    from lit_llm.data.images import ImageProcessor, load_image

    vision = model.config.vision
    if vision is None:
        raise UserError(f"{ckpt} is a text-only model (no vision tower): it cannot take --image")
    if tok.image_token_ids() is None:
        raise UserError(f"{ckpt}: its tokenizer has no image tokens, so it cannot take --image")
    tiles, grid = ImageProcessor(vision.image_size, max_tiles)(load_image(path))
    tiles = tiles.to(model.embed_tokens.weight.dtype)  # bfloat16 with --precision bf16 / int8
    return tiles, tok.image_placeholder(grid, vision.tokens_per_tile)


def check_sampling_args(a: argparse.Namespace) -> None:
    """Refuse meaningless sampling values before loading anything (one ``error:`` line, not a traceback)."""
    try:
        check_sampling(a.temperature, a.top_k, a.top_p)
    except ValueError as err:
        raise UserError(str(err)) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def stream_text(tok: Tokenizer, token_iter: Iterable[int], out: TextIO | None = None) -> list[int]:
    """Print tokens as they arrive (decoding the whole reply each time keeps multi-byte characters whole)."""
    out = out or sys.stdout
    ids: list[int] = []
    printed = ""
    for t in token_iter:
        ids.append(t)
        text = tok.decode(ids)
        out.write(text[len(printed) :])
        out.flush()
        printed = text
    return ids
