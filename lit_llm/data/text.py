"""Pretraining text: tinyworld (default), local files or a Hugging Face dataset, packed into sequences.

The corpus is tokenized once and cached as flat token files (``train.bin``/``val.bin``, memory-mapped),
next to the tokenizer that made them. Training examples are consecutive, non-overlapping windows of
``seq_len + 1`` tokens of the stream (documents joined with ``<|eos|>``): inputs and next-token targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_llm.atomic import atomic_save, atomic_write
from lit_llm.checkpoint import load_tokenizer
from lit_llm.data import tinyworld
from lit_llm.data.base import BUILTIN, is_builtin
from lit_llm.data.common import file_stamp, fingerprint, read_records, read_text_file, split_train_val
from lit_llm.errors import DataError
from lit_llm.tokenizer import Tokenizer


class PackedDataset(Dataset):
    """Non-overlapping windows of a token stream: item ``i`` is ``(x, y)`` with ``y`` shifted by one.

    Args:
        tokens: The token stream (a memory-mapped array is fine).
        seq_len: Tokens per training sequence.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class TextDataModule(LightningDataModule):
    """Tokenized, cached, packed text for next-token pretraining.

    Args:
        source: ``tinyworld`` (built in), a local ``.txt``/``.jsonl``/``.json``/``.parquet`` file (``.gz`` allowed), or
            ``hf:<dataset>[:<config>]`` (needs network the first time).
        tokenizer: An existing tokenizer (``tokenizer.json``, a folder or a lit_llm ``.ckpt``); when unset a
            new one is trained on the training text and cached.
        tokenizer_kind: ``bpe`` (byte-level BPE) or ``char`` (one token per character).
        tokenizer_vocab_size: Target vocabulary size when training a BPE tokenizer.
        seq_len: Tokens per training sequence (the model's context during training).
        batch_size: Sequences per batch (per device).
        val_fraction: Share of the text held out for validation (the end of a single text file).
        text_field: Field holding the text in ``.jsonl``/``.parquet``/Hugging Face records.
        tinyworld_docs: Number of generated tinyworld documents for training.
        seed: Seed of the tinyworld generator.
        cache_dir: Where tokenizers and token files are cached.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: str = BUILTIN,
        tokenizer: str | None = None,
        tokenizer_kind: Literal["bpe", "char"] = "bpe",
        tokenizer_vocab_size: int = 512,
        seq_len: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        text_field: str = "text",
        tinyworld_docs: int = 20000,
        seed: int = 0,
        cache_dir: str = "data_cache",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.source, self.tokenizer_path = source, tokenizer
        self.tokenizer_kind, self.tokenizer_vocab_size = tokenizer_kind, tokenizer_vocab_size
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.text_field, self.tinyworld_docs, self.seed = text_field, tinyworld_docs, seed
        self.num_workers = num_workers
        key = fingerprint(
            source,
            file_stamp(source),
            tokenizer,
            tokenizer_kind,
            tokenizer_vocab_size,
            val_fraction,
            text_field,
            tinyworld_docs,
            seed,
        )
        slug = BUILTIN if is_builtin(source) else Path(source).stem
        self.cache = Path(cache_dir) / f"{slug.replace(':', '_')}-{key}"
        self._tokenizer: Tokenizer | None = None
        self.train_set: PackedDataset | None = None
        self.val_set: PackedDataset | None = None

    # ------------------------------------------------------------------------------------------ corpus
    def _texts(self) -> tuple[list[str], list[str]]:
        """(train documents, validation documents)."""
        if is_builtin(self.source):
            world = tinyworld.WorldConfig(seed=self.seed)
            n_val = max(1, int(self.tinyworld_docs * self.val_fraction))
            return (
                tinyworld.pretrain_text(self.tinyworld_docs, "train", world),
                tinyworld.pretrain_text(n_val, "val", world),
            )
        if self.source.endswith((".txt", ".txt.gz")):
            text = read_text_file(Path(self.source))
            cut = int(len(text) * (1 - self.val_fraction))
            return [text[:cut]], [text[cut:]]
        records = read_records(self.source)
        docs = [r[self.text_field] for r in records if isinstance(r.get(self.text_field), str)]
        if not docs:
            raise DataError(f"{self.source}: no records with a string field {self.text_field!r}")
        return split_train_val(docs, self.val_fraction, self.source, "documents")

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded, or trained on the training text and cached on first use)."""
        if self._tokenizer is None:
            path = self.cache / "tokenizer.json"
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            elif path.exists():
                self._tokenizer = Tokenizer.load(path)
            else:
                train, _ = self._texts()
                self._tokenizer = Tokenizer.train(train, self.tokenizer_kind, self.tokenizer_vocab_size)
                self._tokenizer.save(path)
        return self._tokenizer

    def sample_prompts(self) -> list[str]:
        """Texts the sample callback continues: tinyworld's, or the first words of two validation documents."""
        if is_builtin(self.source):
            return list(tinyworld.SAMPLE_PROMPTS)
        _, val = self._texts()
        return [" ".join(doc.split()[:4]) for doc in val[:2] if doc.strip()]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (linked into the model's config by the CLI)."""
        return self.tokenizer.vocab_size

    def prepare_data(self) -> None:
        """Train the tokenizer if missing and tokenize the corpus once into ``train.bin``/``val.bin``."""
        meta_path = self.cache / "meta.json"
        if meta_path.exists():
            return
        tok = self.tokenizer
        self.cache.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max else np.uint32
        meta = {"source": self.source, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size}
        for split, docs in zip(("train", "val"), self._texts()):
            ids: list[int] = []
            for enc in tok.encode_batch(docs):
                ids.extend(enc)
                ids.append(tok.eos_id)
            if len(ids) <= self.seq_len:
                raise DataError(
                    f"the {split} split of {self.source} has {len(ids)} tokens, fewer than one sequence of "
                    f"seq_len + 1 = {self.seq_len + 1}; use more data or a shorter seq_len"
                )
            arr = np.asarray(ids, dtype=dtype)
            atomic_save(arr, self.cache / f"{split}.bin", lambda a, f: f.write(a.tobytes()))
            meta[f"{split}_tokens"] = len(arr)
        atomic_write(meta_path, json.dumps(meta, indent=2))

    def setup(self, stage: str | None = None) -> None:
        meta = json.loads((self.cache / "meta.json").read_text())
        for split in ("train", "val"):
            tokens = np.memmap(self.cache / f"{split}.bin", dtype=meta["dtype"], mode="r")
            ds = PackedDataset(tokens, self.seq_len)
            if len(ds) == 0:
                raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1")
            setattr(self, f"{split}_set", ds)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
