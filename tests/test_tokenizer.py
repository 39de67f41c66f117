"""Tokenizer: training, round trips, special tokens, chat template masks."""

from __future__ import annotations

import pytest

from lit_llm.data import tinyworld
from lit_llm.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(tinyworld.pretrain_text(300), "bpe", 400)


def test_special_tokens_take_the_first_ids(bpe):
    assert [bpe.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.end_id) == (0, 1, 2, 6)


@pytest.mark.parametrize("text", ["Alice has 3 apples.", "héllo wörld ✓ 12345\n\ttabs", "Zebra? QUIZ!"])
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges(bpe):
    text = "Alice is in the garden. Bob has 3 apples."
    assert len(bpe.encode(text)) < len(text.encode()) / 2


def test_special_tokens_stay_whole(bpe):
    ids = bpe.encode("Hi<|user|>there<|end|>")
    assert bpe.role_ids["user"] in ids and bpe.end_id in ids
    assert bpe.decode(ids, skip_special=False) == "Hi<|user|>there<|end|>"
    assert bpe.decode(ids) == "Hithere"


def test_char_tokenizer_round_trip_and_unknown():
    tok = Tokenizer.train(["abc\nab"], "char")
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + 4  # specials, unk, {a, b, c, \n}
    ids = tok.encode("cab\n")
    assert len(ids) == 4 and tok.decode(ids) == "cab\n"
    assert tok.decode(tok.encode("abz"), skip_special=False) == "ab<|unk|>"


def test_save_load_and_from_str(tmp_path, bpe):
    bpe.save(tmp_path / "t" / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "t")
    assert again.encode("Bob has 4 cups.") == bpe.encode("Bob has 4 cups.")
    assert Tokenizer.from_str(bpe.to_str()).vocab_size == bpe.vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.json")


def test_chat_template_and_mask(bpe):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yes"},
    ]
    ids, mask = bpe.render_chat(msgs)
    sys_ids, hi, yes = bpe.encode("Be brief."), bpe.encode("Hi"), bpe.encode("Yes")
    r = bpe.role_ids
    want = [
        bpe.bos_id,
        r["system"],
        *sys_ids,
        bpe.end_id,
        r["user"],
        *hi,
        bpe.end_id,
        r["assistant"],
        *yes,
        bpe.end_id,
    ]
    assert ids == want
    assert mask == [False] * (len(want) - len(yes) - 1) + [True] * (len(yes) + 1)
    with pytest.raises(ValueError, match="message 0: role must be one of"):
        bpe.render_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="at least 263 tokens"):
        Tokenizer.train(["x"], "bpe", 100)
