"""Image-text conversations for the Llama 4 vision model: images -> tiles, conversations -> tokens + labels.

Each item is a conversation with one or more images. Every image goes through the Llama 4 image processor
(:class:`~lit_llm.data.images.ImageProcessor`: resize without distortion, pad, tiles, global tile) and
becomes a run of placeholder tokens in the user turn (:meth:`~lit_llm.tokenizer.Tokenizer.image_placeholder`:
``<|image_start|>``, ``<|patch|>`` x ``tokens_per_tile`` per tile, tile separators, ``<|image|>``,
``<|image_end|>``). Labels are the next tokens of the assistant replies (and the ``<|end|>`` closing each);
the prompt and every image token are ``IGNORE_INDEX``.

A batch is ``{"input_ids", "labels"}`` ``(B, T)`` (right-padded), ``"images"`` ``(n_tiles, 3, S, S)``
(float, normalised, all tiles of all rows in row order: what ``Transformer.forward(..., images=)`` takes),
``"tiles_per_row"`` ``(B,)``, and per row the ``qtype`` and ``answer`` strings of the world's questions
(``"qtypes"``, ``"answers"``) for per-type accuracy.

Sources: ``shapes`` (the built-in image world of :mod:`lit_llm.data.images`) or a ``.jsonl`` of
``{"image": path (or a list of paths), "messages": [...]}``; image paths are relative to the file's folder.
A message's content is a string or a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"}``
parts; without image parts, the images go at the start of the first user turn. A record may carry a
``"type"`` (its question type) and the reply is its last assistant turn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lit_llm.data import images as world
from lit_llm.data.base import RecordDataModule
from lit_llm.data.common import read_records
from lit_llm.data.formats import RecordError
from lit_llm.errors import DataError
from lit_llm.losses import IGNORE_INDEX
from lit_llm.tokenizer import Tokenizer

SHAPES = "shapes"


class ImageItem(dict):
    """One conversation: ``messages`` (content strings or part lists), ``images`` (PIL images),
    ``qtype``, ``answer``, ``question``."""


def tokens_per_tile(image_size: int, patch_size: int, pixel_shuffle_ratio: float) -> int:
    """``<|patch|>`` placeholders per tile: ``(image_size // patch_size) ** 2 * pixel_shuffle_ratio ** 2``
    (``VisionConfig.tokens_per_tile``)."""
    return int(round((image_size // patch_size) ** 2 * pixel_shuffle_ratio**2))


def with_image_parts(messages: list[dict], n_images: int) -> list[dict]:
    """``messages`` with ``n_images`` image parts at the start of the first user turn, unless they hold
    image parts already (then their number must equal ``n_images``)."""
    have = sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image"
    )
    if have:
        if have != n_images:
            raise RecordError(f"the messages have {have} image parts but the record has {n_images} images")
        return messages
    out, placed = [], False
    for m in messages:
        if not placed and m.get("role") == "user":
            text = m.get("content")
            parts = [{"type": "text", "text": text}] if isinstance(text, str) else list(text or [])
            m = {**m, "content": [{"type": "image"}] * n_images + parts}
            placed = True
        out.append(m)
    if not placed:
        raise RecordError("no user turn to put the image in")
    return out


class VisionDataModule(RecordDataModule):
    """Image conversations for the SFT stage of a vision model (``SFTModule`` passes ``batch["images"]``).

    Args:
        source: ``shapes`` (the built-in image world) or a ``.jsonl`` of ``{"image": path, "messages": [...]}``.
        tokenizer: The tokenizer (linked from ``model.init_from``); image tokens are added if it lacks them.
            When unset, a byte-level BPE tokenizer is trained on the data's text (plus the image tokens).
        tokenizer_vocab_size: Vocabulary of that trained tokenizer before the image tokens.
        image_size: Tile side in pixels; must equal the model's ``vision.image_size``.
        patch_size: The model's ``vision.patch_size`` (with ``image_size`` and ``pixel_shuffle_ratio`` it
            fixes the ``<|patch|>`` placeholders per tile).
        pixel_shuffle_ratio: The model's ``vision.pixel_shuffle_ratio``.
        max_tiles: Most tiles per image (plus a global tile when more than one is used).
        seq_len: Longest conversation in tokens, image placeholders included; longer ones are dropped.
        batch_size: Conversations per batch.
        val_fraction: Held-out share of a file's records (its last ones).
        skip_bad_records: Skip (and count) malformed records and unreadable images instead of stopping.
        shapes_train: Training questions drawn from the image world (one scene each).
        shapes_val: Validation questions (held-out scenes).
        shapes_max: Most shapes on a board.
        shapes_types: Question types of the training split, drawn equally often; add ``describe`` (captions
            of the whole board) for a denser training signal. Validation asks the four question types.
        shapes_follow_ups: Up to this many more questions about the same board in a training conversation
            (uniform count, each a user turn after the answer to the last): a model that has seen them
            answers a second question in ``lit-llm chat``. Validation stays one question per board.
        seed: Seed of the image world.
        num_workers: DataLoader workers.
    """

    kind = "image conversations"

    def __init__(
        self,
        source: str = SHAPES,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 512,
        image_size: int = 48,
        patch_size: int = 8,
        pixel_shuffle_ratio: float = 0.5,
        max_tiles: int = 1,
        seq_len: int = 64,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        skip_bad_records: bool = False,
        shapes_train: int = 20000,
        shapes_val: int = 500,
        shapes_max: int = 5,
        shapes_types: tuple[str, ...] = world.QUESTION_TYPES,
        shapes_follow_ups: int = 0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            source, tokenizer, batch_size, val_fraction, skip_bad_records, None, seed, num_workers
        )
        if image_size % patch_size:
            raise DataError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.image_size, self.patch_size, self.pixel_shuffle_ratio = (
            image_size,
            patch_size,
            pixel_shuffle_ratio,
        )
        self.tokens_per_tile = tokens_per_tile(image_size, patch_size, pixel_shuffle_ratio)
        self.processor = world.ImageProcessor(image_size, max_tiles)
        self.seq_len = seq_len
        self.shapes_sizes = (shapes_train, shapes_val)
        cell = 2 * patch_size if image_size % (2 * patch_size) == 0 else patch_size
        self.shapes = world.ShapesConfig(
            seed=seed,
            grid=image_size // cell,
            cell=cell,
            max_shapes=min(shapes_max, (image_size // cell) ** 2),
        )
        self.train_shapes = dataclasses.replace(self.shapes, question_types=tuple(shapes_types))
        if shapes_follow_ups < 0:
            raise DataError(f"shapes_follow_ups must be >= 0, got {shapes_follow_ups}")
        self.shapes_follow_ups = shapes_follow_ups

    # ---------------------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = super().tokenizer.with_image_tokens()
            else:
                self._tokenizer = Tokenizer.train(
                    self.corpus(), "bpe", self.tokenizer_vocab_size
                ).with_image_tokens()
        return self._tokenizer

    def corpus(self) -> list[str]:
        """The text a new tokenizer is trained on: questions and answers of the world's training split, or
        the text of a file's messages."""
        if self.source == SHAPES:
            return [
                f"{r['question']} {r['answer']}"
                for r in world.questions(4000, "train", self.train_shapes, images=False)
            ]
        texts = []
        for rec in read_records(self.source):
            for m in rec.get("messages") or []:
                content = m.get("content") if isinstance(m, dict) else None
                parts = (
                    [content] if isinstance(content, str) else content if isinstance(content, list) else []
                )
                texts += [
                    p if isinstance(p, str) else p.get("text", "")
                    for p in parts
                    if isinstance(p, (str, dict))
                ]
        if not any(t.strip() for t in texts):
            raise DataError(f"{self.source}: no message text to train a tokenizer on")
        return texts

    # ------------------------------------------------------------------------------------------ records
    def items(self) -> tuple[list, list]:
        if self.source == SHAPES:
            return self.shapes_items("train", self.shapes_sizes[0]), self.shapes_items(
                "val", self.shapes_sizes[1]
            )
        return super().items()

    def shapes_items(self, split: str, n: int, follow_ups: int | None = None) -> list[ImageItem]:
        """``n`` questions of the image world's ``split`` as conversations (the reply is the bare answer);
        training conversations ask up to ``shapes_follow_ups`` more (``follow_ups`` overrides)."""
        train = split == "train"
        if follow_ups is None:
            follow_ups = self.shapes_follow_ups if train else 0
        records = world.questions(n, split, self.train_shapes if train else self.shapes, True, follow_ups)
        items = []
        for r in records:
            messages = [
                # the question before the image: the patch tokens can then attend to it (causal attention)
                {"role": "user", "content": [{"type": "text", "text": r["question"]}, {"type": "image"}]},
                {"role": "assistant", "content": r["answer"]},
            ]
            for f in r["follow_ups"]:
                messages += [
                    {"role": "user", "content": f["question"]},
                    {"role": "assistant", "content": f["answer"]},
                ]
            items.append(
                ImageItem(
                    messages=messages,
                    images=[r["image"]],
                    qtype=r["qtype"],
                    answer=r["answer"],
                    question=r["question"],
                )
            )
        return items

    def convert_record(self, record: dict[str, Any]) -> list:
        paths = record.get("image")
        if paths is None:
            raise RecordError("no 'image' field (a path, or a list of paths)")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise RecordError(f"'image' must be a path or a non-empty list of paths, got {record['image']!r}")
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RecordError("no 'messages' list")
        base = Path(self.source).parent
        assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not assistant or not isinstance(assistant[-1].get("content"), str):
            raise RecordError("no assistant turn with text content to learn from")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        question = users[0].get("content") if users else ""
        if isinstance(question, list):
            question = " ".join(p.get("text", "") for p in question if isinstance(p, dict))
        try:  # a missing or unreadable image is this record's error (skippable with skip_bad_records)
            loaded = [world.load_image(base / p) for p in paths]
        except DataError as err:
            raise RecordError(str(err)) from err
        return [
            ImageItem(
                messages=with_image_parts(messages, len(paths)),
                images=loaded,
                qtype=str(record.get("type", "all")),
                answer=assistant[-1]["content"],
                question=question,
            )
        ]

    def tokenize(self, items: list[ImageItem], split: str) -> list[dict]:
        """Conversations -> ``{"input_ids", "labels", "tiles" (uint8), "grids", "qtype", "answer", ...}``."""
        tok, out, dropped = self.tokenizer, [], 0
        for item in items:
            tiles, placeholders = [], []
            for im in item["images"]:
                t, grid = self.processor.tiles(im)
                tiles.append(t)
                placeholders.append(tok.image_placeholder(grid, self.tokens_per_tile))
            try:
                ids, mask = tok.render_chat(item["messages"], images=placeholders)
            except ValueError as err:
                raise DataError(f"{split} conversation {item['question']!r}: {err}") from err
            if len(ids) - 1 > self.seq_len:
                dropped += 1
                continue
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            out.append(
                {
                    "input_ids": ids[:-1],
                    "labels": labels,
                    "tiles": torch.cat(tiles),
                    "qtype": item["qtype"],
                    "answer": item["answer"],
                    "question": item["question"],
                    "prompt_len": mask.index(True) if True in mask else len(ids),
                }
            )
        self.stats[f"{split}_too_long_dropped"] = dropped
        if not out:
            raise DataError(f"no {split} conversation fits seq_len={self.seq_len}; raise seq_len")
        return out

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        return collate_images(examples, self.tokenizer.pad_id)

    def test_examples(self, n: int) -> list[dict]:
        """``n`` tokenized questions on the image world's ``test`` scenes (never seen in training or
        validation), for benchmarks."""
        if self.source != SHAPES:
            raise DataError("test_examples needs the built-in 'shapes' world")
        return self.tokenize(self.shapes_items("test", n), "test")


def collate_images(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad ids and labels to the longest row; concatenate and normalise every row's tiles in order."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {
        "input_ids": ids,
        "labels": labels,
        "images": world.normalize(torch.cat([e["tiles"] for e in examples])),
        "tiles_per_row": torch.tensor([len(e["tiles"]) for e in examples]),
        "qtypes": [e["qtype"] for e in examples],
        "answers": [e["answer"] for e in examples],
    }
