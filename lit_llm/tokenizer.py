"""Tokenizers: byte-level BPE or characters, with reserved special tokens and one chat template.

Built on Hugging Face ``tokenizers`` and saved as a standard ``tokenizer.json``, so an exported model
loads in ``transformers`` too. Special tokens always take the first ids, in this order::

    <|pad|>=0 <|bos|>=1 <|eos|>=2 <|system|>=3 <|user|>=4 <|assistant|>=5 <|end|>=6

The chat template (used by SFT, the reward model and PPO alike)::

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|> ...

The loss of supervised fine-tuning falls on each reply and the ``<|end|>`` that closes it.

**Images** (Llama 4 early fusion). :meth:`Tokenizer.with_image_tokens` appends ``IMAGE_TOKENS`` after every
existing id (so a text checkpoint's ids do not move). A message's ``content`` may then be a list of parts,
``{"type": "text", "text": ...}`` or ``{"type": "image"}``; each image part becomes the placeholder run of
:meth:`Tokenizer.image_placeholder`, laid out as Hugging Face's ``Llama4Processor`` does::

    one tile:  <|image_start|><|image|><|patch|>*n<|image_end|>
    2x2 tiles: <|image_start|>P<|tile_x_separator|>P<|tile_y_separator|>P<|tile_x_separator|>P<|tile_y_separator|>
               <|image|>P<|image_end|>          (P = <|patch|>*n; the last run is the global tile)

where ``n`` is the vision config's ``tokens_per_tile``. No image token is ever trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lit_llm.atomic import atomic_write

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
UNK = "<|unk|>"
# image tokens, appended after all other ids by Tokenizer.with_image_tokens (Llama 4's names)
IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"
IMAGE_TOKENS = (IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X, TILE_Y)
ROLES = ("system", "user", "assistant")


class Tokenizer:
    """A trained tokenizer plus the ids of its special tokens.

    Args:
        tok: A Hugging Face ``tokenizers.Tokenizer`` holding every name in ``SPECIAL_TOKENS``.
    """

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with lit_llm.tokenizer")
        self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(t) for t in SPECIAL_TOKENS[:3])
        self.role_ids = {r: tok.token_to_id(f"<|{r}|>") for r in ROLES}
        self.end_id = tok.token_to_id("<|end|>")

    # ---------------------------------------------------------------------------------------------- build
    @classmethod
    def train(
        cls, texts: Iterable[str], kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 512
    ) -> Tokenizer:
        """Train on an iterable of texts.

        Args:
            texts: The corpus.
            kind: ``bpe`` (byte-level BPE, never an unknown token) or ``char`` (one token per character seen).
            vocab_size: Target vocabulary size for BPE, special tokens and the 256 bytes included.
        """
        if kind == "char":
            chars = sorted({c for t in texts for c in t})
            if not chars:
                raise ValueError("cannot train a character tokenizer on an empty corpus")
            vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, UNK, *chars))}
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
            tok.decoder = decoders.Fuse()
        elif kind == "bpe":
            min_size = len(SPECIAL_TOKENS) + 256
            if vocab_size < min_size:
                raise ValueError(
                    f"a byte-level BPE vocabulary needs at least {min_size} tokens, got {vocab_size}"
                )
            tok = HFTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(texts, trainer=trainer)
        else:
            raise ValueError(f"tokenizer kind must be 'bpe' or 'char', got {kind!r}")
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    def to_str(self) -> str:
        return self.tok.to_str()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` or a folder holding one (a checkpoint's: ``checkpoint.load_tokenizer``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        if path.suffix == ".ckpt":
            raise ValueError(
                f"{path} is a checkpoint: read its tokenizer with lit_llm.checkpoint.load_tokenizer"
            )
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (a half-written file never replaces a good one)."""
        atomic_write(path, self.to_str())

    # ------------------------------------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---------------------------------------------------------------------------------------------- images
    def with_image_tokens(self) -> Tokenizer:
        """A copy with ``IMAGE_TOKENS`` appended after all existing ids (itself when it has them already)."""
        if self.image_token_ids() is not None:
            return self
        tok = HFTokenizer.from_str(self.tok.to_str())
        tok.add_special_tokens(list(IMAGE_TOKENS))
        return Tokenizer(tok)

    def image_token_ids(self) -> dict[str, int] | None:
        """``{token: id}`` of ``IMAGE_TOKENS``, or ``None`` for a text-only tokenizer.

        Raises:
            ValueError: If only some of them are present (a tokenizer edited by hand).
        """
        ids = {t: self.tok.token_to_id(t) for t in IMAGE_TOKENS}
        present = [t for t, i in ids.items() if i is not None]
        if not present:
            return None
        if len(present) != len(IMAGE_TOKENS):
            missing = [t for t, i in ids.items() if i is None]
            raise ValueError(f"tokenizer has some image tokens but lacks {missing}; rebuild it")
        return ids  # type: ignore[return-value]

    @property
    def patch_id(self) -> int:
        """The id of ``<|patch|>``, whose embeddings the vision tower's features replace."""
        ids = self.image_token_ids()
        if ids is None:
            raise ValueError("this tokenizer has no image tokens (a text-only model): it cannot take images")
        return ids[PATCH]

    def image_placeholder(self, tiles: tuple[int, int], tokens_per_tile: int) -> list[int]:
        """The token ids standing for one image, as Llama 4's processor lays them out.

        Args:
            tiles: ``(rows, columns)`` of tiles the image was cut into (the image processor's aspect ratio).
                With more than one tile, each row of tiles comes first (tiles separated by
                ``<|tile_x_separator|>``, each row closed by ``<|tile_y_separator|>``), then the global tile.
            tokens_per_tile: ``<|patch|>`` placeholders per tile (``VisionConfig.tokens_per_tile``).
        """
        rows, cols = tiles
        if rows < 1 or cols < 1 or tokens_per_tile < 1:
            raise ValueError(f"tiles {tiles} and tokens_per_tile {tokens_per_tile} must be positive")
        ids = self.image_token_ids()
        if ids is None:
            raise ValueError(
                "this tokenizer has no image tokens: build it with Tokenizer.with_image_tokens()"
            )
        patches = [ids[PATCH]] * tokens_per_tile
        out = [ids[IMAGE_START]]
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    out += patches
                    if x < cols - 1:
                        out.append(ids[TILE_X])
                out.append(ids[TILE_Y])
        out += [ids[IMAGE], *patches, ids[IMAGE_END]]  # the global tile (the only one for a 1x1 image)
        return out

    # ------------------------------------------------------------------------------------------------ chat
    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        images: Sequence[Sequence[int]] = (),
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it is trained on (assistant text + end).

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str | list of parts}, ...]``; a
                part is ``{"type": "text", "text": str}`` or ``{"type": "image"}``.
            add_generation_prompt: End with ``<|assistant|>`` so a model continues with the reply.
            images: The placeholder ids (:meth:`image_placeholder`) of each image part, in order; never
                trained on, even in an assistant turn.

        Raises:
            ValueError: On a bad role or part, or when the image parts and ``images`` differ in number.
        """
        ids, mask = [self.bos_id], [False]
        n_image = 0
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in self.role_ids:
                raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise ValueError(
                    f"message {i}: content must be a string or a list of parts, got {type(content).__name__}"
                )
            ids.append(self.role_ids[role])
            mask.append(False)
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    body = self.encode(part["text"])
                    ids += body
                    mask += [role == "assistant"] * len(body)
                elif kind == "image":
                    if n_image >= len(images):
                        raise ValueError(
                            f"message {i} has image number {n_image + 1} but only {len(images)} image "
                            "placeholders were given"
                        )
                    ids += list(images[n_image])
                    mask += [False] * len(images[n_image])
                    n_image += 1
                else:
                    raise ValueError(
                        f"message {i}: a content part must be {{'type': 'text', 'text': str}} or "
                        f"{{'type': 'image'}}, got {part!r}"
                    )
            ids.append(self.end_id)
            mask.append(role == "assistant")
        if n_image != len(images):
            raise ValueError(f"{len(images)} image placeholders given for {n_image} image parts")
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(False)
        return ids, mask

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """A single-turn chat prompt, ready for the assistant's reply."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.render_chat(msgs, add_generation_prompt=True)[0]

    def hf_files(self) -> dict[str, str]:
        """``tokenizer_config.json`` and ``special_tokens_map.json`` texts for a Hugging Face export."""
        special = {"bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20, **special}
        return {
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2),
        }
