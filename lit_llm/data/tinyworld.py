"""Tinyworld: a tiny, offline, seeded synthetic world for every training stage.

Tinyworld is small enough for a ~1M-parameter transformer on a laptop CPU to learn in minutes, yet it leaves
room for RLHF to improve: the questions are tunably hard and a programmatic gold reward knows the truth.

**The world.** A *scene* has a few people (from ``NAMES``), each in one place (from ``PLACES``) and holding a
small count (``1..max_count``) of one or more kinds of objects (from ``OBJECTS``). A scene is stated as short,
regular sentences::

    Alice is in the garden. Alice has 3 apples. Bob is in the park. Bob has 2 apples.

**Questions** are about the scene given in the prompt (reading comprehension plus small arithmetic, never
memorised facts), grouped by difficulty:

* 0 (lookup): "How many apples does Alice have?" -> "3"; "Where is Bob?" -> "the park"
* 1 (two facts): "How many apples do Alice and Bob have together?" -> "5";
  "How many more apples does Alice have than Bob?" -> "1" (always non-negative)
* 2 (three facts / counting): "How many people are in the garden?"; "How many apples do Alice, Bob and
  Cara have together?"; "Who has the most apples?" (only asked when the maximum is unique)

**Canonical response.** Every answer is a single word once articles are dropped (a number, a name or a
place). The canonical response first restates the scene sentences the answer rests on, then ends with
``"The answer is {answer}."``, e.g. "Alice has 3 apples. Bob has 2 apples. The answer is 5." Copying a
sentence is easy for a small transformer (an induction head), and the last step then only combines facts
standing right next to it. ``WorldConfig(show_facts=False)`` gives the bare "The answer is 5.". The fixed "answer is" anchor makes parsing robust: :func:`extract_answer` takes
the first word after it, and :func:`gold_reward` compares it with the truth after :func:`normalize_answer`
(lower case, articles and punctuation dropped). A response without the anchor only counts when it is a bare
answer such as "5." or "the park".

**Hedged demonstrations.** Like human demonstrators, the SFT data sometimes hedges instead of answering
("It could be 4 or 5."), more often on harder questions (``WorldConfig.hedge_rates``). A hedge earns no
gold reward and loses in every preference pair, so SFT imitates it and RLHF has something to fix that the
reward model can see.

**Splits.** ``SPLITS = ("train", "val", "test")``. Each (function, split) pair has its own random stream,
seeded with ``zlib.crc32`` (never the salted built-in ``hash``). On top of that, every scene is assigned to
exactly one split by the CRC32 of its text (80% train, 10% val, 10% test), and a stream keeps only scenes of
its own split. Held-out prompts therefore never share a scene with training data, for any number of items.

**Streaming.** Items are generated one after the other from one stream, so the first ``k`` items of a call
with ``n > k`` equal a call with ``n = k``: tiny tests and big runs share data.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

NAMES: tuple[str, ...] = ("Alice", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana")
OBJECTS: tuple[str, ...] = ("apples", "pears", "books", "coins", "cats", "cups", "shells", "stones")
PLACES: tuple[str, ...] = ("garden", "kitchen", "park", "school", "river", "market")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DIFFICULTIES: tuple[int, ...] = (0, 1, 2)

_ARTICLES = frozenset({"the", "a", "an"})
_BARE_WORDS = frozenset(w.lower() for w in NAMES + PLACES)
_ANSWER_RE = re.compile(r"answer\s+is\b(.*)", re.IGNORECASE | re.DOTALL)
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world; all generation is deterministic given the config.

    Attributes:
        seed: Base seed; each (function, split) stream derives its own seed from it.
        n_people: People per scene, ``2..len(NAMES)``. More people make longer prompts and harder questions.
        n_objects: Object kinds per scene, ``1..len(OBJECTS)``.
        max_count: Largest count a person holds, ``2..20``.
        difficulties: Which question difficulties to draw from (a non-empty tuple, values in ``0, 1, 2``).
        qa_per_doc: Question-answer lines per pretraining document, ``1..10``.
        hedge_rates: For difficulty 0, 1, 2: the share of SFT demonstrations that hedge instead of answering
            ("It could be 4 or 5."), as human demonstrators do on hard questions. Such replies earn no gold
            reward and lose in the preference pairs, so SFT imitates them and RLHF can learn to commit.
        show_facts: Canonical responses first restate the scene sentences the answer rests on ("Alice has 3
            apples. Bob has 2 apples. The answer is 5."): copying is easy for a small transformer, and the
            final step then only combines facts next to it. ``False``: just "The answer is 5.".
    """

    seed: int = 0
    n_people: int = 3
    n_objects: int = 1
    max_count: int = 9
    difficulties: tuple[int, ...] = (0, 1, 2)
    qa_per_doc: int = 3
    hedge_rates: tuple[float, float, float] = (0.1, 0.4, 0.6)
    show_facts: bool = True

    def __post_init__(self) -> None:
        if len(self.hedge_rates) != 3 or not all(0.0 <= r <= 1.0 for r in self.hedge_rates):
            raise ValueError(
                f"hedge_rates must be three probabilities (difficulty 0, 1, 2), got {self.hedge_rates}"
            )
        if not 1 <= self.qa_per_doc <= 10:
            raise ValueError(f"qa_per_doc must be in 1..10, got {self.qa_per_doc}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not 2 <= self.n_people <= len(NAMES):
            raise ValueError(f"n_people must be in 2..{len(NAMES)}, got {self.n_people}")
        if not 1 <= self.n_objects <= len(OBJECTS):
            raise ValueError(f"n_objects must be in 1..{len(OBJECTS)}, got {self.n_objects}")
        if not 2 <= self.max_count <= 20:
            raise ValueError(f"max_count must be in 2..20, got {self.max_count}")
        diffs = self.difficulties
        if not isinstance(diffs, tuple) or not diffs or any(d not in DIFFICULTIES for d in diffs):
            raise ValueError(
                f"difficulties must be a non-empty tuple of values in {DIFFICULTIES}, got {diffs!r}"
            )
        if len(set(diffs)) != len(diffs):
            raise ValueError(f"difficulties must not repeat values, got {diffs!r}")


@dataclass(frozen=True)
class _Scene:
    """People, their places and their object counts; ``text`` is the scene as sentences."""

    people: tuple[str, ...]
    objects: tuple[str, ...]
    place: dict[str, str]
    count: dict[tuple[str, str], int]

    @property
    def text(self) -> str:
        sentences = []
        for p in self.people:
            sentences.append(f"{p} is in the {self.place[p]}.")
            sentences.extend(f"{p} has {_qty(self.count[p, o], o)}." for o in self.objects)
        return " ".join(sentences)


@dataclass(frozen=True)
class _QA:
    """A question about a scene, its true answer, its difficulty and the same fact stated as prose."""

    question: str
    answer: str
    difficulty: int
    fact: str
    support: tuple[str, ...] = ()  # the scene sentences the answer rests on, in the question's order


def _noun(n: int, obj: str) -> str:
    """``apples`` for any count but 1, ``apple`` for 1 (all object nouns have a regular ``-s`` plural)."""
    return obj[:-1] if n == 1 else obj


def _qty(n: int, obj: str) -> str:
    """``3 apples`` / ``1 apple``."""
    return f"{n} {_noun(n, obj)}"


def _response(answer: str, support: tuple[str, ...] = ()) -> str:
    """The canonical response: the supporting scene sentences (if any), then ``The answer is <answer>.``"""
    return " ".join((*support, f"The answer is {answer}."))


def _has(s: _Scene, p: str, o: str) -> str:
    return f"{p} has {_qty(s.count[p, o], o)}."


def _is_in(s: _Scene, p: str) -> str:
    return f"{p} is in the {s.place[p]}."


# ---- question kinds: each returns a _QA, or None when it does not apply to the scene ----


def _q_count(s: _Scene, rng: random.Random) -> _QA | None:
    p, o = rng.choice(s.people), rng.choice(s.objects)
    n = s.count[p, o]
    return _QA(f"How many {o} does {p} have?", str(n), 0, f"{p} has {_qty(n, o)}.", (_has(s, p, o),))


def _q_where(s: _Scene, rng: random.Random) -> _QA | None:
    p = rng.choice(s.people)
    return _QA(f"Where is {p}?", f"the {s.place[p]}", 0, f"{p} is in the {s.place[p]}.", (_is_in(s, p),))


def _q_sum2(s: _Scene, rng: random.Random) -> _QA | None:
    (a, b), o = rng.sample(s.people, 2), rng.choice(s.objects)
    n = s.count[a, o] + s.count[b, o]
    q, fact = f"How many {o} do {a} and {b} have together?", f"{a} and {b} have {_qty(n, o)} together."
    return _QA(q, str(n), 1, fact, (_has(s, a, o), _has(s, b, o)))


def _q_diff(s: _Scene, rng: random.Random) -> _QA | None:
    (a, b), o = rng.sample(s.people, 2), rng.choice(s.objects)
    if s.count[a, o] < s.count[b, o]:
        a, b = b, a
    d = s.count[a, o] - s.count[b, o]
    fact = (
        f"{a} and {b} have the same number of {o}." if d == 0 else f"{a} has {d} more {_noun(d, o)} than {b}."
    )
    return _QA(f"How many more {o} does {a} have than {b}?", str(d), 1, fact, (_has(s, a, o), _has(s, b, o)))


def _q_people_at(s: _Scene, rng: random.Random) -> _QA | None:
    where = s.place[rng.choice(s.people)]
    n = sum(s.place[p] == where for p in s.people)
    fact = f"There is 1 person in the {where}." if n == 1 else f"There are {n} people in the {where}."
    support = tuple(_is_in(s, p) for p in s.people if s.place[p] == where)
    return _QA(f"How many people are in the {where}?", str(n), 2, fact, support)


def _q_sum3(s: _Scene, rng: random.Random) -> _QA | None:
    if len(s.people) < 3:
        return None
    (a, b, c), o = rng.sample(s.people, 3), rng.choice(s.objects)
    n = s.count[a, o] + s.count[b, o] + s.count[c, o]
    q = f"How many {o} do {a}, {b} and {c} have together?"
    return _QA(
        q, str(n), 2, f"{a}, {b} and {c} have {_qty(n, o)} together.", tuple(_has(s, p, o) for p in (a, b, c))
    )


def _q_most(s: _Scene, rng: random.Random) -> _QA | None:
    o = rng.choice(s.objects)
    counts = sorted((s.count[p, o], p) for p in s.people)
    if counts[-1][0] == counts[-2][0]:
        return None
    winner = counts[-1][1]
    support = tuple(_has(s, p, o) for p in s.people)
    return _QA(f"Who has the most {o}?", winner, 2, f"{winner} has the most {o}.", support)


_KINDS: dict[int, tuple[Callable[[_Scene, random.Random], _QA | None], ...]] = {
    0: (_q_count, _q_where),
    1: (_q_sum2, _q_diff),
    2: (_q_people_at, _q_sum3, _q_most),
}


def _ask(s: _Scene, rng: random.Random, difficulties: tuple[int, ...]) -> _QA:
    """Draw a difficulty uniformly, then the first applicable question kind of it in random order."""
    kinds = list(_KINDS[rng.choice(difficulties)])
    rng.shuffle(kinds)
    for kind in kinds:
        qa = kind(s, rng)
        if qa is not None:
            return qa
    raise AssertionError("unreachable: every difficulty has a kind that always applies")


# ---- seeded streams and split-partitioned scenes ----


def _rng(stream: str, split: str, config: WorldConfig) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(zlib.crc32(f"tinyworld|{config.seed}|{split}|{stream}".encode()))


def scene_split(scene_text: str) -> str:
    """The split a scene belongs to, from the CRC32 of its text (80% train, 10% val, 10% test)."""
    bucket = zlib.crc32(scene_text.encode()) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def _scene(rng: random.Random, split: str, config: WorldConfig) -> _Scene:
    """Draw scenes until one belongs to ``split`` (rejection keeps held-out scenes out of train)."""
    for _ in range(_MAX_TRIES):
        people = tuple(rng.sample(NAMES, config.n_people))
        objects = tuple(rng.sample(OBJECTS, config.n_objects))
        pool = rng.sample(PLACES, max(1, config.n_people - 1))  # fewer places than people: people meet
        place = {p: rng.choice(pool) for p in people}
        count = {(p, o): rng.randint(1, config.max_count) for p in people for o in objects}
        s = _Scene(people, objects, place, count)
        if scene_split(s.text) == split:
            return s
    raise RuntimeError(f"could not draw a {split!r} scene in {_MAX_TRIES} tries")


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


# ---- public generators ----


def pretrain_text(n_docs: int, split: str = "train", config: WorldConfig = WorldConfig()) -> list[str]:
    """Plain-prose documents for pretraining.

    Each document is a scene, then 1-3 statements that spell out facts and arithmetic about it (drawn from
    difficulties 1 and 2, e.g. "Alice and Bob have 5 apples together."), then one line
    ``"Q: <question> A: The answer is <answer>."`` with a question from ``config.difficulties``.

    Args:
        n_docs: Number of documents.
        split: One of ``SPLITS``.
        config: World configuration.

    Returns:
        ``n_docs`` strings.
    """
    _check_n(n_docs)
    rng = _rng("pretrain", split, config)
    docs = []
    for _ in range(n_docs):
        s = _scene(rng, split, config)
        facts: list[str] = []
        for _ in range(rng.randint(1, 3)):
            fact = _ask(s, rng, (1, 2)).fact
            if fact not in facts:
                facts.append(fact)
        qas: list[str] = []
        for _ in range(config.qa_per_doc):
            qa = _ask(s, rng, config.difficulties)
            line = f"Q: {qa.question} A: {_answer(qa, config)}"
            if line not in qas:
                qas.append(line)
        docs.append(" ".join([s.text, *facts, *qas]))
    return docs


def instructions(n: int, split: str = "train", config: WorldConfig = WorldConfig()) -> list[dict]:
    """Instruction-tuning examples.

    Args:
        n: Number of examples.
        split: One of ``SPLITS``.
        config: World configuration.

    Returns:
        Dicts ``{"prompt": "<scene> <question>", "response": "The answer is <answer>.", "answer": str,
        "difficulty": int}``.
    """
    _check_n(n)
    rng = _rng("sft", split, config)
    hedge_rng = _rng("sft-hedge", split, config)  # its own stream: prompts do not depend on the hedge rates
    out = []
    for _ in range(n):
        s = _scene(rng, split, config)
        qa = _ask(s, rng, config.difficulties)
        prompt, answer = f"{s.text} {qa.question}", qa.answer
        hedged = hedge_rng.random() < config.hedge_rates[qa.difficulty]
        response = _hedge(answer, hedge_rng) if hedged else _answer(qa, config)
        out.append(
            {
                "prompt": prompt,
                "response": response,
                "answer": answer,
                "difficulty": qa.difficulty,
                "hedged": hedged,
            }
        )
    return out


def _answer(qa: _QA, config: WorldConfig) -> str:
    """The canonical response to a question, with its supporting sentences when ``config.show_facts``."""
    return _response(qa.answer, qa.support if config.show_facts else ())


def _hedge(answer: str, rng: random.Random) -> str:
    """A non-committal reply of the kind human demonstrators give to hard questions (gold reward 0)."""
    if answer.isdigit():
        other = int(answer) + rng.choice((-1, 1)) if int(answer) > 0 else int(answer) + 1
        low, high = sorted((int(answer), other))
        return f"It could be {low} or {high}."
    return f"I am not sure, maybe {answer}."


def _wrong_person(s: _Scene, qa: _QA, rng: random.Random, show_facts: bool) -> str:
    """A lookup (difficulty 0) answered from another person's true sentence: "Bob is in the park. The answer
    is the park." to "Where is Eve?". It is wrong only in who it is about."""
    asked = qa.question.rstrip("?").split()
    p2 = rng.choice([p for p in s.people if p not in asked])
    if qa.answer.isdigit():
        obj = asked[2]
        return _response(str(s.count[p2, obj]), (_has(s, p2, obj),) if show_facts else ())
    return _response(f"the {s.place[p2]}", (_is_in(s, p2),) if show_facts else ())


def _rejected(s: _Scene, qa: _QA, rng: random.Random, config: WorldConfig) -> str:
    """A plausible but wrong response: the right facts with a wrong conclusion (off-by-few, another number,
    name or place from the scene), the facts of the wrong person, or rambling."""
    sup = qa.support if config.show_facts else ()
    others = [p for p in s.people if p != qa.answer]
    o = rng.choice(s.objects)
    rambles = [
        f"I think {rng.choice(s.people)} has some {o}.",
        f"Maybe {rng.choice(s.people)} is in the {rng.choice(PLACES)}.",
        "I am not sure about that.",
    ]
    options: list[str] = []
    if qa.difficulty == 0:  # a lookup answered from the wrong person's sentence
        options.append(_wrong_person(s, qa, rng, bool(sup)))
    if qa.answer.isdigit():
        n = int(qa.answer)
        delta = rng.choice((-3, -2, -1, 1, 2, 3))
        options += [_response(str(n + delta if n + delta >= 0 else n - delta), sup)] * 2
        scene_numbers = sorted({str(c) for c in s.count.values()} - {qa.answer})
        if scene_numbers:  # e.g. the right count for a different person
            options.append(_response(rng.choice(scene_numbers), sup))
        rambles.append(f"It could be {qa.answer} or {n + 1}.")
    elif qa.answer.startswith("the "):
        wrong = [p for p in PLACES if f"the {p}" != qa.answer]
        in_scene = [w for w in wrong if w in s.place.values()]
        options += [_response(f"the {rng.choice(in_scene or wrong)}", sup)] * 2
    else:
        options += [_response(rng.choice(others), sup)] * 2
    options.append(rng.choice(rambles))
    choice = rng.choice(options)
    return choice if gold_reward(qa.answer, choice) == 0.0 else "I am not sure about that."


def preference_pairs(
    n: int, split: str = "train", config: WorldConfig = WorldConfig(), wrong_person_rate: float = 0.0
) -> list[dict]:
    """Preference pairs for reward-model training.

    Args:
        n: Number of pairs.
        split: One of ``SPLITS``.
        config: World configuration.
        wrong_person_rate: Share of pairs made harder on purpose: a lookup question whose rejected reply is
            another person's true fact (:func:`_wrong_person`), the one mistake a reward model cannot tell by
            checking facts and arithmetic. ``0`` (the default) draws every pair as usual, where such pairs
            are about 5%; ``1`` gives only those.

    Returns:
        Dicts ``{"prompt", "chosen", "rejected", "answer", "difficulty"}``; ``chosen`` is the canonical correct
        response and ``rejected`` a plausible wrong one (gold reward 0), never equal to ``chosen``.
    """
    _check_n(n)
    if not 0.0 <= wrong_person_rate <= 1.0:
        raise ValueError(f"wrong_person_rate must be in [0, 1], got {wrong_person_rate}")
    rng = _rng("pref", split, config)
    hard_rng = _rng("pref-wrong-person", split, config)  # its own stream: rate 0 leaves the pairs unchanged
    out = []
    for _ in range(n):
        if wrong_person_rate and hard_rng.random() < wrong_person_rate:
            for _ in range(_MAX_TRIES):  # redraw while the other person's fact gives the same answer
                s = _scene(rng, split, config)
                qa = _ask(s, rng, (0,))
                rejected = _wrong_person(s, qa, rng, config.show_facts)
                if not gold_reward(qa.answer, rejected):
                    break
            else:
                raise RuntimeError(f"no wrong-person pair in {_MAX_TRIES} scenes of {config}")
        else:
            s = _scene(rng, split, config)
            qa = _ask(s, rng, config.difficulties)
            rejected = _rejected(s, qa, rng, config)
        pair = {"prompt": f"{s.text} {qa.question}", "chosen": _answer(qa, config), "rejected": rejected}
        out.append({**pair, "answer": qa.answer, "difficulty": qa.difficulty})
    return out


def rl_prompts(n: int, split: str = "test", config: WorldConfig = WorldConfig()) -> list[dict]:
    """Prompts with known answers for RL (PPO) and evaluation.

    Args:
        n: Number of prompts.
        split: One of ``SPLITS`` (default ``"test"``: held-out scenes).
        config: World configuration.

    Returns:
        Dicts ``{"prompt": str, "answer": str, "difficulty": int}``.
    """
    _check_n(n)
    rng = _rng("rl", split, config)
    out = []
    for _ in range(n):
        s = _scene(rng, split, config)
        qa = _ask(s, rng, config.difficulties)
        out.append({"prompt": f"{s.text} {qa.question}", "answer": qa.answer, "difficulty": qa.difficulty})
    return out


# ---- answer parsing and the gold reward ----


def normalize_answer(text: str) -> str:
    """Lower-case, replace punctuation by spaces, drop articles and collapse whitespace ("The Park!" -> "park")."""
    words = re.sub(r"[^0-9a-z]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def extract_answer(response: str) -> str | None:
    """Parse the (normalised) answer out of a model response.

    The answer is the first word after "answer is" (any case, optional colon, articles skipped), so
    "The answer is THE PARK. Bye" gives "park" and "the answer is 5 apples" gives "5". Without the anchor,
    only a bare answer counts: a number, a name or a place alone in the first sentence ("5.", "the park").

    Args:
        response: Text generated by a model.

    Returns:
        The normalised answer word, or ``None`` when nothing answer-like is found.
    """
    if not isinstance(response, str):
        return None
    match = _ANSWER_RE.search(response)
    if match:
        words = normalize_answer(re.split(r"[.!?;\n]", match.group(1), maxsplit=1)[0]).split()
        return words[0] if words else None
    words = normalize_answer(re.split(r"[.!?;\n]", response.strip(), maxsplit=1)[0]).split()
    if len(words) == 1 and (words[0].isdigit() or words[0] in _BARE_WORDS):
        return words[0]
    return None


def gold_reward(answer: str, response: str) -> float:
    """1.0 if the answer extracted from ``response`` equals ``answer`` after normalisation, else 0.0."""
    predicted = extract_answer(response)
    return 1.0 if predicted is not None and predicted == normalize_answer(answer) else 0.0


def gold_score(record: dict, response: str) -> float:
    """The gold reward as a scorer of ``(record, response)``: is ``record["answer"]`` what the reply says?

    This is the signature every scorer of the data layer has (``reward_fn`` / ``gold_fn`` of the RL stages).
    """
    return gold_reward(record["answer"], response)


SAMPLE_PROMPTS = ("Alice is in the", "Bob has 3")
"""Texts a pretraining run on tinyworld continues in its TensorBoard samples."""
