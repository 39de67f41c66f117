"""The shared base of the record DataModules (SFT conversations, preference pairs, RL prompts).

A :class:`RecordDataModule` knows where records come from (the built-in tinyworld or a local file /
Hugging Face dataset), how they split into train and validation (:func:`~lit_llm.data.common.split_train_val`),
which tokenizer they use (the one of the checkpoint the stage starts from), and what a stage may ask of the
dataset rather than know itself:

* ``eval_prompts()``: held-out prompts (``{"prompt": str, ...}`` records) scored after each validation;
* ``gold_reward``: a scorer ``(record, reply) -> float`` of those prompts (tinyworld: is the answer right?),
  or ``None`` when the dataset has none.

Subclasses say what an item is: ``builtin_items`` (tinyworld), ``convert_record`` (one file record to items),
``tokenize`` (items to examples) and ``collate`` (examples to a batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_llm.checkpoint import load_tokenizer
from lit_llm.data import tinyworld
from lit_llm.data.common import import_function, read_records, split_train_val
from lit_llm.data.formats import RecordError, detect_format, to_conversations
from lit_llm.errors import UserError
from lit_llm.tokenizer import Tokenizer

BUILTIN = "tinyworld"
Scorer = Callable[[dict, str], float]


def is_builtin(source: str) -> bool:
    """Whether ``source`` names the built-in tinyworld data rather than a file or ``hf:`` dataset."""
    return source == BUILTIN


def prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record with a ``prompt`` string: as it is, the last user turn of a ``prompt`` given as messages, or
    the first user turn of a conversation record (the other fields are kept for the scorer)."""
    if isinstance(record.get("prompt"), str):
        return record
    if isinstance(record.get("prompt"), list):
        users = [
            m.get("content") for m in record["prompt"] if isinstance(m, dict) and m.get("role") == "user"
        ]
        if users and isinstance(users[-1], str):
            return {**record, "prompt": users[-1]}
    if detect_format(record) in ("messages", "hh", "alpaca"):
        conv = to_conversations(record)[0]
        users = [m["content"] for m in conv if m["role"] == "user"]
        if users:
            return {**record, "prompt": users[0]}
    raise RecordError("no prompt (a 'prompt' string or a conversation with a user turn)")


class RecordDataModule(LightningDataModule):
    """Records -> tokenized examples -> batches, for the stages after pretraining.

    Args:
        source: ``tinyworld`` (built in), a local ``.jsonl``/``.json``/``.parquet`` (``.gz`` allowed) file,
            or ``hf:<dataset>``.
        tokenizer: The tokenizer (normally linked from ``model.init_from``: the checkpoint the stage starts
            from), as a ``.ckpt``, a ``tokenizer.json`` or a folder holding one.
        batch_size: Items per batch.
        val_fraction: Held-out share of a local/HF dataset (its last items).
        skip_bad_records: Skip (and count) malformed records instead of stopping at the first one.
        gold_fn: Scorer ``"module:function"`` taking ``(record, reply) -> float`` of the held-out prompts;
            tinyworld's exact-answer check by default on tinyworld, none elsewhere.
        seed: Seed of the tinyworld generator.
        num_workers: DataLoader workers.
        chat_template: A Jinja file to use instead of the tokenizer's own chat template (needed for a base
            model that ships none); the stage adopts this tokenizer, so its checkpoints carry the template.
    """

    kind = "records"

    def __init__(
        self,
        source: str = BUILTIN,
        tokenizer: str | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        skip_bad_records: bool = False,
        gold_fn: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        self.chat_template = chat_template
        self.source, self.tokenizer_path, self.batch_size = source, tokenizer, batch_size
        self.val_fraction, self.skip_bad_records, self.seed = val_fraction, skip_bad_records, seed
        self.num_workers = num_workers
        self._gold = (
            import_function(gold_fn) if gold_fn else (tinyworld.gold_score if is_builtin(source) else None)
        )
        self._tokenizer: Tokenizer | None = None
        self.n_eval = 0  # held-out prompts for eval_prompts(); subclasses set it from their arguments
        self._eval_records: list[dict[str, Any]] | None = None
        self.stats: dict[str, int] = {}
        self.train_examples: list = []
        self.val_examples: list = []

    # ---------------------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise UserError(
                    "this stage needs the tokenizer of the model it starts from: set --model.init_from to a "
                    "checkpoint (the CLI passes it on as --data.tokenizer) or --data.tokenizer to a tokenizer.json"
                )
            self._tokenizer = load_tokenizer(self.tokenizer_path, self.chat_template)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def world(self) -> tinyworld.WorldConfig:
        return tinyworld.WorldConfig(seed=self.seed)

    # ------------------------------------------------------------------------------ what stages may ask
    @property
    def gold_reward(self) -> Scorer | None:
        """Scorer ``(record, reply) -> float`` of :meth:`eval_prompts`, or ``None``."""
        return self._gold

    def eval_prompts(self) -> list[dict[str, Any]]:
        """Held-out prompts the stage answers and ``gold_reward`` scores after each validation: ``n_eval`` of
        tinyworld's validation questions, or of a file's held-out records (built once, then reused)."""
        if self.gold_reward is None or self.n_eval <= 0:
            return []
        if self._eval_records is None:
            self._eval_records = (
                tinyworld.rl_prompts(self.n_eval, "val", self.world)
                if is_builtin(self.source)
                else self.held_out_prompts(self.n_eval)
            )
        return self._eval_records

    # ------------------------------------------------------------------------------------------ records
    def items(self) -> tuple[list, list]:
        """(train, validation) items: built in, or converted from the source's records and split."""
        if is_builtin(self.source):
            return self.builtin_items()
        out: list = []
        bad = 0
        for i, rec in enumerate(read_records(self.source)):
            try:
                out.extend(self.convert_record(rec))
            except (RecordError, KeyError, TypeError) as err:
                if not self.skip_bad_records:
                    raise RecordError(
                        f"{self.source}, record {i}: {err} (pass --data.skip_bad_records true to skip such records)"
                    ) from err
                bad += 1
        self.stats["bad_records_skipped"] = bad
        return split_train_val(out, self.val_fraction, self.source, self.kind)

    def held_out_prompts(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` prompt records (``prompt_record``) from the held-out part of a file / ``hf:`` source,
        malformed ones skipped when ``skip_bad_records`` is set, else refused by position."""
        _, val = split_train_val(read_records(self.source), self.val_fraction, self.source)
        out: list[dict[str, Any]] = []
        for i, rec in enumerate(val):
            if len(out) == n:
                break
            try:
                out.append(prompt_record(rec))
            except (RecordError, KeyError, TypeError) as err:
                if not self.skip_bad_records:
                    raise RecordError(
                        f"{self.source}, held-out record {i}: {err} (pass --data.skip_bad_records true to skip it)"
                    ) from err
        return out

    def builtin_items(self) -> tuple[list, list]:
        raise NotImplementedError

    def convert_record(self, record: dict[str, Any]) -> list:
        """The items in one record of a file or ``hf:`` dataset (a record may hold several)."""
        raise NotImplementedError

    def tokenize(self, items: list, split: str) -> list:
        """Items -> examples (counting what was dropped or cut in ``self.stats``)."""
        return items

    def collate(self, examples: list) -> Any:
        return examples

    # ------------------------------------------------------------------------------------------ loaders
    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        train, val = self.items()
        self.train_examples = self.tokenize(train, "train")
        self.val_examples = self.tokenize(val, "val")
        rank_zero_info(
            f"{type(self).__name__}: {len(self.train_examples)} train / {len(self.val_examples)} val {self.kind}"
            + "".join(f", {k}={v}" for k, v in self.stats.items())
        )

    def _loader(self, examples: list, shuffle: bool, **kwargs: Any) -> DataLoader:
        kwargs.setdefault("batch_size", self.batch_size)
        return DataLoader(
            examples, shuffle=shuffle, num_workers=self.num_workers, collate_fn=self.collate, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, shuffle=False)
