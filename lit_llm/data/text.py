"""Pretraining text: tinyworld (default), local files or a Hugging Face dataset, packed into sequences.

The corpus is tokenized once and cached as flat token files (``train.bin``/``val.bin``, memory-mapped),
next to the tokenizer that made them. Training examples are consecutive, non-overlapping windows of
``seq_len + 1`` tokens of the stream (documents joined with ``<|eos|>``): inputs and next-token targets.

Files and ``hf:`` datasets are streamed (:mod:`lit_llm.data.stream`): memory stays flat whatever the corpus
size, the tokenizer is trained on a bounded sample spread over the corpus, and ``meta.json`` is written only
after both token files are complete, so an interrupted prepare is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lit_llm.atomic import atomic_write
from lit_llm.checkpoint import load_tokenizer
from lit_llm.data import stream, tinyworld
from lit_llm.data.base import BUILTIN, is_builtin
from lit_llm.data.common import file_stamp, fingerprint
from lit_llm.data.stream import (
    Corpus,
    CorpusStats,
    DecodeErrors,
    PrepareProgress,
    Progress,
    Shards,
    Split,
    SpreadSample,
    TokenFile,
    corpus_stamp,
    remove_stale_temp_files,
    sharded,
    token_dtype,
    tokenize_to_files,
)
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
        source: ``tinyworld`` (built in); a local ``.txt``/``.jsonl``/``.json``/``.parquet`` file (``.gz``, ``.bz2``,
            ``.xz`` allowed), a folder of them (recursive) or a glob (``'corpus/*.jsonl.gz'``); or
            ``hf:<dataset>[:<config>]`` (streamed; needs network).
        tokenizer: An existing tokenizer (``tokenizer.json``, a folder or a lit_llm ``.ckpt``); when unset a
            new one is trained on the training text and cached.
        tokenizer_kind: ``bpe`` (byte-level BPE) or ``char`` (one token per character).
        tokenizer_vocab_size: Target vocabulary size when training a BPE tokenizer.
        seq_len: Tokens per training sequence (the model's context during training).
        batch_size: Sequences per batch (per device).
        val_fraction: Share held out for validation: the last documents (records, files), or the end of the
            text of a one-document corpus (a single text file).
        val_docs: Hold out exactly this many documents (the last ones) instead of ``val_fraction``: the
            way to keep validation small and fixed on a large corpus.
        text_field: Field holding the text in ``.jsonl``/``.parquet``/Hugging Face records (records without
            it are skipped and counted; none having it is an error).
        tinyworld_docs: Number of generated tinyworld documents for training.
        seed: Seed of the tinyworld generator.
        cache_dir: Where tokenizers and token files are cached.
        num_workers: DataLoader worker processes.
        tokenizer_sample_chars: A new tokenizer is trained on at most this many characters of training
            text, sampled evenly across the corpus (all of it when the corpus is smaller).
        num_proc: Worker processes that tokenize the corpus; ``0`` tokenizes in this process, where the
            ``tokenizers`` library spreads each batch over all cores (on 2 cores that measured 1.3x faster
            than 2 worker processes, ``benchmarks/BENCHMARKS.md``).
        on_decode_error: A byte that is not UTF-8: ``fail`` (the error names the file and byte offset) or
            ``replace`` (U+FFFD instead, counted in the log and ``meta.json``).
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
        val_docs: int | None = None,
        tokenizer_sample_chars: int = 20_000_000,
        num_proc: int = 0,
        on_decode_error: DecodeErrors = "fail",
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.source, self.tokenizer_path = source, tokenizer
        self.tokenizer_kind, self.tokenizer_vocab_size = tokenizer_kind, tokenizer_vocab_size
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.text_field, self.tinyworld_docs, self.seed = text_field, tinyworld_docs, seed
        self.num_workers = num_workers
        if val_docs is not None and val_docs < 1:
            raise DataError(f"val_docs must be at least 1 (or unset to use val_fraction), got {val_docs}")
        if on_decode_error not in ("fail", "replace"):
            raise DataError(f"on_decode_error must be 'fail' or 'replace', got {on_decode_error!r}")
        self.val_docs, self.tokenizer_sample_chars = val_docs, tokenizer_sample_chars
        self.num_proc, self.on_decode_error = num_proc, on_decode_error
        # options added with streaming enter the key only when set, so caches made before stay valid
        extra = {
            k: v
            for k, v, default in (
                ("val_docs", val_docs, None),
                ("tokenizer_sample_chars", tokenizer_sample_chars, 20_000_000),
                ("on_decode_error", on_decode_error, "fail"),
            )
            if v != default
        }
        self._stamp = (
            file_stamp(source) if Path(source).is_file() or is_builtin(source) else corpus_stamp(source)
        )
        key = fingerprint(
            source,
            self._stamp,
            tokenizer,
            tokenizer_kind,
            tokenizer_vocab_size,
            val_fraction,
            text_field,
            tinyworld_docs,
            seed,
            *([extra] if extra else []),
        )
        slug = BUILTIN if is_builtin(source) else Path(source).stem
        # a glob's or hf: name's special characters make no folder name (other names are kept as they were)
        slug = re.sub(r"[*?:\[\]]+", "_", slug)
        self.cache = Path(cache_dir) / f"{slug}-{key}"
        self._tokenizer: Tokenizer | None = None
        self.train_set: PackedDataset | None = None
        self.val_set: PackedDataset | None = None
        self._scanned: tuple[CorpusStats, Split, list[str], int] | None = None

    # ------------------------------------------------------------------------------------------ corpus
    def _tinyworld(self) -> tuple[list[str], list[str]]:
        """(train documents, validation documents) of the built-in world (generated in memory: it is small)."""
        world = tinyworld.WorldConfig(seed=self.seed)
        n_val = max(1, int(self.tinyworld_docs * self.val_fraction))
        return (
            tinyworld.pretrain_text(self.tinyworld_docs, "train", world),
            tinyworld.pretrain_text(n_val, "val", world),
        )

    def _corpus(self) -> Corpus:
        return Corpus(self.source, self.text_field, self.on_decode_error)

    def _scan(self) -> tuple[CorpusStats, Split, list[str], int]:
        """The first pass over a file/``hf:`` corpus (no tokenizing): its counts, its train/validation split,
        a bounded sample of its training text for the tokenizer, spread over the whole corpus, and its number
        of shards."""
        if self._scanned is None:
            stats, sample = CorpusStats(), SpreadSample(self.tokenizer_sample_chars)
            shards = Shards(stream.SHARD_CHARS)
            for text, ends in self._corpus().pieces(stats):  # stats already count this piece
                sample.add(text, (stats.documents - ends, stats.chars - len(text)))
                shards.add(len(text))
            split = Split.of(stats, self.source, self.val_fraction, self.val_docs)
            train: list[str] = []
            for _, (doc, start), text in sample.kept:  # the tokenizer sees training text only
                if split.char_cut is not None:
                    if start < split.char_cut:
                        train.append(text[: split.char_cut - start])
                elif doc < split.n_docs - split.val_docs:
                    train.append(text)
            rank_zero_info(f"{self.source}: {stats.summary()}")
            self._scanned = stats, split, train, shards.count
        return self._scanned

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
                sample = self._tinyworld()[0] if is_builtin(self.source) else self._scan()[2]
                self._tokenizer = Tokenizer.train(sample, self.tokenizer_kind, self.tokenizer_vocab_size)
                self._tokenizer.save(path)
        return self._tokenizer

    def sample_prompts(self) -> list[str]:
        """Texts the sample callback continues: tinyworld's, or the first words of two validation documents
        (read back from the prepared validation tokens)."""
        if is_builtin(self.source):
            return list(tinyworld.SAMPLE_PROMPTS)
        if self.val_set is None:
            return []
        tokens, tok = self.val_set.tokens, self.tokenizer
        prompts, start = [], 0
        while len(prompts) < 2 and start < len(tokens):
            head = np.asarray(tokens[start : start + 4096])
            ends = np.flatnonzero(head == tok.eos_id)
            words = tok.decode(head[: ends[0] if len(ends) else len(head)].tolist()).split()[:4]
            if words:
                prompts.append(" ".join(words))
            if not len(ends):
                break
            start += int(ends[0]) + 1
        return prompts

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (linked into the model's config by the CLI)."""
        return self.tokenizer.vocab_size

    def prepare_data(self) -> None:
        """Train the tokenizer if missing and tokenize the corpus once into ``train.bin``/``val.bin``.

        Both files are written to temporary files and renamed into place when complete; ``meta.json`` is
        written last and marks the cache as finished. Lightning calls this on one process per node.

        The corpus is tokenized shard by shard (about ``stream.SHARD_CHARS`` characters each); a prepare
        killed part-way (SIGTERM, SIGKILL, Ctrl-C) is resumed by the next one on the same machine from its last
        finished shard ("resuming from shard k/n"), with the same files as an uninterrupted run. An error
        (bad bytes, a full disk, too little data) removes the partial files instead.
        """
        meta_path = self.cache / "meta.json"
        if meta_path.exists():
            return
        tok = self.tokenizer
        self.cache.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "source": self.source,
            "dtype": token_dtype(tok.vocab_size),
            "vocab_size": tok.vocab_size,
        }
        shard_chars = stream.SHARD_CHARS
        if is_builtin(self.source):
            train, val = self._tinyworld()
            n_train = len(train)

            def pieces():
                return ((d, True) for d in (*train, *val))

            def label(ps):
                return ((d, e, "train" if i < n_train else "val") for i, (d, e) in enumerate(ps))

            shards = Shards(shard_chars)
            for d in (*train, *val):
                shards.add(len(d))
            n_docs, num_proc, n_shards, split_rule = len(train) + len(val), 0, shards.count, [n_train]
        else:
            stats, split, _, n_shards = self._scan()

            def pieces():
                return self._corpus().pieces(CorpusStats())

            label = split.label
            n_docs, num_proc, split_rule = stats.documents, self.num_proc, split.__dict__
        # what the files depend on: an interrupted prepare of another corpus or tokenizer is not resumed
        identity = {
            "stamp": self._stamp,
            "tokenizer": hashlib.sha256(tok.to_str().encode()).hexdigest(),
            "dtype": meta["dtype"],
            "piece_chars": stream.PIECE_CHARS,
            "shard_chars": shard_chars,
            "shards": n_shards,
            "split": split_rule,
        }
        state = PrepareProgress(self.cache, identity, rank_zero_info)
        resume = state.adopt({s: self.cache / f"{s}.bin" for s in ("train", "val")})
        remove_stale_temp_files(self.cache)  # what is left of other interrupted prepares
        labelled = sharded(pieces(), label, shard_chars, skip=state.done)
        files: dict[str, TokenFile] = {}
        progress = Progress(n_docs)
        progress.docs = state.documents
        progress.bar.update(state.documents)
        try:
            for s in ("train", "val"):
                path = self.cache / f"{s}.bin"
                files[s] = TokenFile(path, resume[s]) if s in resume else TokenFile(path)

            def shard_done(done: int) -> None:
                state.commit(done, progress.docs, files)

            tokenize_to_files(
                labelled, tok.tok, tok.eos_id, files, num_proc, progress=progress, shard_done=shard_done
            )
            for split_name, f in files.items():
                if f.tokens <= self.seq_len:
                    raise DataError(
                        f"the {split_name} split of {self.source} has {f.tokens} tokens, fewer than one "
                        f"sequence of seq_len + 1 = {self.seq_len + 1}; use more data or a shorter seq_len"
                    )
            for f in files.values():
                f.publish()
        except Exception:  # an error: the partial files are of no use (another run starts over)
            for f in files.values():
                f.discard()
            state.remove()
            raise
        except BaseException:  # interrupted (Ctrl-C): the files stay for the next run to resume from
            for f in files.values():
                with contextlib.suppress(OSError):
                    f.f.close()
            raise
        finally:
            progress.close()
        for split_name, f in files.items():
            meta[f"{split_name}_tokens"] = f.tokens
        if not is_builtin(self.source):
            meta.update(documents=n_docs, stats=self._scan()[0].__dict__)
        atomic_write(meta_path, json.dumps(meta, indent=2))
        state.remove()

    def setup(self, stage: str | None = None) -> None:
        meta_path = self.cache / "meta.json"
        if not meta_path.exists():
            raise DataError(
                f"the token cache {self.cache} is not prepared (no meta.json): prepare_data() must finish "
                "first. Lightning runs it on local rank 0 of each node before setup; a prepare that was "
                "interrupted left no cache, so run again (it resumes from its last finished shard)"
            )
        meta = json.loads(meta_path.read_text())
        for split in ("train", "val"):
            path = self.cache / f"{split}.bin"
            size = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
            if not path.exists() or path.stat().st_size != size:
                raise DataError(
                    f"the token cache {self.cache} is incomplete ({path.name} should hold {size:,} bytes); "
                    "delete the folder and prepare again"
                )
            tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
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
