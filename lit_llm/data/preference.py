"""Preference pairs for the reward model and DPO: one prompt, a chosen and a rejected response.

Formats: ``prompt``/``chosen``/``rejected`` strings, or hh-rlhf full dialogues where chosen and rejected
share every turn up to the last assistant reply (the shared part becomes the prompt). Both responses are
rendered with the same chat template as SFT. The number of pairs cut to ``seq_len`` is reported, as is the
number of identical pairs dropped. Two ways to cut, chosen by ``pairs_for``:

* ``reward``: each sequence keeps its last ``seq_len`` tokens (the response being judged), as
  ``RewardModel.score`` cuts a single sequence at inference.
* ``dpo``: chosen and rejected keep *the same* prompt tokens: the prompt loses its first tokens, by the
  same amount for both, until the longer sequence fits; a reply still too long alone loses its end.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from lit_llm.data import tinyworld
from lit_llm.data.base import BUILTIN, RecordDataModule
from lit_llm.data.formats import Message, RecordError, parse_hh
from lit_llm.errors import DataError, UserError
from lit_llm.losses import IGNORE_INDEX
from lit_llm.tokenizer import Tokenizer

Pair = tuple[list[int], list[int], list[bool]]  # chosen ids, rejected ids, chosen's trained-on mask


def split_pair(record: dict[str, Any]) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a record in either format."""
    if "prompt" in record:
        prompt = record["prompt"]
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return msgs, record["chosen"], record["rejected"]
    chosen, rejected = parse_hh(record["chosen"]), parse_hh(record["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("both dialogues must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("chosen and rejected do not share the dialogue before the last assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def render_pair(
    tok: Tokenizer, prompt: list[Message], response: str, max_len: int
) -> tuple[list[int], list[bool], bool]:
    """Chat-template ids of prompt + response and, per token, whether SFT would train on it (assistant
    text and its ``<|end|>``), both cut to the last ``max_len`` tokens; and whether they were cut."""
    ids, mask = tok.render_chat([*prompt, {"role": "assistant", "content": response}])
    cut = len(ids) > max_len
    return ids[-max_len:], mask[-max_len:], cut


class SharedPair(NamedTuple):
    """A pair for DPO: two rows, ``prompt + chosen reply`` and ``prompt + rejected reply``.

    Attributes:
        chosen: Chat-template ids of the prompt (up to and including the ``<|assistant|>`` tag of the judged
            reply) followed by the chosen reply (ending with ``<|end|>`` unless cut).
        rejected: The same prompt ids followed by the rejected reply.
        chosen_mask: Per token of ``chosen``, whether SFT trains on it (earlier assistant turns of a dialogue
            and the chosen reply).
        starts: Index of the first reply token in ``chosen`` and in ``rejected``: the prompt's length, the
            same for both (:func:`render_shared_pair` cuts the prompt once for the pair).
    """

    chosen: list[int]
    rejected: list[int]
    chosen_mask: list[bool]
    starts: tuple[int, int]


def render_shared_pair(
    tok: Tokenizer, prompt: list[Message], chosen: str, rejected: str, max_len: int
) -> tuple[SharedPair, bool]:
    """Chat-template ids of a pair with one shared prompt, cut to ``max_len``, and whether it was cut.

    The prompt loses its first tokens, by the same amount for both replies, until ``prompt + longer reply``
    fits; it keeps at least its last token (``<|assistant|>``), which predicts the reply's first token. A
    reply that is still too long alone loses its end. Chosen and rejected thus always condition on exactly
    the same prompt tokens, which DPO's log-ratios compare.
    """
    if max_len < 2:
        raise UserError(f"seq_len must be >= 2 for preference pairs, got {max_len}")
    p_ids, p_mask = tok.render_chat(prompt, add_generation_prompt=True)
    replies = []
    for reply in (chosen, rejected):
        ids, _ = tok.render_chat([*prompt, {"role": "assistant", "content": reply}])
        if ids[: len(p_ids)] != p_ids:  # the template renders the prompt the same with or without a reply
            raise RecordError("the chat template renders the prompt differently before the reply")
        replies.append(ids[len(p_ids) :])
    c, r = replies
    excess = len(p_ids) + max(len(c), len(r)) - max_len
    if excess > 0:
        k = min(excess, len(p_ids) - 1)
        p_ids, p_mask = p_ids[k:], p_mask[k:]
        room = max_len - len(p_ids)
        c, r = c[:room], r[:room]
    P = len(p_ids)
    return SharedPair(p_ids + c, p_ids + r, p_mask + [True] * len(c), (P, P)), excess > 0


def collate_shared_pairs(pairs: list[SharedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded.

    Returns:
        ``input_ids`` and ``valid`` ``(2B, T)``; ``labels`` ``(2B, T)``: the next token where it is a token of
        the judged reply (its ``<|end|>`` included), ``-100`` on the prompt, the last token and padding, so
        that summing log-probs over labels scores ``log p(reply | prompt)``; ``chosen_labels`` ``(B, T)``:
        the SFT labels of each chosen row (earlier assistant turns of the prompt too), as
        :func:`collate_pairs` gives them.
    """
    B = len(pairs)
    rows = [(p.chosen, p.starts[0]) for p in pairs] + [(p.rejected, p.starts[1]) for p in pairs]
    T = max(len(seq) for seq, _ in rows)
    ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
    valid = torch.zeros((2 * B, T), dtype=torch.bool)
    labels = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, start) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        valid[i, : len(seq)] = True
        labels[i, start - 1 : len(seq) - 1] = torch.tensor(seq[start:])  # position t predicts token t + 1
    chosen_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, p in enumerate(pairs):
        sft = [t if m else IGNORE_INDEX for t, m in zip(p.chosen[1:], p.chosen_mask[1:])]
        chosen_labels[i, : len(sft)] = torch.tensor(sft, dtype=torch.long)
    return {"input_ids": ids, "valid": valid, "labels": labels, "chosen_labels": chosen_labels}


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded.

    Returns:
        ``input_ids`` and ``valid`` ``(2B, T)``; ``chosen_labels`` ``(B, T)``: the next token of each chosen
        row where it is an assistant token (the SFT labels of the chosen reply), ``-100`` elsewhere.
    """
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        valid[i, : len(s)] = True
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (c, _, mask) in enumerate(pairs):
        labels[i, : len(c) - 1] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(c[1:], mask[1:])])
    return {"input_ids": ids, "valid": valid, "chosen_labels": labels}


class PreferenceDataModule(RecordDataModule):
    """Chosen/rejected pairs for reward modelling and preference optimisation (DPO).

    Args:
        source: ``tinyworld``, a local ``.jsonl``/``.json``/``.parquet`` (``.gz`` allowed) or ``hf:<dataset>``.
        tokenizer: Linked from ``model.init_from`` (the SFT checkpoint).
        seq_len: Longest sequence; how longer pairs are cut depends on ``pairs_for``.
        pairs_for: ``reward``: each sequence keeps its last ``seq_len`` tokens (as the reward model scores a
            sequence at inference); batches hold ``input_ids``, ``valid`` and ``chosen_labels``. ``dpo``:
            chosen and rejected share exactly the same prompt tokens (the prompt is cut from the left by the
            same amount for both, then a reply too long alone loses its end); batches add ``labels``, the
            reply-only next-token labels of all rows, which DPO needs.
        batch_size: Pairs per batch.
        skip_bad_records: Skip and count malformed records instead of stopping.
        val_fraction: Held-out share of a local/HF dataset.
        tinyworld_train: Number of tinyworld training pairs.
        tinyworld_val: Number of tinyworld validation pairs.
        tinyworld_wrong_person: Share of tinyworld *training* pairs whose rejected reply is another person's
            true fact (``tinyworld.preference_pairs(wrong_person_rate=...)``); validation pairs are always
            drawn as usual, so accuracies stay comparable. ``1.0`` trains on those pairs only (the first step of
            ``configs/reward/tinyworld-person.yaml``).
        gold_fn: Scorer ``"module:function"`` of held-out replies, ``(record, reply) -> float``; on tinyworld
            the exact-answer check (a stage such as DPO logs it as ``val/exact_match``). With a file source,
            the held-out records' prompts (first user turns of dialogues) are answered and scored.
        tinyworld_eval: Held-out tinyworld prompts (``tinyworld.rl_prompts(n, "val")``) answered greedily
            and scored by ``gold_fn`` at each validation of a stage that asks for them (DPO).
        seed: Seed of the tinyworld generator.
        num_workers: DataLoader workers.
        chat_template: A Jinja file replacing the tokenizer's chat template (see ``RecordDataModule``).
    """

    kind = "pairs"

    def __init__(
        self,
        source: str = BUILTIN,
        tokenizer: str | None = None,
        seq_len: int = 256,
        pairs_for: Literal["reward", "dpo"] = "reward",
        batch_size: int = 32,
        skip_bad_records: bool = False,
        val_fraction: float = 0.1,
        tinyworld_train: int = 4000,
        tinyworld_val: int = 400,
        tinyworld_wrong_person: float = 0.0,
        gold_fn: str | None = None,
        tinyworld_eval: int = 100,
        seed: int = 0,
        num_workers: int = 0,
        chat_template: str | None = None,
    ) -> None:
        super().__init__(
            source,
            tokenizer,
            batch_size,
            val_fraction,
            skip_bad_records,
            gold_fn,
            seed,
            num_workers,
            chat_template,
        )
        if not 0.0 <= tinyworld_wrong_person <= 1.0:
            raise ValueError(f"tinyworld_wrong_person must be in [0, 1], got {tinyworld_wrong_person}")
        if pairs_for not in ("reward", "dpo"):
            raise UserError(f"pairs_for must be 'reward' or 'dpo', got {pairs_for!r}")
        self.seq_len, self.wrong_person, self.pairs_for = seq_len, tinyworld_wrong_person, pairs_for
        self.tinyworld_sizes = (tinyworld_train, tinyworld_val)
        self.n_eval = tinyworld_eval

    def builtin_items(self) -> tuple[list, list]:
        """(train, validation) lists of (prompt messages, chosen, rejected)."""
        n_train, n_val = self.tinyworld_sizes

        def get(split: str, n: int, wrong_person: float = 0.0) -> list[tuple]:
            pairs = tinyworld.preference_pairs(n, split, self.world, wrong_person)
            return [([{"role": "user", "content": p["prompt"]}], p["chosen"], p["rejected"]) for p in pairs]

        return get("train", n_train, self.wrong_person), get("val", n_val)

    def convert_record(self, record: dict[str, Any]) -> list:
        return [split_pair(record)]

    def tokenize(self, items: list[tuple], split: str) -> list[Pair] | list[SharedPair]:
        tok, out = self.tokenizer, []
        identical = cut = 0
        for prompt, chosen, rejected in items:
            if chosen.strip() == rejected.strip():
                identical += 1
                continue
            if self.pairs_for == "dpo":
                pair, was_cut = render_shared_pair(tok, prompt, chosen, rejected, self.seq_len)
                cut += was_cut
                out.append(pair)
                continue
            c, c_mask, cut_c = render_pair(tok, prompt, chosen, self.seq_len)
            r, _, cut_r = render_pair(tok, prompt, rejected, self.seq_len)
            cut += cut_c or cut_r
            out.append((c, r, c_mask))
        self.stats[f"{split}_identical_dropped"] = identical
        self.stats[f"{split}_truncated"] = cut
        if not out:
            raise DataError(f"no usable {split} pairs in {self.source}")
        return out

    def collate(self, examples: list[Pair] | list[SharedPair]) -> dict[str, torch.Tensor]:
        if self.pairs_for == "dpo":
            return collate_shared_pairs(examples, self.tokenizer.pad_id)
        return collate_pairs(examples, self.tokenizer.pad_id)
