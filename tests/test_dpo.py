"""DPO: pairs that share their prompt under truncation, reply-only log-probs, a frozen reference, learning
tinyworld preferences from a tiny SFT checkpoint, and a fit through the CLI. The loss math is in
test_losses.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.checkpoint import META_KEY, load_checkpoint, load_for_inference, read_meta
from lit_llm.cli import main
from lit_llm.data.formats import RecordError
from lit_llm.data.preference import PreferenceDataModule
from lit_llm.errors import CheckpointError, UserError
from lit_llm.losses import IGNORE_INDEX as IGNORE
from lit_llm.losses import dpo_loss, sequence_logprobs
from lit_llm.stages.dpo import DPOModule
from lit_llm.tokenizer import Tokenizer

from .conftest import QUIET, ROOT

NO_TRAINER_LOG = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture
def char_tok(tmp_path) -> tuple[Tokenizer, str]:
    """A character tokenizer (one token per character: lengths are easy to count) and its file."""
    tok = Tokenizer.train(
        ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?0123456789"], kind="char"
    )
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    return tok, str(path)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _rows(batch: dict[str, torch.Tensor], i: int) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of row ``i``: the reply is what the labels score."""
    ids, labels = batch["input_ids"][i], batch["labels"][i]
    scored = (labels != IGNORE).nonzero().flatten().tolist()
    start, end = scored[0] + 1, scored[-1] + 2
    assert labels[scored[0] : scored[-1] + 1].tolist() == ids[start:end].tolist()
    assert ids[end:].tolist() == [] or not batch["valid"][i, end:].any()
    return ids[:start].tolist(), ids[start:end].tolist()


def test_chosen_and_rejected_share_the_prompt_when_truncated(char_tok):
    tok, path = char_tok
    dm = PreferenceDataModule(tokenizer=path, pairs_for="dpo", seq_len=20)
    prompt = tok.render_chat(_user("abcdefghij"), add_generation_prompt=True)[0]  # bos user 10 end asst
    assert len(prompt) == 14
    items = [
        (_user("abcdefghij"), "long reply!!", "no"),  # 14 + 13 > 20: the prompt loses 7 tokens, both rows
        (_user("abcdefghij"), "x" * 30, "short"),  # a reply too long alone: prompt -> <|assistant|>, cut end
        (_user("abc"), "fits", "fits too"),  # 7 + 9 <= 20: untouched
    ]
    batch = dm.collate(dm.tokenize(items, "train"))
    assert dm.stats["train_truncated"] == 2
    (pc, c), (pr, r) = _rows(batch, 0), _rows(batch, 3)
    assert pc == pr == prompt[7:]  # the same prompt tokens: its last 7
    assert c == tok.encode("long reply!!") + [tok.end_id] and r == tok.encode("no") + [tok.end_id]
    (pc, c), (pr, r) = _rows(batch, 1), _rows(batch, 4)
    assert pc == pr == [tok.role_ids["assistant"]]
    assert c == tok.encode("x" * 19) and r == tok.encode("short") + [tok.end_id]
    (pc, c), (pr, r) = _rows(batch, 2), _rows(batch, 5)
    assert pc == pr == tok.render_chat(_user("abc"), add_generation_prompt=True)[0]
    assert c == tok.encode("fits") + [tok.end_id] and r == tok.encode("fits too") + [tok.end_id]
    assert max(batch["valid"].sum(-1).tolist()) <= 20


def test_only_reply_tokens_are_scored(char_tok):
    tok, path = char_tok
    dm = PreferenceDataModule(tokenizer=path, pairs_for="dpo", seq_len=64)
    # a dialogue: the earlier assistant turn belongs to the prompt and is never scored
    prompt = [*_user("hi"), {"role": "assistant", "content": "hello"}, *_user("joke?")]
    batch = dm.collate(dm.tokenize([(prompt, "why not.", "no."), (_user("ab"), "yes", "n")], "train"))
    labelled = [[t for t in row if t != IGNORE] for row in batch["labels"].tolist()]
    assert labelled == [tok.encode(x) + [tok.end_id] for x in ("why not.", "yes", "no.", "n")]
    # chosen_labels (the reward model's lm_coef term) keep SFT's labels: every assistant turn
    assert [t for t in batch["chosen_labels"][0].tolist() if t != IGNORE] == [
        *tok.encode("hello"),
        tok.end_id,
        *tok.encode("why not."),
        tok.end_id,
    ]
    # by hand: the log-prob of each reply given its prompt, each row alone and unpadded
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=4, n_kv_head=2))
    got = sequence_logprobs(model(batch["input_ids"]), batch["labels"])
    for i in range(4):
        prompt_ids, reply = _rows(batch, i)
        seq = prompt_ids + reply
        logp = model(torch.tensor([seq]))[0].log_softmax(-1)
        want = sum(logp[t - 1, seq[t]].item() for t in range(len(prompt_ids), len(seq)))
        assert got[i].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_bad_pairs_are_counted_or_reported(char_tok, tmp_path):
    _, path = char_tok
    good = [{"prompt": f"q{i}", "chosen": "yes.", "rejected": "no."} for i in range(4)]
    same = {"prompt": "q", "chosen": "same", "rejected": " same "}
    apart = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], same, apart, *good[2:]]))
    with pytest.raises(RecordError, match=r"record 3: chosen and rejected do not share"):
        PreferenceDataModule(source=str(src), tokenizer=path, pairs_for="dpo").items()
    dm = PreferenceDataModule(source=str(src), tokenizer=path, pairs_for="dpo", skip_bad_records=True)
    train, val = dm.items()
    assert dm.stats["bad_records_skipped"] == 1
    dm.tokenize(train + val, "train")
    assert dm.stats["train_identical_dropped"] == 1
    with pytest.raises(UserError, match="pairs_for"):
        PreferenceDataModule(pairs_for="ppo")


def _trainer(max_steps: int, **kwargs):
    from lightning import Trainer

    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _dm(sft_ckpt, **kwargs) -> PreferenceDataModule:
    kwargs = {"tinyworld_train": 64, "tinyworld_val": 16, "tinyworld_eval": 0, "batch_size": 8, **kwargs}
    return PreferenceDataModule(tokenizer=str(sft_ckpt), pairs_for="dpo", seq_len=128, **kwargs)


def test_the_reference_stays_frozen(sft_ckpt):
    from lightning import Callback

    class Watch(Callback):
        modes: list[bool] = []

        def on_train_batch_end(self, trainer, module, *args) -> None:
            self.modes.append(module.ref.training)

    module = DPOModule(init_from=str(sft_ckpt), learning_rate=1e-2, warmup_steps=0)
    ref0 = {k: v.clone() for k, v in module.ref.state_dict().items()}
    policy0 = {k: v.clone() for k, v in module.model.state_dict().items()}
    watch = Watch()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _trainer(3, callbacks=[watch], limit_val_batches=1, val_check_interval=2).fit(module, _dm(sft_ckpt))
    assert watch.modes == [False] * 3  # in eval mode through training and validation
    # frozen on purpose: Lightning's "module(s) in eval mode" warning is quieted ...
    assert not [w for w in seen if "in eval mode" in str(w.message)]
    module.train()  # as a training loop does (Lightning before 2.2, a hand-written loop)
    assert module.model.training and not module.ref.training
    assert not any(p.requires_grad for p in module.ref.parameters())
    for k, v in module.ref.state_dict().items():
        torch.testing.assert_close(v, ref0[k], rtol=0, atol=0)
    assert any(not torch.equal(v, policy0[k]) for k, v in module.model.state_dict().items())


def test_a_trainable_module_left_in_eval_mode_still_warns(sft_ckpt):
    module = DPOModule(init_from=str(sft_ckpt), learning_rate=1e-2, warmup_steps=0)
    module.model.eval()  # the policy, which trains: a mistake Lightning should still point out
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _trainer(1, limit_val_batches=0).fit(module, _dm(sft_ckpt))
    assert [w for w in seen if "in eval mode" in str(w.message)]


@NO_TRAINER_LOG
def test_dpo_learns_tinyworld_preferences(sft_ckpt):
    torch.manual_seed(0)
    dm = _dm(sft_ckpt, tinyworld_train=320, tinyworld_val=64, batch_size=16)
    dm.setup("fit")
    module = DPOModule(init_from=str(sft_ckpt), beta=0.1)
    val = dm.collate(dm.val_examples)

    @torch.no_grad()
    def held_out() -> dict[str, float]:
        module.eval()
        policy = sequence_logprobs(module.model(val["input_ids"]), val["labels"])
        ref = sequence_logprobs(module.ref(val["input_ids"]), val["labels"])
        B = policy.shape[0] // 2
        _, stats = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta=0.1)
        return {k: float(v) for k, v in stats.items()}

    before = held_out()
    assert before["margin"] == 0.0  # the policy starts as the reference
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    module.train()
    for batch in dm.train_dataloader():
        opt.zero_grad()
        module._step(batch, "train").backward()
        opt.step()
    after = held_out()
    assert after["margin"] > 0.05 and after["acc"] > 0.7, after


def test_reference_with_another_tokenizer_is_refused(sft_ckpt, char_tok, tmp_path):
    ckpt = load_checkpoint(sft_ckpt)
    ckpt[META_KEY] = {**ckpt[META_KEY], "tokenizer": char_tok[0].to_str()}
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(CheckpointError, match="different tokenizer"):
        DPOModule(init_from=str(sft_ckpt), ref_from=str(other))
    DPOModule(init_from=str(sft_ckpt), ref_from=str(sft_ckpt))  # the same tokenizer is fine


def test_fit_and_validate_through_the_cli(sft_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs/dpo/tinyworld.yaml")
    args = [
        *QUIET,
        "--model.init_from",
        str(sft_ckpt),
        "--trainer.precision",
        "32-true",
        "--data.tinyworld_train",
        "64",
        "--data.tinyworld_val",
        "16",
        "--data.tinyworld_eval",
        "8",
        "--data.batch_size",
        "8",
    ]
    main(["fit", "--config", cfg, *args, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"])
    ckpt = tmp_path / "checkpoints/dpo/last.ckpt"
    assert read_meta(ckpt)["stage"] == "dpo"
    load_for_inference(str(ckpt))  # a chat policy, usable by lit-llm chat / generate
    capsys.readouterr()
    main(["validate", "--config", cfg, *args, "--ckpt_path", str(ckpt)])
    out = capsys.readouterr().out
    for metric in ("val/exact_match", "val/acc", "val/margin", "val/reward_chosen", "val/reward_rejected"):
        assert metric in out, out
    with pytest.raises(UserError, match="pairs_for dpo"):
        main(["fit", "--config", cfg, *args, "--data.pairs_for", "reward", "--trainer.max_steps", "1"])


def test_held_out_prompts_of_a_file_skip_bad_records_and_read_message_prompts(tmp_path):
    import json

    from lit_llm.data.formats import RecordError
    from lit_llm.data.preference import PreferenceDataModule

    good = {
        "prompt": [{"role": "user", "content": "Where is Bob?"}],
        "chosen": "park",
        "rejected": "shop",
        "answer": "park",
    }
    bad = {"chosen": 3, "rejected": "shop"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] * 8 + [bad, good]) + "\n")
    kw = dict(
        source=str(path), gold_fn="lit_llm.data.tinyworld:gold_score", val_fraction=0.2, tinyworld_eval=5
    )
    dm = PreferenceDataModule(skip_bad_records=True, **kw)
    prompts = dm.eval_prompts()
    assert [p["prompt"] for p in prompts] == ["Where is Bob?"] and prompts[0]["answer"] == "park"
    with pytest.raises(RecordError, match="held-out record 0"):
        PreferenceDataModule(**kw).eval_prompts()
