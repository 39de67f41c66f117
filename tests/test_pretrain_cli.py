"""Pretraining data and the CLI: fit, validate, generate from the checkpoint; configs parse; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_llm.checkpoint import read_meta
from lit_llm.cli import main
from lit_llm.data.text import TextDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
FAST = [
    "--trainer.max_steps",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.val_check_interval",
    "1",
    "--trainer.precision",
    "32-true",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    assert "class_path" in capsys.readouterr().out


# a one-layer model on 200 short tinyworld documents: enough for the CLI to fit, validate and export
SMALL = ["--data.tinyworld_docs", "200", "--data.seq_len", "64", "--model.model_overrides", "{n_layer: 1}"]


def test_fit_validate_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs/pretrain/tiny.yaml")
    main(["fit", "--config", cfg, *FAST, *SMALL])
    ckpt = tmp_path / "checkpoints/pretrain/last.ckpt"
    meta = read_meta(ckpt)
    assert meta["stage"] == "pretrain" and meta["model_config"]["n_layer"] == 1
    assert (
        meta["model_config"]["vocab_size"]
        == TextDataModule(tinyworld_docs=200, seq_len=64, cache_dir="data_cache").vocab_size
    )
    main(["validate", "--config", cfg, *FAST, *SMALL, "--ckpt_path", str(ckpt)])
    assert "val/loss" in capsys.readouterr().out
    main(["generate", "--ckpt", str(ckpt), "--prompt", "Alice is", "--max_new_tokens", "5"])
    exact = capsys.readouterr().out
    assert exact.startswith("Alice is")
    for precision in ("int8", "int4"):
        gen = ["generate", "--ckpt", str(ckpt), "--prompt", "Alice is", "--max_new_tokens", "5"]
        main([*gen, "--precision", precision])
        # quantised weights decode too (tokens may differ)
        assert capsys.readouterr().out.startswith("Alice is")
    # a checkpoint from another config is refused with the reason (the CLI itself takes the checkpoint's
    # hyperparameters on --ckpt_path, so drive the Trainer directly, as a script would)
    from lightning import Trainer

    from lit_llm.stages import CausalLM

    dm = TextDataModule(tinyworld_docs=200, seq_len=64, cache_dir="data_cache")
    other = CausalLM(model_overrides={"n_layer": 2}, vocab_size=dm.vocab_size, block_size=64)
    trainer = Trainer(
        logger=False, enable_progress_bar=False, limit_val_batches=1, enable_model_summary=False
    )
    with pytest.raises(ValueError, match="different model config.*n_layer: run has 2, checkpoint has 1"):
        trainer.validate(other, datamodule=dm, ckpt_path=str(ckpt))


def test_text_packing_and_split(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    (tmp_path / "a.txt").write_text(text)
    dm = TextDataModule(
        str(tmp_path / "a.txt"), tokenizer_kind="char", seq_len=16, cache_dir=str(tmp_path / "c")
    )
    dm.prepare_data()
    dm.setup()
    tok = dm.tokenizer
    x, y = dm.train_set[3]
    assert tok.decode(x.tolist()) == text[48:64] and torch.equal(x[1:], y[:-1])
    assert len(dm.train_set) == (900 + 1 - 1) // 16  # 900 chars + <|eos|>, windows of 17
    assert tok.decode(dm.val_set[0][0].tolist()) == text[900:916]
    # the same text gzipped reads the same (a .txt.gz is plain text, not records)
    import gzip

    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    gz = TextDataModule(
        str(tmp_path / "a.txt.gz"), tokenizer_kind="char", seq_len=16, cache_dir=str(tmp_path / "c")
    )
    gz.prepare_data()
    gz.setup()
    assert torch.equal(gz.train_set[3][0], x) and len(gz.train_set) == len(dm.train_set)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "data file not found"),
        (b"", "is empty"),
        (b"\xff\xfe bad bytes", "not UTF-8"),
        (b"short text", "fewer than one sequence"),
    ],
)
def test_bad_data_files(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    dm = TextDataModule(str(path), tokenizer_kind="char", seq_len=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        dm.prepare_data()


def test_bad_yaml_key_and_preset_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs/pretrain/tiny.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", cfg, "--model.learnin_rate", "0.1"])
    assert "learnin_rate" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model preset 'huge'; available presets: .*tiny"):
        main(["fit", "--config", cfg, *FAST, "--data.tinyworld_docs", "50", "--model.preset", "huge"])


def test_export_then_start_a_stage_from_the_hf_folder(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs/pretrain/tiny.yaml")
    main(["fit", "--config", cfg, *FAST, *SMALL])
    main(["export", "--ckpt", "checkpoints/pretrain/last.ckpt", "--out", "hf"])
    assert "exported to" in capsys.readouterr().out
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from lit_llm.checkpoint import load_backbone

    ours, tok, _ = load_backbone("checkpoints/pretrain/last.ckpt")
    x = torch.tensor([tok.encode("Alice has 3 apples.")])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours.eval()(x), atol=1e-5, rtol=1e-5)
    # the folder starts a stage: continue pretraining from it
    main(
        [
            "fit",
            "--config",
            cfg,
            *FAST,
            "--data.tinyworld_docs",
            "200",
            "--data.seq_len",
            "64",
            "--model.init_from",
            str(tmp_path / "hf"),
            "--trainer.default_root_dir",
            "again",
        ]
    )
    from lit_llm.checkpoint import read_meta

    assert read_meta("checkpoints/pretrain/last.ckpt")["model_config"]["n_layer"] == 1
