"""One tokenizer for every model: lit_llm's own (byte-level BPE or characters, trained here) or any model's
``tokenizer.json`` with its ``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json``.

Built on Hugging Face ``tokenizers``. A :class:`Tokenizer` knows its special tokens (BOS, EOS, padding), its
stop ids (the end-of-sequence token, the end-of-turn token its chat template closes a reply with, and the
``eos_token_id`` list of the model's generation config) and its chat template, a Jinja text rendered as
``transformers`` renders it (:mod:`lit_llm.tokenizer.template`). The token ids of a conversation are the ids
of the whole rendered text, as ``apply_chat_template(tokenize=True)`` gives them, and the tokens trained on
(SFT, DPO, the reward model's chosen replies) are found from the rendering, for any template: each assistant
reply and the end-of-turn token that closes it (:meth:`Tokenizer.render_chat`).

**lit_llm's own tokenizers** are one case of the same thing. Their special tokens take the first ids::

    <|pad|>=0 <|bos|>=1 <|eos|>=2 <|system|>=3 <|user|>=4 <|assistant|>=5 <|end|>=6

and their chat template (:data:`~lit_llm.tokenizer.template.LIT_LLM_TEMPLATE`) is::

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|> ...

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
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lit_llm.atomic import atomic_write
from lit_llm.tokenizer.files import (
    SPECIAL_NAMES,
    config_template,
    id_list,
    load_json,
    read_tokenizer_files,
    token_text,
)
from lit_llm.tokenizer.template import LIT_LLM_TEMPLATE, ChatTemplate, ChatTemplateError, assistant_spans

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
UNK = "<|unk|>"
# image tokens, appended after all other ids by Tokenizer.with_image_tokens (Llama 4's names)
IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"
IMAGE_TOKENS = (IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X, TILE_Y)
ROLES = ("system", "user", "assistant")
BUNDLE_KEY = "lit_llm_tokenizer"  # marks to_str()'s JSON (older checkpoints hold a bare tokenizer.json)


def own_files(tok: HFTokenizer) -> dict[str, str]:
    """The ``tokenizer_config.json`` and ``generation_config.json`` of a tokenizer trained here."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": 1 << 20,
        "add_bos_token": False,
        "chat_template": LIT_LLM_TEMPLATE,
    }
    if tok.token_to_id(UNK) is not None:
        config["unk_token"] = UNK
    generation = {
        "bos_token_id": ids["<|bos|>"],
        "eos_token_id": [ids["<|end|>"], ids["<|eos|>"]],
        "pad_token_id": ids["<|pad|>"],
    }
    return {
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
    }


class Tokenizer:
    """A ``tokenizers`` tokenizer with its special tokens, stop ids and chat template.

    Args:
        tok: The Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``).
        files: The other files it came with (``tokenizer_config.json``, ``chat_template.jinja``,
            ``generation_config.json``, ``special_tokens_map.json``) as texts. ``None``: a tokenizer of
            lit_llm's own (holding ``SPECIAL_TOKENS``), whose files are generated.
    """

    def __init__(self, tok: HFTokenizer, files: dict[str, str] | None = None) -> None:
        self.tok = tok
        if files is None:
            missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
            if missing:
                raise ValueError(
                    f"tokenizer lacks the special tokens {missing} and came without a tokenizer_config.json: "
                    "load a model's tokenizer with Tokenizer.load(folder), or train one with lit_llm.tokenizer"
                )
            files = own_files(tok)
        self.files = {k: v for k, v in files.items() if k != "tokenizer.json"}
        self.config = load_json(self.files, "tokenizer_config.json")
        self.generation = load_json(self.files, "generation_config.json")
        specials = load_json(self.files, "special_tokens_map.json")
        self.special_tokens: dict[str, str | None] = {
            name: token_text(self.config.get(name)) or token_text(specials.get(name))
            for name in SPECIAL_NAMES
        }
        for name, text in self.special_tokens.items():
            if text is not None and tok.token_to_id(text) is None:
                raise ValueError(
                    f"tokenizer_config.json names {name} {text!r}, which is not in tokenizer.json"
                )
        self.bos_id = self._id("bos_token", self.generation.get("bos_token_id"))
        self.eos_id = self._id("eos_token", next(iter(id_list(self.generation.get("eos_token_id"))), None))
        pad = self._id("pad_token", self.generation.get("pad_token_id"))
        # padding is always masked out; a model without a pad token pads with its end-of-sequence token
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        source = self.files.get("chat_template.jinja") or config_template(self.config)
        self.chat_template = ChatTemplate(source, self.special_tokens) if source else None

    def _id(self, name: str, fallback: Any) -> int | None:
        text = self.special_tokens.get(name)
        if text is not None:
            return self.tok.token_to_id(text)
        return fallback if isinstance(fallback, int) else None

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
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """A model folder's tokenizer (``tokenizer.json`` and the files beside it), or a bare ``tokenizer.json``
        (a checkpoint's: ``lit_llm.checkpoint.load_tokenizer``)."""
        path = Path(path)
        if path.suffix == ".ckpt":
            raise ValueError(
                f"{path} is a checkpoint: read its tokenizer with lit_llm.checkpoint.load_tokenizer"
            )
        if path.is_dir():
            return cls.from_files(read_tokenizer_files(path))
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        siblings = read_tokenizer_files(path.parent) if path.name == "tokenizer.json" else {}
        if len(siblings) > 1:
            return cls.from_files(siblings)
        return cls.from_str(path.read_text(encoding="utf-8"))

    @classmethod
    def from_files(cls, files: dict[str, str]) -> Tokenizer:
        """From the texts of a model's tokenizer files (``tokenizer.json`` required; see :mod:`.files`).

        A ``tokenizer.json`` alone is lit_llm's own format when it holds ``SPECIAL_TOKENS``, else a model's
        tokenizer without special-token names or chat template.
        """
        if "tokenizer.json" not in files:
            raise ValueError("a tokenizer needs its tokenizer.json")
        tok = HFTokenizer.from_str(files["tokenizer.json"])
        rest = {k: v for k, v in files.items() if k != "tokenizer.json"}
        if not rest and all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS):
            return cls(tok)
        return cls(tok, rest)

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        """From :meth:`to_str`'s text, or a bare ``tokenizer.json`` text (checkpoints written before the
        tokenizer carried its other files)."""
        value = json.loads(text)
        if isinstance(value, dict) and BUNDLE_KEY in value:
            return cls.from_files(value["files"])
        return cls.from_files({"tokenizer.json": text})

    def to_str(self) -> str:
        """Every file of the tokenizer in one JSON text (what checkpoints store)."""
        return json.dumps({BUNDLE_KEY: 2, "files": self.export_files()}, sort_keys=True)

    def export_files(self) -> dict[str, str]:
        """``{file name: text}`` to write into a Hugging Face folder: the model's own files as they were read
        (``tokenizer_config.json`` with its chat template, ...), ``tokenizer.json`` from the tokenizer."""
        return {"tokenizer.json": self.tok.to_str(), **self.files}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (a half-written file never replaces a good one); a folder gets
        every file (:meth:`export_files`)."""
        path = Path(path)
        if path.suffix == ".json":
            if self.files != own_files(self.tok):
                raise ValueError(
                    "this tokenizer has files beside tokenizer.json (a model's tokenizer): save it to a folder"
                )
            atomic_write(path, self.tok.to_str())
            return
        path.mkdir(parents=True, exist_ok=True)
        for name, text in self.export_files().items():
            atomic_write(path / name, text)

    def with_chat_template(self, source: str) -> Tokenizer:
        """A copy whose chat template is ``source`` (written as ``chat_template.jinja``, which wins over the
        one in ``tokenizer_config.json``)."""
        ChatTemplate(source, self.special_tokens)  # a syntax error is refused here
        return Tokenizer(
            HFTokenizer.from_str(self.tok.to_str()), {**self.files, "chat_template.jinja": source}
        )

    # ------------------------------------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def is_own(self) -> bool:
        """Whether this is a tokenizer of lit_llm's own format (its special tokens and chat template)."""
        return all(self.tok.token_to_id(t) is not None for t in SPECIAL_TOKENS) and (
            self.chat_template is not None and self.chat_template.source == LIT_LLM_TEMPLATE
        )

    @property
    def role_ids(self) -> dict[str, int]:
        """``{role: id}`` of lit_llm's role tokens (``<|user|>`` ...); only tokenizers of its own format."""
        ids = {r: self.tok.token_to_id(f"<|{r}|>") for r in ROLES}
        if None in ids.values():
            raise ValueError("this tokenizer has no lit_llm role tokens (a model's own tokenizer)")
        return ids  # type: ignore[return-value]

    @property
    def adds_bos(self) -> bool:
        """Whether the model's tokenizer puts BOS before plain text (``add_bos_token``, or its post-processor)."""
        if isinstance(self.config.get("add_bos_token"), bool):
            return self.config["add_bos_token"] and self.bos_id is not None
        if self.bos_id is None:
            return False
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    @cached_property
    def end_id(self) -> int:
        """The token that closes an assistant reply: the first special token the chat template writes after
        a reply (``<|end|>``, ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...), else EOS."""
        if self.chat_template is not None:
            try:
                probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
                text = self.chat_template.render(probe)
                start = assistant_spans(self.chat_template, probe, text)[0][0]
                enc = self.tok.encode(text[start:], add_special_tokens=False)
                special = {self.tok.token_to_id(t.content) for t in self._added_special()}
                found = next((i for i in enc.ids if i in special), None)
                if found is not None:
                    return found
            except ChatTemplateError:
                pass
        if self.eos_id is None:
            raise ValueError("this tokenizer has neither an end-of-turn nor an end-of-sequence token")
        return self.eos_id

    @cached_property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: the end-of-turn token, EOS and the generation config's ``eos_token_id``."""
        ids = [self.end_id, self.eos_id, *id_list(self.generation.get("eos_token_id"))]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _added_special(self) -> list[Any]:
        return [t for t in self.tok.get_added_tokens_decoder().values() if t.special]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError(f"this tokenizer has no {'BOS' if bos else 'EOS'} token")
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
        return Tokenizer(tok, self.files)

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
    def _flatten(self, messages: Sequence[dict], images: Sequence[Sequence[int]]) -> list[dict]:
        """Messages with string contents: text parts joined, each image part as the text of its placeholder
        tokens (special tokens, so they tokenize back to exactly those ids)."""
        out, n_image = [], 0
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise ValueError(
                    f"message {i}: content must be a string or a list of parts, got {type(content).__name__}"
                )
            text = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text.append(part["text"])
                elif kind == "image":
                    if n_image >= len(images):
                        raise ValueError(
                            f"message {i} has image number {n_image + 1} but only {len(images)} image "
                            "placeholders were given"
                        )
                    text.append("".join(self.tok.id_to_token(t) for t in images[n_image]))
                    n_image += 1
                else:
                    raise ValueError(
                        f"message {i}: a content part must be {{'type': 'text', 'text': str}} or "
                        f"{{'type': 'image'}}, got {part!r}"
                    )
            out.append({**m, "role": role, "content": "".join(text)})
        if n_image != len(images):
            raise ValueError(f"{len(images)} image placeholders given for {n_image} image parts")
        return out

    def require_template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
                "chat_template.jinja): pass one with --chat_template FILE (a Jinja file, e.g. the template of "
                "the model's instruct version)"
            )
        return self.chat_template

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as ``apply_chat_template(..., tokenize=False)`` renders it."""
        return self.require_template().render(self._flatten(messages, ()), add_generation_prompt)

    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        images: Sequence[Sequence[int]] = (),
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it is trained on.

        The ids are those of the whole rendered text (as ``apply_chat_template(tokenize=True)``). A token is
        trained on when it starts inside an assistant message's span (:func:`assistant_spans`) and is not
        past the first stop token of that span: each reply and the end-of-turn token closing it, not what the
        template writes after it (a newline), and never an image token.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str | list of parts}, ...]``; a
                part is ``{"type": "text", "text": str}`` or ``{"type": "image"}``.
            add_generation_prompt: End with the template's generation prompt so a model writes the reply.
            images: The placeholder ids (:meth:`image_placeholder`) of each image part, in order.

        Raises:
            ValueError: On a bad role or part, or when the image parts and ``images`` differ in number.
            ChatTemplateError: Without a chat template, or for one that cannot be split into turns or leaves
                a reply without an end-of-turn token.
        """
        template = self.require_template()
        msgs = self._flatten(messages, images)
        text = template.render(msgs, add_generation_prompt)
        enc = self.tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        mask = [False] * len(ids)
        stops = set(self.stop_ids)
        k = 0
        for start, end in assistant_spans(template, msgs, text):
            while k < len(ids) and offsets[k][0] < start:
                k += 1
            closed = False
            while k < len(ids) and offsets[k][0] < end:
                mask[k] = True
                k += 1
                if ids[k - 1] in stops:
                    closed = True
                    break
            if not closed:
                raise ChatTemplateError(
                    "the chat template closes an assistant reply with none of the stop tokens "
                    f"{[self.tok.id_to_token(i) for i in self.stop_ids]}, so a model trained on it would not "
                    "learn to stop: pass a template that ends each reply with one (--chat_template FILE)"
                )
        if images:
            image_ids = set((self.image_token_ids() or {}).values())
            mask = [m and t not in image_ids for t, m in zip(ids, mask)]
        return ids, mask

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """A single-turn chat prompt, ready for the assistant's reply (the template's default system prompt,
        if it has one, when ``system`` is not given)."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.render_chat(msgs, add_generation_prompt=True)[0]
