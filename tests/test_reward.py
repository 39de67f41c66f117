"""Reward model: pooling under both paddings, the loss by hand, learning tinyworld preferences."""

from __future__ import annotations

import math

import pytest
import torch

from lit_llm.backbone import ModelConfig, Transformer
from lit_llm.backbone.heads import ScalarHeadModel
from lit_llm.backbone.masks import last_token_index
from lit_llm.checkpoint import load_backbone
from lit_llm.cli import main
from lit_llm.data.preference import collate_pairs, render_pair, split_pair
from lit_llm.data.sft import tokenize_conversation
from lit_llm.evaluation import RewardModel
from lit_llm.losses import IGNORE_INDEX as IGNORE
from lit_llm.losses import bradley_terry_loss
from lit_llm.stages.reward import RewardModule

from .conftest import QUIET, ROOT


def test_last_token_index_both_paddings():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_pooled_score_ignores_padding_side():
    torch.manual_seed(0)
    rm = ScalarHeadModel(Transformer(ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4))).eval()
    seq = torch.tensor([5, 9, 11, 3])
    alone = rm(seq[None], torch.ones(1, 4, dtype=torch.bool))
    right = rm(torch.tensor([[5, 9, 11, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool))
    left = rm(torch.tensor([[0, 0, 5, 9, 11, 3]]), torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    # the head reads the hidden state at the last real token
    hidden = rm.model.hidden(seq[None])[0, -1]
    torch.testing.assert_close(alone[0], rm.value_head(hidden)[0], atol=1e-5, rtol=1e-5)


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    want = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, rel=1e-6)
    with_margin = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(1.5)))) / 2
    assert bradley_terry_loss(rc, rr, margin=0.5).item() == pytest.approx(with_margin, rel=1e-6)
    centered = want + 0.1 * ((3.0**2 + 2.0**2) / 2)
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(centered, rel=1e-6)


def test_hh_dialogues_split_at_the_last_assistant_turn():
    rec = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Why did the chicken...",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No.",
    }
    prompt, chosen, rejected = split_pair(rec)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert (chosen, rejected) == ("Why did the chicken...", "No.")


def test_reward_model_learns_tinyworld_preferences(sft_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs/reward/tinyworld.yaml")
    args = [
        *QUIET,
        "--model.init_from",
        str(sft_ckpt),
        "--trainer.precision",
        "32-true",
        "--data.tinyworld_train",
        "1600",
        "--data.tinyworld_val",
        "128",
        "--model.learning_rate",
        "0.003",
    ]
    main(["fit", "--config", cfg, *args, "--trainer.max_steps", "50", "--trainer.val_check_interval", "50"])
    ckpt = tmp_path / "checkpoints/reward/last.ckpt"
    capsys.readouterr()
    main(["validate", "--config", cfg, *args, "--ckpt_path", str(ckpt)])
    out = capsys.readouterr().out
    acc = float(out.split("val/acc")[1].split()[1])
    assert acc > 0.6, out  # chance is 0.5; format errors are learnt first, arithmetic later
    rm, tok = RewardModel.load(str(ckpt))
    from lit_llm.data import tinyworld

    pairs = tinyworld.preference_pairs(64, "test")
    good = rm.score(tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    bad = rm.score(tok, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert (good > bad).float().mean() > 0.6


def _pair_batch(tok, prompts, chosen, rejected, max_len=128):
    pairs = []
    for p, c, r in zip(prompts, chosen, rejected):
        msgs = [{"role": "user", "content": p}]
        c_ids, c_mask, _ = render_pair(tok, msgs, c, max_len)
        pairs.append((c_ids, render_pair(tok, msgs, r, max_len)[0], c_mask))
    return collate_pairs(pairs, tok.pad_id)


def test_chosen_labels_are_the_sft_labels_of_the_chosen_reply(sft_ckpt):
    _, tok, _ = load_backbone(str(sft_ckpt))
    prompts, chosen = ["Where is Bob?", "How many cats does Eve have?"], ["Bob is in the park.", "3"]
    batch = _pair_batch(tok, prompts, chosen, ["No idea at all, sorry.", "Eve has cats."])
    for i, (p, c) in enumerate(zip(prompts, chosen)):
        _, want = tokenize_conversation(
            tok, [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        )
        got = batch["chosen_labels"][i].tolist()
        assert got[: len(want)] == want and set(got[len(want) :]) <= {IGNORE}
        # exactly the reply's tokens and its <|end|> are labelled
        assert [t for t in got if t != IGNORE] == [*tok.encode(c), tok.end_id]
    # a pair cut to its last tokens keeps the labels of what is left
    c_ids, c_mask, cut = render_pair(tok, [{"role": "user", "content": "x " * 50}], "Bob is in the park.", 16)
    assert (
        cut and len(c_ids) == len(c_mask) == 16 and sum(c_mask) == len(tok.encode("Bob is in the park.")) + 1
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_lm_coef_adds_the_next_token_loss_of_the_chosen_reply(sft_ckpt):
    from lit_llm.data import tinyworld

    torch.manual_seed(0)
    pairs = tinyworld.preference_pairs(6, "val")
    pure = RewardModule(init_from=str(sft_ckpt)).eval()
    mixed = RewardModule(init_from=str(sft_ckpt), lm_coef=0.5).eval()
    mixed.load_state_dict(pure.state_dict())
    tok = pure.tokenizer
    batch = _pair_batch(tok, *([p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")))
    with torch.no_grad():
        bt, total = pure._step(batch, "val"), mixed._step(batch, "val")
        # by hand: full-vocabulary logits of the plain LM forward on each chosen conversation alone,
        # cross-entropy of each reply token (and <|end|>) given everything before it
        nll, n = 0.0, 0
        for p in pairs:
            ids, mask = tok.render_chat(
                [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]
            )
            logp = pure.model(torch.tensor([ids]))[0].float().log_softmax(-1)
            for t in range(1, len(ids)):
                if mask[t]:
                    nll, n = nll - logp[t - 1, ids[t]].item(), n + 1
    assert total.item() == pytest.approx(bt.item() + 0.5 * nll / n, rel=1e-4)
    with pytest.raises(ValueError, match="lm_coef"):
        RewardModule(init_from=str(sft_ckpt), lm_coef=-1.0)


def test_wrong_person_pairs_go_to_training_only():
    from lit_llm.data import tinyworld
    from lit_llm.data.preference import PreferenceDataModule

    dm = PreferenceDataModule(tinyworld_train=200, tinyworld_val=50, tinyworld_wrong_person=1.0)
    train, val = dm.items()
    want_train = tinyworld.preference_pairs(200, "train", wrong_person_rate=1.0)
    assert [t[2] for t in train] == [p["rejected"] for p in want_train]
    assert [t[2] for t in val] == [p["rejected"] for p in tinyworld.preference_pairs(50, "val")]
    with pytest.raises(ValueError, match="tinyworld_wrong_person"):
        PreferenceDataModule(tinyworld_wrong_person=-0.1)


def test_two_step_tinyworld_recipe_chains(sft_ckpt, tmp_path, monkeypatch):
    """configs/reward/tinyworld-person.yaml, then tinyworld-long.yaml from its last.ckpt (by default)."""
    monkeypatch.chdir(tmp_path)
    fast = [
        *QUIET,
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--data.tinyworld_train",
        "64",
        "--data.tinyworld_val",
        "16",
    ]
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/reward/tinyworld-person.yaml"),
            *fast,
            "--model.init_from",
            str(sft_ckpt),
        ]
    )
    step1 = tmp_path / "checkpoints/reward-person/last.ckpt"
    assert step1.is_file()
    main(["fit", "--config", str(ROOT / "configs/reward/tinyworld-long.yaml"), *fast])
    from lit_llm.checkpoint import load_checkpoint

    step2 = load_checkpoint(str(tmp_path / "checkpoints/reward/last.ckpt"))
    assert step2["hyper_parameters"]["init_from"] == "checkpoints/reward-person/last.ckpt"
    RewardModel.load(str(tmp_path / "checkpoints/reward/last.ckpt"))  # a reward model usable on its own
