"""SFT: formats, label masks, packing, the stage, the chat command, bad records."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.cli import main
from lit_llm.data import tinyworld
from lit_llm.data.formats import RecordError, to_conversations
from lit_llm.data.sft import (
    SFTDataModule,
    collate_packed,
    collate_padded,
    pack,
    tokenize_conversation,
)
from lit_llm.losses import IGNORE_INDEX as IGNORE
from lit_llm.losses import masked_lm_loss
from lit_llm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(tinyworld.pretrain_text(200), "bpe", 400)


def test_label_mask_on_two_turns_with_system(tok):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "Bob"},
    ]
    x, y = tokenize_conversation(tok, conv)
    full = x + [y[-1]]
    # labels are the next token exactly where that next token is an assistant token or its closing <|end|>
    trained = [i + 1 for i, t in enumerate(y) if t != IGNORE]
    r, e = tok.role_ids, tok.end_id
    starts = [i for i, t in enumerate(full) if t == r["assistant"]]
    want = []
    for s in starts:
        n = full.index(e, s) - s  # reply tokens plus the <|end|>
        want += list(range(s + 1, s + 1 + n))
    assert trained == want
    assert [full[i] for i in trained] == tok.encode("Yes") + [e] + tok.encode("Bob") + [e]
    assert all(y[i - 1] == full[i] for i in trained)


def test_train_on_prompt_trains_every_next_token(tok):
    conv = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Bob"}]
    x, y = tokenize_conversation(tok, conv, train_on_prompt=True)
    masked_x, masked_y = tokenize_conversation(tok, conv)
    assert x == masked_x and y == x[1:] + [masked_y[-1]]  # every position predicts the token after it
    assert IGNORE not in y and IGNORE in masked_y
    dm = SFTDataModule(tokenizer=None, train_on_prompt=True, tinyworld_train=8, tinyworld_val=4)
    dm._tokenizer = tok
    (_, labels), *_ = dm.tokenize([conv], "train")
    assert labels == y


def test_every_format_renders_the_same_template(tok):
    want = [[{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]]
    records = [
        {"messages": want[0]},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Add 2 and 3.", "instances": [{"input": "", "output": "5"}]},
        {"prompt": "Add 2 and 3.", "completion": "5"},
        {"chosen": "\n\nHuman: Add 2 and 3.\n\nAssistant: 5"},
    ]
    for rec in records:
        convs = to_conversations(rec)
        assert convs == want, rec
        assert tok.render_chat(convs[0]) == tok.render_chat(want[0])
    alpaca_input = to_conversations({"instruction": "Sum.", "input": "2 3", "output": "5"})[0][0]["content"]
    assert alpaca_input == "Sum.\n\n2 3"


def test_packed_loss_equals_unpacked_loss(tok):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    ).eval()
    convs = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        for r in tinyworld.instructions(7)
    ]
    examples = [tokenize_conversation(tok, c) for c in convs]
    rows = pack(examples, 256)
    assert len(rows) < len(examples)  # several conversations per row
    packed = collate_packed(rows, 256, tok.pad_id)
    padded = collate_padded(examples, tok.pad_id)
    with torch.no_grad():
        lp, _ = masked_lm_loss(
            model(packed["input_ids"], packed["positions"], packed["attn_mask"]), packed["labels"]
        )
        lu, _ = masked_lm_loss(model(padded["input_ids"]), padded["labels"])
    torch.testing.assert_close(lp, lu, atol=1e-5, rtol=1e-5)


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def test_bad_records_are_named_or_counted(tmp_path, tok):
    tok.save(tmp_path / "tokenizer.json")
    good = {"prompt": "Hi", "completion": "Hello"}
    cases = [
        (
            {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
            "record 1: message 0 has role None",
        ),
        ({"prompt": "Hi", "completion": "  "}, "record 1: message 1: empty assistant turn"),
        ({"foo": 1}, "record 1: unknown format"),
    ]
    for bad, match in cases:
        src = _write(tmp_path / "d.jsonl", [good, bad, good, good])
        dm = SFTDataModule(src, tokenizer=str(tmp_path / "tokenizer.json"))
        with pytest.raises(RecordError, match=match):
            dm.setup()
        dm = SFTDataModule(src, tokenizer=str(tmp_path / "tokenizer.json"), skip_bad_records=True)
        dm.setup()
        assert dm.stats["bad_records_skipped"] == 1
    long = {"prompt": "word " * 200, "completion": "ok"}
    src = _write(tmp_path / "l.jsonl", [good, long, good, good, long, good, good, good, good, good])
    dm = SFTDataModule(src, tokenizer=str(tmp_path / "tokenizer.json"), seq_len=64, val_fraction=0.1)
    dm.setup()
    assert dm.stats["train_too_long_dropped"] == 2 and len(dm.train_examples) == 7
    with pytest.raises(ValueError, match="set --model.init_from"):
        SFTDataModule().setup()


@pytest.fixture(scope="module")
def sft_run(sft_ckpt):
    return sft_ckpt.parents[2]


def test_sft_lowers_masked_loss_and_logs_exact_match(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = next((sft_run / "checkpoints/logs/sft").glob("version_*"))
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    train = [e.value for e in ea.Scalars("train/loss")]
    val = [e.value for e in ea.Scalars("val/loss")]
    assert len(val) >= 2 and val[-1] < val[0]
    assert train[-1] < train[0]
    assert "val/exact_match" in ea.Tags()["scalars"]
    from lit_llm.checkpoint import read_meta

    assert read_meta(sft_run / "checkpoints/sft/last.ckpt")["stage"] == "sft"


def test_chat_answers_a_scripted_turn(sft_run, monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("Alice is in the park. Alice has 3 cups. Where is Alice?\n/exit\n")
    )
    main(["chat", "--ckpt", str(sft_run / "checkpoints/sft/last.ckpt"), "--max_new_tokens", "16"])
    out = capsys.readouterr().out
    assert out.startswith("assistant> ") and len(out.strip()) > len("assistant>")


def test_logged_exact_match_equals_a_recomputation(sft_run):
    """``val/exact_match`` is the gold score of the final model's greedy replies to the held-out prompts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_llm.checkpoint import load_backbone
    from lit_llm.evaluation import gold_score

    logdir = next((sft_run / "checkpoints/logs/sft").glob("version_*"))
    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    logged = ea.Scalars("val/exact_match")[-1]
    assert logged.step == 39  # the last validation (step 40, logged 0-based): the weights of last.ckpt
    model, tok, _ = load_backbone(sft_run / "checkpoints/sft/last.ckpt")
    # the fixture's --data.tinyworld_eval 16 held-out prompts of the default world, replies of at most 48 tokens
    records = tinyworld.rl_prompts(16, "val", tinyworld.WorldConfig(seed=0))
    score, replies = gold_score(model.eval(), tok, records, tinyworld.gold_score, max_new_tokens=48)
    assert len(replies) == 16
    assert abs(logged.value - score) < 1e-6, (logged.value, score, replies[:4])
    # a tiny model's score may well be 0: the replies themselves must match too (the first four are logged)
    sample = ea.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    want = "\n\n".join(f"**{r['prompt']}** → {c}" for r, c in zip(records[:4], replies))
    assert sample == want.replace("\n", "  \n")
