"""Streaming, bounded-memory tokenization of a pretraining corpus into flat token files.

A corpus is one file, a folder (searched recursively) or a glob of ``.txt`` / ``.jsonl`` / ``.json`` /
``.parquet`` files, each optionally compressed (``.gz``, ``.bz2``, ``.xz``), or ``hf:<dataset>[:<config>]``
(read with ``streaming=True``). It is read as a stream of *pieces*: a record's text is one piece; a text
file is cut into pieces of about ``piece_chars`` characters, each cut placed just before a newline that is
followed by a non-space character. The byte-level BPE pre-tokenizer (GPT-2's split rule) and the character
tokenizer never join text across such a point, so the pieces tokenize exactly as the whole file would.
A document is a record or a whole text file; ``<|eos|>`` follows each document. (A tokenizer with another
pre-tokenizer, passed in by the user, may differ from whole-file tokenization at a cut.)

:meth:`lit_llm.data.text.TextDataModule.prepare_data` makes two passes. The first reads the corpus without
tokenizing it: it counts the documents and characters (for the validation split) and the shards, and keeps a
sample for tokenizer training, spread evenly over the corpus and bounded in size (:class:`SpreadSample`). The
second tokenizes batches of pieces, in this process (the ``tokenizers`` library spreads a batch over the cores)
or in worker processes (at most a few batches in flight), so memory stays flat whatever the corpus size, and
appends the ids to ``train.bin`` / ``val.bin``, written to temporary files and renamed into place only when
complete.

The second pass goes shard by shard (:class:`Shards`: consecutive pieces of about ``SHARD_CHARS``
characters). After each shard the temporary files are synced and a small progress file records how many
shards are finished and how long each file was then (:class:`PrepareProgress`). A prepare that was killed
(SIGTERM, SIGKILL, Ctrl-C) is resumed by the next one on the same machine: it takes over the temporary files,
cuts them back to the last finished shard and tokenizes only the shards after it, so the published files are
byte-identical to those of an uninterrupted run. Another corpus (its stamp), tokenizer, piece or shard size
starts over.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import errno
import glob
import gzip
import itertools
import json
import lzma
import multiprocessing
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lit_llm.errors import DataError

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
DecodeErrors = Literal["fail", "replace"]
# a text line is read at most this many bytes at a time (a file without newlines still streams)
LINE_BYTES = 1 << 20
# about how many characters of a text file make one piece (one unit of tokenizer work)
PIECE_CHARS = 1 << 18
# about how many characters make one shard of a prepare (the unit an interrupted prepare resumes from)
SHARD_CHARS = 1 << 26


# ------------------------------------------------------------------------------------------------ files
def _kind(path: Path) -> str:
    """``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` of a path, compression suffix ignored ('' if none)."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSED]
    return suffixes[-1].lower() if suffixes else ""


def corpus_files(source: str) -> list[Path]:
    """The files of a local corpus: the file itself, the supported files under a folder, or a glob's matches.

    Raises:
        FileNotFoundError: When nothing matches.
        DataError: For a single file of an unsupported type.
    """
    path = Path(source)
    if path.is_file():
        if _kind(path) not in (*TEXT_SUFFIXES, *RECORD_SUFFIXES):
            raise DataError(
                f"unsupported data file type {path.name!r}: use .txt, .jsonl, .json or .parquet "
                "(optionally .gz, .bz2 or .xz)"
            )
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
    elif any(c in source for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    else:
        raise FileNotFoundError(f"data file not found: {path}")
    files = [p for p in found if _kind(p) in (*TEXT_SUFFIXES, *RECORD_SUFFIXES)]
    if not files:
        raise FileNotFoundError(
            f"no .txt, .jsonl, .json or .parquet files (compressed or not) found in {source!r}"
        )
    return files


def corpus_stamp(source: str) -> Any:
    """Names, sizes and modification times of a local corpus's files (an edit invalidates its cache)."""
    try:
        files = corpus_files(source)
    except (FileNotFoundError, DataError):
        return source
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _open_binary(path: Path) -> IO[bytes]:
    opener = COMPRESSED.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")  # noqa: SIM115 - closed by the caller


# ---------------------------------------------------------------------------------------------- decoding
@dataclass
class CorpusStats:
    """What one pass over a corpus saw (reported in the log and in the cache's ``meta.json``)."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    empty_files: list[str] = field(default_factory=list)
    records_without_text: int = 0
    replaced_bytes: int = 0

    def summary(self) -> str:
        parts = [f"{self.documents:,} documents", f"{self.chars:,} characters"]
        if self.files:
            parts.insert(0, f"{self.files:,} files")
        if self.empty_files:
            parts.append(f"{len(self.empty_files)} empty files skipped (e.g. {self.empty_files[0]})")
        if self.records_without_text:
            parts.append(f"{self.records_without_text:,} records without text skipped")
        if self.replaced_bytes:
            parts.append(f"{self.replaced_bytes:,} undecodable bytes replaced by U+FFFD")
        return ", ".join(parts)


def _decoded_lines(f: IO[bytes], path: Path, errors: DecodeErrors, stats: CorpusStats) -> Iterator[str]:
    """The UTF-8 lines of a binary file (a line over ``LINE_BYTES`` comes in parts).

    With ``errors="fail"`` an undecodable byte raises a :class:`DataError` naming its byte offset (in the
    decompressed stream for a compressed file); with ``"replace"`` it becomes U+FFFD and is counted.
    """

    def count(err: UnicodeDecodeError) -> tuple[str, int]:
        stats.replaced_bytes += err.end - err.start
        return "\ufffd", err.end

    handler = f"lit_llm.count.{id(stats)}"
    codecs.register_error(handler, count)
    decoder = codecs.getincrementaldecoder("utf-8")("strict" if errors == "fail" else handler)
    offset, n = 0, 0
    while True:
        raw = f.readline(LINE_BYTES)
        pending = len(decoder.getstate()[0])  # bytes of a character left incomplete by the last read
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path} is not UTF-8 text: undecodable byte at offset {offset - pending + err.start:,}"
                f"{' of the decompressed stream' if path.suffix in COMPRESSED else ''} (line {n + 1}); "
                "convert the file (e.g. with iconv) or set on_decode_error: replace to replace such bytes "
                "by U+FFFD (they are counted)"
            ) from err
        if not raw:
            if text:
                yield text
            return
        offset += len(raw)
        n += raw.endswith(b"\n")
        if text:
            yield text


def _text_pieces(
    path: Path, errors: DecodeErrors, stats: CorpusStats, piece_chars: int
) -> Iterator[tuple[str, bool]]:
    """One text file as pieces ``(text, is_last)``; cut before a ``\\n`` followed by a non-space character.

    A file without such a point is cut anyway once it holds ``16 * piece_chars`` characters (the tokens
    at that one cut may then differ from tokenizing the file whole). A whitespace-only file yields nothing.
    """
    buf: list[str] = []
    size, has_text = 0, False
    with _open_binary(path) as f:
        for line in _decoded_lines(f, path, errors, stats):
            if has_text and size >= piece_chars and buf[-1].endswith("\n") and not line[0].isspace():
                last = buf[-1]
                yield "".join(buf[:-1]) + last[:-1], False
                buf, size = ["\n"], 1
            elif has_text and size >= 16 * piece_chars:
                yield "".join(buf), False
                buf, size = [], 0
            buf.append(line)
            size += len(line)
            has_text = has_text or not line.isspace()
    if has_text:
        yield "".join(buf), True
    else:
        stats.empty_files.append(str(path))


def _record_texts(
    path: Path, text_field: str, errors: DecodeErrors, stats: CorpusStats
) -> Iterator[dict[str, Any] | None]:
    kind = _kind(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            stats.records_without_text += pf.metadata.num_rows
            return
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield {text_field: value}
        return
    with _open_binary(path) as f:
        if kind == ".json":  # a JSON list is parsed whole (use .jsonl for large corpora)
            raw = f.read()
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start:,})") from err
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            yield from data
            return
        n = 0
        for line in _decoded_lines(f, path, errors, stats):
            n += 1
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {n}: not valid JSON ({err.msg})") from err


def _hf_records(source: str) -> Iterator[dict[str, Any]]:
    import datasets

    name, _, config = source[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - offline machines fail here; say what to do instead
        raise DataError(
            f"could not load the Hugging Face dataset {name!r} ({err}); offline, pass local files instead"
        ) from err
    yield from ds


@dataclass
class Corpus:
    """A corpus read as a stream of pieces ``(text, ends_document)``.

    Args:
        source: A file, a folder, a glob, or ``hf:<dataset>[:<config>]``.
        text_field: The field holding the text in records.
        on_decode_error: ``fail`` (stop at the first undecodable byte, naming its offset) or ``replace``
            (replace it by U+FFFD and count it).
        piece_chars: About how many characters of a text file make one piece (default ``PIECE_CHARS``).
    """

    source: str
    text_field: str = "text"
    on_decode_error: DecodeErrors = "fail"
    piece_chars: int | None = None  # default: PIECE_CHARS

    def pieces(self, stats: CorpusStats) -> Iterator[tuple[str, bool]]:
        """Every piece of the corpus in order, counting what was read into ``stats``."""
        if self.source.startswith("hf:"):
            yield from self._records(_hf_records(self.source), stats)
            return
        for path in corpus_files(self.source):
            stats.files += 1
            if _kind(path) in TEXT_SUFFIXES:
                piece_chars = self.piece_chars or PIECE_CHARS
                for text, last in _text_pieces(path, self.on_decode_error, stats, piece_chars):
                    stats.chars += len(text)
                    stats.documents += last
                    yield text, last
            else:
                before = stats.documents
                records = _record_texts(path, self.text_field, self.on_decode_error, stats)
                yield from self._records(records, stats)
                if stats.documents == before:
                    stats.empty_files.append(str(path))

    def _records(self, records: Iterator[Any], stats: CorpusStats) -> Iterator[tuple[str, bool]]:
        for r in records:
            text = r.get(self.text_field) if isinstance(r, dict) else None
            if not isinstance(text, str):
                stats.records_without_text += 1
                continue
            stats.documents += 1
            stats.chars += len(text)
            yield text, True


# ----------------------------------------------------------------------------------------------- sample
class SpreadSample:
    """A sample of pieces spread evenly over a stream of unknown length, at most ``max_chars`` characters.

    Piece ``i`` is kept when ``i % stride == 0``; whenever the kept text outgrows the budget the stride
    doubles and every other kept piece is dropped. The result is deterministic, covers the whole stream
    (not only its start) and, for a stream within the budget, is the whole stream.
    """

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise DataError(f"tokenizer_sample_chars must be at least 1, got {max_chars}")
        self.max_chars, self.stride, self.n, self.chars = max_chars, 1, 0, 0
        self.kept: list[tuple[int, Any, str]] = []  # (piece index, caller's tag, text)

    def add(self, text: str, tag: Any = None) -> None:
        if self.n % self.stride == 0:
            self.kept.append((self.n, tag, text))
            self.chars += len(text)
            while self.chars > self.max_chars and len(self.kept) > 1:
                self.stride *= 2
                self.kept = [k for k in self.kept if k[0] % self.stride == 0]
                self.chars = sum(len(k[2]) for k in self.kept)
        self.n += 1


# ------------------------------------------------------------------------------------------------ split
@dataclass
class Split:
    """Which pieces are validation: the last ``val_docs`` documents, or (a one-document corpus) the text
    after character ``char_cut``. Train keeps the rest; an ``<|eos|>`` ends each side of the cut."""

    n_docs: int
    val_docs: int = 0
    char_cut: int | None = None

    @classmethod
    def of(cls, stats: CorpusStats, source: str, val_fraction: float, val_docs: int | None) -> Split:
        """The split rule of :class:`~lit_llm.data.text.TextDataModule` for a corpus of these counts."""
        n = stats.documents
        if n == 0:
            raise DataError(
                f"{source} is empty: no documents with text ({stats.summary()}); "
                + (
                    "no record has a string field; set text_field to the field holding the text"
                    if stats.records_without_text
                    else "point source at files with text"
                )
            )
        if n == 1 and val_docs is None:
            return cls(n_docs=1, char_cut=int(stats.chars * (1 - val_fraction)))
        n_val = val_docs if val_docs is not None else max(1, int(n * val_fraction))
        if n < 2 or not 1 <= n_val < n:
            raise DataError(
                f"{source}: {n} usable documents, cannot hold out {n_val} for validation and keep training "
                "data; use more documents or a smaller val_docs"
            )
        return cls(n_docs=n, val_docs=n_val)

    def label(self, pieces: Iterator[tuple[str, bool]]) -> Iterator[tuple[str, bool, str]]:
        """``(text, ends_document, "train" | "val")`` for each piece (a piece across the cut is split)."""
        doc, chars = 0, 0
        for text, ends in pieces:
            if self.char_cut is None:
                yield text, ends, "val" if doc >= self.n_docs - self.val_docs else "train"
                doc += ends
                continue
            start, chars = chars, chars + len(text)
            if start >= self.char_cut:
                yield text, ends, "val"
            elif chars < self.char_cut:
                yield text, ends, "train"
            else:  # the cut falls in this piece (or at its end): train ends there, validation starts
                yield text[: self.char_cut - start], True, "train"
                if chars > self.char_cut or ends:
                    yield text[self.char_cut - start :], ends, "val"


# ----------------------------------------------------------------------------------------------- shards
class Shards:
    """Consecutive pieces in shards of about ``shard_chars`` characters: a shard ends after the piece that
    brings it to ``shard_chars`` or more (every shard holds at least one piece).

    The rule sees piece lengths only, so the first pass counts the shards (:attr:`count`) that the second
    pass, reading the same pieces, numbers with :meth:`add`.
    """

    def __init__(self, shard_chars: int) -> None:
        if shard_chars < 1:
            raise DataError(f"shard_chars must be at least 1, got {shard_chars}")
        self.shard_chars, self.index, self.chars, self.pieces = shard_chars, 0, 0, 0

    def add(self, n_chars: int) -> int:
        """The shard of the next piece, of ``n_chars`` characters."""
        index = self.index
        self.chars += n_chars
        self.pieces += 1
        if self.chars >= self.shard_chars:
            self.index, self.chars, self.pieces = self.index + 1, 0, 0
        return index

    @property
    def count(self) -> int:
        """Shards begun so far (all of them, after the last piece)."""
        return self.index + (self.pieces > 0)


def sharded(
    pieces: Iterator[tuple[str, bool]],
    label: Callable[[Iterator[tuple[str, bool]]], Iterator[tuple[str, bool, str]]],
    shard_chars: int,
    skip: int = 0,
) -> Iterator[tuple[str, bool, str, int]]:
    """``(text, ends_document, split, shard)`` of each labelled piece (:meth:`Split.label`), leaving out
    those of the first ``skip`` shards (finished by an interrupted prepare).

    Every piece is still read and labelled, so the split (which counts documents and characters from the
    start) is the same as in an uninterrupted run; only tokenizing is skipped.
    """
    shards, current = Shards(shard_chars), [0]

    def numbered() -> Iterator[tuple[str, bool]]:
        for text, ends in pieces:
            current[0] = shards.add(len(text))  # label() yields a piece's parts before it reads the next
            yield text, ends

    for text, ends, split in label(numbered()):
        if current[0] >= skip:
            yield text, ends, split, current[0]


# ------------------------------------------------------------------------------------------- tokenizing
_WORKER_TOKENIZER: HFTokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = (
        "false"  # one thread per worker process: the pool is the parallelism
    )
    _WORKER_TOKENIZER = HFTokenizer.from_str(tokenizer_json)


def encode_pieces(
    texts: list[str], ends: list[bool], eos_id: int, dtype: str, tok: HFTokenizer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the pieces, concatenated (``<|eos|>`` after each piece that ends a document), and
    each piece's number of ids."""
    tok = tok or _WORKER_TOKENIZER
    eos = [eos_id]
    # each Encoding's ids are read once (every .ids access builds a new Python list)
    ids = [
        e.ids + eos if end else e.ids
        for e, end in zip(tok.encode_batch(texts, add_special_tokens=False), ends)
    ]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    out = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return out, lengths


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id fits, else ``uint32``."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def _owner() -> str:
    """``<pid>@<host>``: what names this process's temporary files (unique per machine and process: several
    nodes may prepare into one shared folder at once)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _owner_alive(name: str) -> bool | None:
    """Whether the process that named a temporary file ``.<what>.<pid>@<host>.<ext>`` still runs: ``None``
    when that cannot be told (another machine's file, or a name not of that form)."""
    owner, _, host = name.rsplit(".", 1)[0].partition("@")
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(owner.rsplit(".", 1)[-1]), 0)
    except ValueError:
        return None
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TokenFile:
    """Token ids appended to a temporary file next to ``path``, renamed onto ``path`` by :meth:`publish`.

    A full disk raises an ``OSError`` saying so; the temporary file is then removed and ``path`` (a previous
    cache) is left untouched.

    Args:
        path: The file to publish.
        resume: ``(bytes, tokens)`` to keep of a temporary file already at :attr:`tmp` (taken over from an
            interrupted prepare): it is cut back to ``bytes`` and appended to.
    """

    def __init__(self, path: Path, resume: tuple[int, int] | None = None) -> None:
        self.path = path
        self.tmp = self.tmp_path(path)
        if resume is None:
            self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by publish / discard
            self.tokens = 0
        else:
            nbytes, self.tokens = resume
            self.f = open(self.tmp, "r+b")  # noqa: SIM115 - closed by publish / discard
            self.f.truncate(nbytes)  # what the interrupted run wrote after its last finished shard
            self.f.seek(nbytes)

    @staticmethod
    def tmp_path(path: Path) -> Path:
        """This process's temporary file for ``path``."""
        return path.parent / f".{path.name}.{_owner()}.tmp"

    def sync(self) -> int:
        """Flush and fsync what was written; the file's size in bytes."""
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def write(self, ids: np.ndarray) -> None:
        try:
            self.f.write(ids.tobytes())
        except OSError as err:
            self.discard()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(
                    err.errno,
                    f"disk full (no space left on device) while writing the token cache {self.path}; the "
                    "partial file was removed and any previous cache is untouched. Free space or set "
                    "data.cache_dir to another disk",
                    str(self.path),
                ) from err
            raise
        self.tokens += len(ids)

    def publish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def remove_stale_temp_files(folder: Path) -> None:
    """Remove the temporary token and progress files of interrupted prepares (their process is gone) in
    ``folder``; another machine's (a shared folder) are not ours to judge, a running one's are in use."""
    for tmp in [*folder.glob(".*.bin.*@*.tmp"), *folder.glob(".prepare.*@*.json")]:
        if _owner_alive(tmp.name) is False:
            tmp.unlink(missing_ok=True)


class PrepareProgress:
    """The progress file of this process's prepare into ``folder``: the shards finished so far and the size of
    each temporary token file after them, rewritten atomically after every shard.

    Args:
        folder: The cache folder.
        identity: What the output depends on (corpus stamp, tokenizer, piece and shard size, number of shards,
            split): an interrupted prepare is resumed only when its identity is the same.
        log: Where the resume / start-over lines go.
    """

    VERSION = 1

    def __init__(self, folder: Path, identity: dict[str, Any], log: Callable[[str], None] = print) -> None:
        self.folder, self.log = folder, log
        self.identity = json.loads(json.dumps({"version": self.VERSION, **identity}))  # as read back
        self.path = folder / f".prepare.{_owner()}.json"
        self.done = 0  # shards finished
        self.documents = 0  # documents in them
        self.files: dict[str, tuple[int, int]] = {}  # split -> (bytes, tokens) after them

    @property
    def shards(self) -> int:
        return int(self.identity["shards"])

    def adopt(self, targets: dict[str, Path]) -> dict[str, tuple[int, int]]:
        """Take over the files of an interrupted prepare of the same identity (its process gone, on this
        machine): its temporary token files are renamed to this process's (:meth:`TokenFile.tmp_path` of
        ``targets[split]``). Returns ``{split: (bytes, tokens)}`` to resume from (empty: start over)."""
        for old in sorted(self.folder.glob(".prepare.*@*.json")):
            # a dead process's, or this one's own (a prepare interrupted by Ctrl-C, run again in a notebook)
            if old != self.path and _owner_alive(old.name) is not False:
                continue
            try:
                state = json.loads(old.read_text())
            except (OSError, ValueError):
                continue
            if state.get("identity") != self.identity:
                theirs = state.get("identity") or {}
                differ = sorted(k for k in {*self.identity, *theirs} if theirs.get(k) != self.identity.get(k))
                self.log(
                    f"{self.folder}: an interrupted prepare there was of another {', '.join(differ)}; "
                    "starting over"
                )
                continue
            try:
                os.replace(old, self.path)  # atomic: of several processes taking it over, one wins
            except OSError:
                continue
            files = {s: (int(b), int(t)) for s, (b, t) in state["files"].items()}
            try:
                for split, name in state["tmp"].items():
                    src, dst = self.folder / name, TokenFile.tmp_path(targets[split])
                    if src.stat().st_size < files[split][0]:
                        raise FileNotFoundError(f"{src} is shorter than its finished shards")
                    os.rename(src, dst)
            except (OSError, KeyError) as err:
                self.log(f"{self.folder}: cannot resume the interrupted prepare ({err}); starting over")
                self.path.unlink(missing_ok=True)
                return {}
            self.done, self.documents, self.files = int(state["done"]), int(state["documents"]), files
            self.log(
                f"{self.folder}: resuming from shard {self.done + 1}/{self.shards} (the {self.done} finished "
                f"shards of an interrupted prepare are skipped)"
                if self.done < self.shards
                else f"{self.folder}: all {self.shards} shards were finished by an interrupted prepare"
            )
            return files
        return {}

    def commit(self, done: int, documents: int, files: dict[str, TokenFile]) -> None:
        """``done`` shards are written to ``files``: sync them, then record it (atomically)."""
        from lit_llm.atomic import atomic_write

        self.done, self.documents = done, documents
        self.files = {s: (f.sync(), f.tokens) for s, f in files.items()}
        state = {
            "identity": self.identity,
            "done": done,
            "documents": documents,
            "files": self.files,
            "tmp": {s: f.tmp.name for s, f in files.items()},
        }
        atomic_write(self.path, json.dumps(state))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _batches(
    labelled: Iterator[tuple[str, bool, str, int]], batch_chars: int
) -> Iterator[tuple[list[str], list[bool], list[str], int, bool]]:
    """Batches of about ``batch_chars`` characters, each within one shard: ``(texts, ends, splits, shard,
    closes)``, ``closes`` when it is the shard's last batch (a full batch waits for the next piece to tell)."""
    texts: list[str] = []
    ends: list[bool] = []
    splits: list[str] = []
    size, shard = 0, 0
    held: tuple | None = None  # a full batch, until the next piece says whether its shard ended
    for text, end, split, piece_shard in labelled:
        if held is not None:
            yield *held, piece_shard != held[3]
            held = None
        if texts and piece_shard != shard:
            yield texts, ends, splits, shard, True
            texts, ends, splits, size = [], [], [], 0
        shard = piece_shard
        texts.append(text)
        ends.append(end)
        splits.append(split)
        size += len(text)
        if size >= batch_chars:
            held = texts, ends, splits, shard
            texts, ends, splits, size = [], [], [], 0
    if held is not None:
        yield *held, True
    if texts:
        yield texts, ends, splits, shard, True


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items``, produced ahead by a background thread (at most ``depth`` waiting): reading and parsing the
    corpus overlaps with tokenizing, which releases the GIL. The thread's errors are raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop, errors = object(), threading.Event(), []

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            errors.append(err)
        q.put(done)

    thread = threading.Thread(target=produce, name="corpus-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            yield item
    finally:
        stop.set()  # the consumer stopped (finished, failed or interrupted): let the reader end
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        thread.join()
    if errors:
        raise errors[0]


def tokenize_to_files(
    labelled: Iterator[tuple[str, bool, str, int]],
    tokenizer: HFTokenizer,
    eos_id: int,
    files: dict[str, TokenFile],
    num_proc: int = 0,
    batch_chars: int = 1 << 22,
    progress: Callable[[int, int], None] | None = None,
    shard_done: Callable[[int], None] | None = None,
) -> None:
    """Tokenize labelled pieces in order and append each piece's ids to ``files[split]``.

    Args:
        labelled: ``(text, ends_document, split, shard)`` pieces (:func:`sharded`), shards in order.
        tokenizer: The ``tokenizers`` tokenizer.
        eos_id: The id appended after each document.
        files: One :class:`TokenFile` per split name.
        num_proc: Worker processes (``0``: tokenize in this process, where ``tokenizers`` itself may use
            several threads).
        batch_chars: About how many characters one batch (one worker task) holds.
        progress: Called with ``(documents, tokens)`` done after each batch.
        shard_done: Called with ``k + 1`` once every id of shard ``k`` is in ``files`` (right after its last
            batch is written).
    """
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))

    def write(
        ids: np.ndarray, lengths: np.ndarray, ends: list[bool], splits: list[str], shard: int, closes: bool
    ) -> None:
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        start = 0
        for i in range(1, len(splits) + 1):  # runs of pieces of the same split go out as one write
            if i == len(splits) or splits[i] != splits[start]:
                files[splits[start]].write(ids[bounds[start] : bounds[i]])
                start = i
        if progress:
            progress(sum(ends), len(ids))
        if closes and shard_done:
            shard_done(shard + 1)

    with contextlib.closing(prefetch(_batches(labelled, batch_chars))) as batches:  # closed on errors too
        if num_proc <= 0:
            for texts, ends, splits, shard, closes in batches:
                write(*encode_pieces(texts, ends, eos_id, dtype, tokenizer), ends, splits, shard, closes)
        else:
            _tokenize_in_workers(batches, tokenizer, eos_id, dtype, num_proc, write)


def _tokenize_in_workers(
    batches: Iterator, tokenizer: HFTokenizer, eos_id: int, dtype: str, num_proc: int, write: Callable
) -> None:
    # spawn, not fork: the parent may hold threads (torch, tokenizers) that a forked child would inherit
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
        pending: deque = deque()
        for texts, ends, *rest in batches:  # rest: shard, closes
            pending.append((pool.apply_async(encode_pieces, (texts, ends, eos_id, dtype)), ends, rest))
            if len(pending) >= 2 * num_proc:  # bounded: a slow writer never lets batches pile up
                job, e, rest = pending.popleft()
                write(*job.get(), e, *rest)
        while pending:
            job, e, rest = pending.popleft()
            write(*job.get(), e, *rest)


class Progress:
    """A progress line (documents, tokens/s, ETA over the documents counted by the first pass)."""

    def __init__(self, total_docs: int, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_docs, unit="doc", desc="tokenizing", disable=not enabled or None)
        self.tokens, self.docs, self.start = 0, 0, time.perf_counter()

    def __call__(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(docs)

    def close(self) -> None:
        self.bar.close()
