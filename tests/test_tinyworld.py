"""Tests for lit_llm.data.tinyworld: determinism, streaming, split hygiene, correctness and the gold reward."""

from __future__ import annotations

import hashlib
import json
import re
import statistics

import pytest

from lit_llm.data.tinyworld import (
    SPLITS,
    WorldConfig,
    extract_answer,
    gold_reward,
    instructions,
    normalize_answer,
    preference_pairs,
    pretrain_text,
    rl_prompts,
)

GENERATORS = (pretrain_text, instructions, preference_pairs, rl_prompts)


def _prompt_of(item: str | dict) -> str:
    return item if isinstance(item, str) else item["prompt"]


def _scene_of(text: str) -> str:
    """The scene sentences of a prompt or document (facts, questions and answers left out)."""
    return " ".join(re.findall(r"\w+ (?:is in the \w+|has \d+ \w+)\.", text))


def _solve(prompt: str) -> str:
    """Independently recompute the answer by parsing the scene sentences and the question with regexes."""
    place = dict(re.findall(r"(\w+) is in the (\w+)\.", prompt))
    count: dict[tuple[str, str], int] = {}
    for name, n, noun in re.findall(r"(\w+) has (\d+) (\w+)\.", prompt):
        count[name, noun if noun.endswith("s") else noun + "s"] = int(n)
    question = prompt.rsplit(". ", 1)[1]
    if m := re.fullmatch(r"How many (\w+) does (\w+) have\?", question):
        return str(count[m[2], m[1]])
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return f"the {place[m[1]]}"
    if m := re.fullmatch(r"How many (\w+) do (\w+) and (\w+) have together\?", question):
        return str(count[m[2], m[1]] + count[m[3], m[1]])
    if m := re.fullmatch(r"How many more (\w+) does (\w+) have than (\w+)\?", question):
        diff = count[m[2], m[1]] - count[m[3], m[1]]
        assert diff >= 0, question
        return str(diff)
    if m := re.fullmatch(r"How many people are in the (\w+)\?", question):
        return str(sum(p == m[1] for p in place.values()))
    if m := re.fullmatch(r"How many (\w+) do (\w+), (\w+) and (\w+) have together\?", question):
        return str(sum(count[name, m[1]] for name in (m[2], m[3], m[4])))
    if m := re.fullmatch(r"Who has the most (\w+)\?", question):
        ranked = sorted(((n, name) for (name, noun), n in count.items() if noun == m[1]), reverse=True)
        assert ranked[0][0] > ranked[1][0], "most-question asked with a tie"
        return ranked[0][1]
    raise AssertionError(f"unknown question: {question!r}")


@pytest.mark.parametrize("fn", GENERATORS)
def test_deterministic_and_streaming_prefix(fn):
    big = fn(40, "train", WorldConfig(seed=3))
    assert big == fn(40, "train", WorldConfig(seed=3))
    assert fn(7, "train", WorldConfig(seed=3)) == big[:7]
    assert fn(0) == []
    assert big != fn(40, "train", WorldConfig(seed=4))


def test_deterministic_golden_value():
    # Guards against accidental use of salted hash() or unseeded randomness: fixed across machines and runs.
    assert instructions(1)[0] == {
        "prompt": "Alice is in the park. Alice has 9 cups. Dan is in the park. Dan has 1 cup. "
        "Gus is in the park. Gus has 4 cups. How many cups does Alice have?",
        "response": "Alice has 9 cups. The answer is 9.",
        "answer": "9",
        "difficulty": 0,
        "hedged": False,
    }


@pytest.mark.parametrize("fn", GENERATORS)
def test_splits_disjoint(fn):
    sizes = {"train": 10_000, "val": 1000, "test": 1000}
    if fn is pretrain_text:
        sizes = {"train": 4000, "val": 500, "test": 500}
    items = {split: fn(n, split) for split, n in sizes.items()}
    # No scene (the "X is in the Y. X has N objects." sentences) is shared between splits ...
    scenes = {split: {_scene_of(_prompt_of(x)) for x in xs} for split, xs in items.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not scenes[a] & scenes[b], (a, b)
    # ... hence no held-out prompt ever appears in train.
    if fn is not pretrain_text:
        train = {x["prompt"] for x in items["train"]}
        assert not train & {x["prompt"] for x in items["val"] + items["test"]}


def test_held_out_rl_prompts_not_in_any_train_data():
    train = {x["prompt"] for x in instructions(10_000)} | {x["prompt"] for x in preference_pairs(5000)}
    for split in ("val", "test"):
        assert not {x["prompt"] for x in rl_prompts(1000, split)} & train


@pytest.mark.parametrize(
    "config", [WorldConfig(), WorldConfig(seed=1, n_people=2), WorldConfig(n_people=5, n_objects=2)]
)
def test_every_answer_is_correct(config):
    items = instructions(600, "train", config) + rl_prompts(300, "test", config)
    for item in items:
        assert _solve(item["prompt"]) == item["answer"], item
        assert item["difficulty"] in config.difficulties
    for item in instructions(300, "val", config):
        if item["hedged"]:
            assert gold_reward(item["answer"], item["response"]) == 0.0, item
        else:
            assert item["response"].endswith(f"The answer is {item['answer']}.")
            for sentence in item["response"].split(". ")[:-1]:  # the restated facts are the scene's own
                assert sentence + "." in item["prompt"], item
            assert gold_reward(item["answer"], item["response"]) == 1.0


def test_hedged_demonstrations_follow_the_rates():
    items = instructions(3000, "train", WorldConfig(hedge_rates=(0.0, 0.5, 1.0)))
    by = {d: [x["hedged"] for x in items if x["difficulty"] == d] for d in (0, 1, 2)}
    assert not any(by[0]) and all(by[2]) and 0.45 < sum(by[1]) / len(by[1]) < 0.55
    plain = instructions(200, "train", WorldConfig(hedge_rates=(0.0, 0.0, 0.0)))
    assert [x["prompt"] for x in plain] == [x["prompt"] for x in items[:200]]  # hedging never moves prompts
    with pytest.raises(ValueError, match="hedge_rates"):
        WorldConfig(hedge_rates=(0.1, 2.0, 0.0))


def test_difficulty_selection():
    for d in (0, 1, 2):
        items = rl_prompts(50, "test", WorldConfig(difficulties=(d,)))
        assert {x["difficulty"] for x in items} == {d}
    mixed = instructions(300)
    assert {x["difficulty"] for x in mixed} == {0, 1, 2}


def test_preference_pairs_reward_separates():
    pairs = preference_pairs(400, "train") + preference_pairs(100, "val", WorldConfig(n_people=2))
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"]
        assert _solve(pair["prompt"]) == pair["answer"]
        assert gold_reward(pair["answer"], pair["chosen"]) == 1.0
        assert gold_reward(pair["answer"], pair["rejected"]) == 0.0, pair
    # rejected responses are varied: wrong answers in the canonical format and badly formatted ones
    canonical = sum("The answer is" in p["rejected"] for p in pairs)
    assert 0.4 * len(pairs) < canonical < 0.95 * len(pairs)


def test_wrong_person_rate_draws_that_mistake_and_leaves_the_default_alone():
    # rate 0 draws exactly the pairs tinyworld drew before the option existed (md5 measured before the change)
    default = json.dumps(preference_pairs(3000, "val", wrong_person_rate=0.0)).encode()
    assert hashlib.md5(default).hexdigest() == "1bcbb561249cf716651e496c151fbf8f"
    hard = preference_pairs(300, "train", wrong_person_rate=1.0)
    for pair in hard:
        assert pair["difficulty"] == 0 and _solve(pair["prompt"]) == pair["answer"]
        assert gold_reward(pair["answer"], pair["chosen"]) == 1.0
        assert gold_reward(pair["answer"], pair["rejected"]) == 0.0, pair
        facts, answer = pair["rejected"].removesuffix(".").split(" The answer is ")
        person = facts.split()[0]
        assert facts in pair["prompt"] and person not in pair["prompt"].rsplit(". ", 1)[1], pair
        # the rejected answer is what that person's sentence says
        assert answer in facts
    shares = []
    for rate in (0.0, 0.3):
        pairs = preference_pairs(2000, "train", wrong_person_rate=rate)
        shares.append(
            sum(
                p["chosen"].split()[0] != p["rejected"].split()[0]
                and "The answer is" in p["rejected"]
                and p["difficulty"] == 0
                for p in pairs
            )
            / len(pairs)
        )
    assert 0.02 < shares[0] < 0.09 and 0.3 < shares[1] < 0.4, shares
    with pytest.raises(ValueError, match="wrong_person_rate"):
        preference_pairs(1, wrong_person_rate=1.5)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is 5.", "5"),
        ("the answer is THE PARK", "park"),
        ("The answer is the park. Then the cat slept.", "park"),
        ("The answer is 12 apples, I think", "12"),
        ("  THE ANSWER IS: Alice!!! blah blah", "alice"),
        ("Hmm. So the answer is 7", "7"),
        ("5.", "5"),
        ("the garden", "garden"),
        ("Bob", "bob"),
    ],
)
def test_extract_answer_tolerant(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        "",
        "   ",
        "banana",
        "I am not sure about that.",
        "Alice has 3 apples.",
        "The answer is",
        "answer is ?!",
    ],
)
def test_extract_answer_none_on_garbage(response):
    assert extract_answer(response) is None


def test_gold_reward():
    assert gold_reward("5", "The answer is 5.") == 1.0
    assert gold_reward("the park", "the answer is PARK") == 1.0
    assert gold_reward("the park", "The answer is the garden.") == 0.0
    assert gold_reward("Alice", "The answer is alice.") == 1.0
    assert gold_reward("5", "The answer is 15.") == 0.0
    assert gold_reward("5", "It could be 5 or 6.") == 0.0
    assert gold_reward("5", "") == 0.0
    assert normalize_answer("The Park!") == "park"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_people": 1}, "n_people"),
        ({"n_people": 9}, "n_people"),
        ({"n_objects": 0}, "n_objects"),
        ({"max_count": 1}, "max_count"),
        ({"difficulties": ()}, "difficulties"),
        ({"difficulties": (0, 3)}, "difficulties"),
        ({"difficulties": (1, 1)}, "difficulties"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)


def test_bad_split_and_n():
    with pytest.raises(ValueError, match="split"):
        instructions(3, "dev")
    with pytest.raises(ValueError, match="n must be"):
        rl_prompts(-1)
    assert set(SPLITS) == {"train", "val", "test"}


def test_vocabulary_small_and_docs_short():
    docs = pretrain_text(2000)
    vocab = {w.lower() for doc in docs for w in re.findall(r"[A-Za-z]+|\d+", doc)}
    assert len(vocab) < 150, sorted(vocab)
    assert statistics.mean(len(doc.split()) for doc in docs) < 130
    one_qa = pretrain_text(2000, config=WorldConfig(qa_per_doc=1, show_facts=False))
    assert statistics.mean(len(doc.split()) for doc in one_qa) < 60
    assert statistics.mean(doc.count(" Q: ") for doc in docs) > 2.5  # three question lines, rarely a repeat
    assert all(" Q: " in doc and " A: " in doc and "The answer is " in doc for doc in docs)
