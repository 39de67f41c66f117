"""Pretraining text beyond one machine: token chunks written by litdata, streamed back by any number of ranks.

``litdata.optimize`` tokenizes a corpus (its files shared out among worker processes) into chunk files plus
an ``index.json`` in ``output_dir``: a local folder, or object storage (``s3://...``, ``gs://...``) that many
nodes read at once. ``litdata.StreamingDataset`` with a ``TokensLoader`` then serves windows of
``seq_len + 1`` tokens, downloading chunks as they are needed, sharding them across ranks and nodes, and its
``StreamingDataLoader`` can save and restore its position mid-epoch.

litdata is optional (``pip install litdata``): it requires ``torchvision``, and a ``torchvision`` wheel built
for another ``torch`` (e.g. the CUDA wheel from PyPI next to a CPU ``torch``) breaks ``transformers``'
imports; install the ``torchvision`` that matches your ``torch``. On one machine (or a shared file system)
:class:`lit_llm.data.text.TextDataModule` needs none of this.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning import LightningDataModule

from lit_llm.checkpoint import load_tokenizer
from lit_llm.data.stream import Corpus, CorpusStats, SpreadSample, corpus_files
from lit_llm.errors import DataError, UserError
from lit_llm.tokenizer import Tokenizer


def _litdata():
    try:
        import litdata
    except ImportError as err:
        raise UserError(
            "ChunkedTextDataModule needs litdata: pip install litdata (and the torchvision wheel that matches "
            "your torch)"
        ) from err
    return litdata


class _TokenizeFile:
    """The ``fn`` of ``litdata.optimize``: one corpus file -> one tensor of ids per document (+ ``<|eos|>``)."""

    def __init__(self, tokenizer_json: str, text_field: str) -> None:
        self.tokenizer_json, self.text_field = tokenizer_json, text_field
        self.tok = None

    def __call__(self, path: str) -> Iterator[torch.Tensor]:
        from tokenizers import Tokenizer as HFTokenizer

        if self.tok is None:  # built in the worker process, once
            self.tok = HFTokenizer.from_str(self.tokenizer_json)
        eos = self.tok.token_to_id("<|eos|>")
        ids: list[int] = []
        for text, ends in Corpus(path, self.text_field).pieces(CorpusStats()):
            ids += self.tok.encode(text, add_special_tokens=False).ids
            if ends:
                # int32 in the chunks: litdata's token chunks store torch tensors, which have no uint16
                yield torch.from_numpy(np.asarray([*ids, eos], dtype=np.int32))
                ids = []


def _collate(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.stack(items).long()
    return batch[:, :-1], batch[:, 1:]


class ChunkedTextDataModule(LightningDataModule):
    """Token chunks made by ``litdata.optimize`` and streamed by ``litdata.StreamingDataset``.

    Args:
        output_dir: Where the chunks are (or go): a local folder or an object-store URL (``s3://bucket/x``).
            Holds ``train/`` and ``val/``, each a litdata dataset with its ``index.json``.
        tokenizer: The tokenizer (``tokenizer.json``, a folder or a lit_llm ``.ckpt``). Unset: the one in a
            local ``output_dir``, else a new one trained on a sample of the training files (spread over them,
            at most ``tokenizer_sample_chars`` characters) and saved there. Object storage needs it set.
        source: The corpus to optimize when ``output_dir`` holds no chunks yet: a file, folder or glob (see
            :class:`~lit_llm.data.text.TextDataModule`). ``None``: ``output_dir`` is already optimized.
        val_files: How many of the corpus files (the last ones, in sorted order) are held out for validation.
        text_field: Field holding the text in records.
        seq_len: Tokens per training sequence (windows of ``seq_len + 1`` tokens).
        batch_size: Sequences per batch (per device).
        num_workers: DataLoader worker processes.
        optimize_workers: Worker processes of ``litdata.optimize`` (each tokenizes whole files).
        chunk_tokens: Tokens per chunk file.
        cache_dir: Where chunks streamed from object storage are cached locally (litdata's default if unset).
        seed: Seed of the chunk and window shuffle.
        tokenizer_kind: ``bpe`` or ``char``, for a new tokenizer.
        tokenizer_vocab_size: Vocabulary size of a new BPE tokenizer.
        tokenizer_sample_chars: Most characters a new tokenizer is trained on.
    """

    def __init__(
        self,
        output_dir: str,
        tokenizer: str | None = None,
        source: str | None = None,
        val_files: int = 1,
        text_field: str = "text",
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        optimize_workers: int = 1,
        chunk_tokens: int = 1 << 24,
        cache_dir: str | None = None,
        seed: int = 0,
        tokenizer_kind: Literal["bpe", "char"] = "bpe",
        tokenizer_vocab_size: int = 8192,
        tokenizer_sample_chars: int = 20_000_000,
    ) -> None:
        super().__init__()
        self.output_dir, self.tokenizer_path, self.source = output_dir, tokenizer, source
        self.val_files, self.text_field, self.seq_len = val_files, text_field, seq_len
        self.batch_size, self.num_workers, self.optimize_workers = batch_size, num_workers, optimize_workers
        self.chunk_tokens, self.cache_dir, self.seed = chunk_tokens, cache_dir, seed
        self.tokenizer_kind, self.tokenizer_vocab_size = tokenizer_kind, tokenizer_vocab_size
        self.tokenizer_sample_chars = tokenizer_sample_chars
        self._tokenizer: Tokenizer | None = None
        self.train_set = self.val_set = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The given tokenizer, the one saved in ``output_dir``, or a new one trained and saved there."""
        if self._tokenizer is None:
            saved = Path(self.output_dir) / "tokenizer.json"
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            elif "://" in self.output_dir:
                raise UserError(f"set tokenizer: a new tokenizer cannot be saved to {self.output_dir}")
            elif saved.exists():
                self._tokenizer = Tokenizer.load(saved)
            elif self.source is None:
                raise DataError(f"{self.output_dir} holds no tokenizer.json; set tokenizer or source")
            else:
                sample = SpreadSample(self.tokenizer_sample_chars)
                for path in self._files()[0]:
                    for text, _ in Corpus(path, self.text_field).pieces(CorpusStats()):
                        sample.add(text)
                texts = [k[2] for k in sample.kept]
                self._tokenizer = Tokenizer.train(texts, self.tokenizer_kind, self.tokenizer_vocab_size)
                self._tokenizer.save(saved)
        return self._tokenizer

    def _files(self) -> tuple[list[str], list[str]]:
        """(training files, validation files) of ``source``."""
        files = [str(p) for p in corpus_files(self.source)]
        if not 1 <= self.val_files < len(files):
            raise DataError(
                f"{self.source}: {len(files)} files; ChunkedTextDataModule holds out whole files for validation "
                f"(val_files={self.val_files}), so it needs more files than that"
            )
        return files[: -self.val_files], files[-self.val_files :]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (linked into the model's config by the CLI)."""
        return self.tokenizer.vocab_size

    def _split_dir(self, split: str) -> str:
        return f"{self.output_dir.rstrip('/')}/{split}"

    def _optimized(self, split: str) -> bool:
        if "://" in self.output_dir:
            return self.source is None  # a bucket is taken as optimized unless a source is given
        return (Path(self._split_dir(split)) / "index.json").exists()

    def prepare_data(self) -> None:
        """Optimize ``source`` into ``output_dir/train`` and ``output_dir/val`` unless they exist.

        litdata writes ``index.json`` only when every chunk is written, so an interrupted run leaves no
        dataset that :meth:`setup` would read; rerun to start over.
        """
        if all(self._optimized(s) for s in ("train", "val")):
            return
        if self.source is None:
            raise DataError(
                f"{self.output_dir} holds no optimized token chunks (no index.json); set source to the corpus"
            )
        train, val = self._files()
        litdata = _litdata()
        fn = _TokenizeFile(self.tokenizer.tok.to_str(), self.text_field)
        for split, inputs in (("train", train), ("val", val)):
            if self._optimized(split):
                continue
            litdata.optimize(
                fn=fn,
                inputs=inputs,
                output_dir=self._split_dir(split),
                chunk_size=self.chunk_tokens,
                item_loader=litdata.TokensLoader(),
                num_workers=min(self.optimize_workers, len(inputs)),
                mode="overwrite",
                reorder_files=False,  # chunks keep the corpus order (one worker: exactly its token stream)
                verbose=False,
            )

    def setup(self, stage: str | None = None) -> None:
        litdata = _litdata()
        for split in ("train", "val"):
            if "://" not in self.output_dir and not self._optimized(split):
                raise DataError(
                    f"{self._split_dir(split)} has no index.json: prepare_data() must finish first "
                    "(an interrupted optimize leaves none; run again)"
                )
            ds = litdata.StreamingDataset(
                self._split_dir(split),
                item_loader=litdata.TokensLoader(block_size=self.seq_len + 1),
                shuffle=split == "train",
                drop_last=split == "train",
                seed=self.seed,
                cache_dir=self.cache_dir,
            )
            setattr(self, f"{split}_set", ds)

    def _loader(self, split: str):
        litdata = _litdata()
        return litdata.StreamingDataLoader(
            getattr(self, f"{split}_set"),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate,
            drop_last=split == "train",
        )

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self.val_dataloader()

    def sample_prompts(self) -> list[str]:
        """No sample prompts: a streamed corpus is not read ahead of training."""
        return []
