"""The yardsticks of the pipeline's summary: KL to the SFT policy measured on sampled replies, gold by
difficulty."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.evaluation import sampled_kl, score_by_difficulty
from lit_llm.tokenizer import Tokenizer

PROMPTS = ["Where is the cat?", "Who has 3 apples?", "Is Bob in the park?"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["Where is the cat? Bob has 3 apples in the park."] * 4, "char")


def _model(tok: Tokenizer, seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(
        "tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1
    )
    return Transformer(cfg).eval()


def test_sampled_kl_is_zero_against_itself_and_matches_a_hand_sum(tok):
    policy = _model(tok, 0)
    assert sampled_kl(policy, copy.deepcopy(policy), tok, PROMPTS, max_new_tokens=6) == pytest.approx(
        0.0, abs=1e-6
    )
    other = _model(tok, 1)
    kl = sampled_kl(
        policy, other, tok, PROMPTS[:1], max_new_tokens=6, generator=torch.Generator().manual_seed(3)
    )
    # by hand: sample the same reply with the same generator, then sum log p - log q token by token
    from lit_llm.backbone.generate import generate

    ids = tok.prompt_ids(PROMPTS[0])
    out = generate(
        policy,
        [ids],
        6,
        1.0,
        stop_tokens=[tok.end_id, tok.eos_id],
        pad_id=tok.pad_id,
        generator=torch.Generator().manual_seed(3),
    )
    reply = out.response_lists()[0]
    seq = torch.tensor([ids + reply])
    with torch.no_grad():
        lp = torch.log_softmax(policy(seq)[0].float(), -1)
        lq = torch.log_softmax(other(seq)[0].float(), -1)
    log_r = [float(lq[len(ids) + t - 1, i] - lp[len(ids) + t - 1, i]) for t, i in enumerate(reply)]
    want = sum(math.exp(x) - 1 - x for x in log_r)  # k3 per token
    assert kl == pytest.approx(want, abs=1e-4)
    assert kl != pytest.approx(0.0, abs=1e-3)


def test_score_by_difficulty_by_hand():
    records = [{"difficulty": 1}, {"difficulty": 1}, {"difficulty": 2}, {}]
    replies = ["yes", "no", "yes", "yes"]
    got = score_by_difficulty(records, replies, lambda r, y: float(y == "yes"))
    assert got == {0: 1.0, 1: 0.5, 2: 1.0}
