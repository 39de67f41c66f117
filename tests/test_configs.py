"""Every shipped config composes with the shared base (lit_llm/cli/base.yaml) into a complete stage config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_llm.cli import main
from lit_llm.cli.lightning import BASE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

CHECKPOINT = "lit_llm.callbacks.StageCheckpoint"
SAMPLES = "lit_llm.callbacks.SampleCallback"
THROUGHPUT = "lit_llm.callbacks.ThroughputMonitor"
LR = "lightning.pytorch.callbacks.LearningRateMonitor"
VISION_SAMPLES = "lit_llm.callbacks.VisionSampleCallback"

# per config: the stage folder, the logger name, the callbacks after the checkpoint (SampleCallback's
# every_n_steps), and the stage's own values that must survive composition
EXPECTED = {
    "pretrain/tiny.yaml": ("pretrain", "pretrain", [LR, (SAMPLES, 200), THROUGHPUT], {"max_steps": 800}),
    "pretrain/tiny-moe.yaml": ("pretrain-moe", "pretrain-moe", [LR, (SAMPLES, 200), THROUGHPUT], {}),
    "pretrain/shakespeare-char.yaml": (
        "shakespeare-char",
        "shakespeare-char",
        [LR, (SAMPLES, 500), THROUGHPUT],
        {"max_steps": 2000, "limit_val_batches": 50},
    ),
    "pretrain/tiny-ddp.yaml": (
        "pretrain-ddp",
        "pretrain-ddp",
        [LR, CHECKPOINT, THROUGHPUT],
        {"strategy": "ddp"},
    ),
    "pretrain/tiny-fsdp.yaml": (
        "pretrain-fsdp",
        "pretrain-fsdp",
        [LR, CHECKPOINT, THROUGHPUT],
        {"devices": 2},
    ),
    "pretrain/corpus.yaml": (
        "pretrain-corpus",
        "pretrain-corpus",
        [LR, (SAMPLES, 1000), THROUGHPUT],
        {"max_steps": 20000, "limit_val_batches": 50},
    ),
    "pretrain/corpus-litdata.yaml": (
        "pretrain-chunks",
        "pretrain-chunks",
        [LR, THROUGHPUT],
        {"max_steps": 20000},
    ),
    "sft/tinyworld.yaml": ("sft", "sft", [LR, (SAMPLES, 0)], {"max_steps": 300}),
    "sft/tinyworld-lora.yaml": ("sft-lora", "sft-lora", [LR, (SAMPLES, 0)], {"max_steps": 300}),
    "vision/shapes.yaml": (
        "vision",
        "vision",
        [LR, VISION_SAMPLES, THROUGHPUT],
        {"val_check_interval": 750, "precision": "32-true"},
    ),
    "sft/alpaca-seed.yaml": ("sft-alpaca", "sft-alpaca", [LR, (SAMPLES, 0)], {"val_check_interval": 50}),
    "reward/tinyworld.yaml": ("reward", "reward", [LR], {"max_steps": 200}),
    "reward/hh-rlhf.yaml": ("reward-hh", "reward-hh", [LR], {}),
    "reward/tinyworld-person.yaml": ("reward-person", "reward-person", [LR], {"max_steps": 1200}),
    "reward/tinyworld-long.yaml": ("reward", "reward", [LR], {"max_steps": 4000}),
    "ppo/tinyworld.yaml": (
        "ppo",
        "ppo",
        [LR, (SAMPLES, 0)],
        {"limit_train_batches": 80, "gradient_clip_val": None, "num_sanity_val_steps": 0},
    ),
    "ppo/tinyworld-lora.yaml": (
        "ppo-lora",
        "ppo-lora",
        [LR, (SAMPLES, 0)],
        {"limit_train_batches": 80, "gradient_clip_val": None, "num_sanity_val_steps": 0},
    ),
    "dpo/tinyworld.yaml": ("dpo", "dpo", [LR, (SAMPLES, 0)], {"max_steps": 200}),
    "grpo/tinyworld.yaml": (
        "grpo",
        "grpo",
        [LR, (SAMPLES, 0)],
        {"limit_train_batches": 60, "gradient_clip_val": None, "num_sanity_val_steps": 0},
    ),
    "sft/smollm2-tinyworld.yaml": ("sft-smollm2", "sft-smollm2", [LR, (SAMPLES, 0)], {"max_steps": 200}),
    "sft/smollm2-alpaca.yaml": ("sft-smollm2-alpaca", "sft-smollm2-alpaca", [LR], {"max_steps": 200}),
    "dpo/smollm2-tinyworld.yaml": ("dpo-smollm2", "dpo-smollm2", [LR], {"max_steps": 100}),
    "grpo/smollm2-tinyworld.yaml": (
        "grpo-smollm2",
        "grpo-smollm2",
        [LR],
        {"limit_train_batches": 20, "gradient_clip_val": None, "num_sanity_val_steps": 0},
    ),
    "grpo/tinyworld-rm.yaml": (
        "grpo-rm",
        "grpo-rm",
        [LR, (SAMPLES, 0)],
        {"limit_train_batches": 60, "gradient_clip_val": None, "num_sanity_val_steps": 0},
    ),
}


def composed(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_shipped_config_is_covered():
    assert sorted(str(c.relative_to(ROOT / "configs")) for c in CONFIGS) == sorted(EXPECTED)


def test_stage_configs_hold_no_base_block():
    """The shared block lives only in the base: no stage file restates the logger or the base trainer values."""
    for config in CONFIGS:
        trainer = yaml.safe_load(config.read_text())["trainer"]
        assert "class_path" not in trainer.get("logger", {}), config
        assert "check_val_every_n_epoch" not in trainer, config
        # a stage may change the precision (vision: float32 is faster on a CPU), never restate the base's
        assert trainer.get("precision") != "bf16-mixed", config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_composes_with_the_base(config, capsys):
    stage, name, rest, own = EXPECTED[str(config.relative_to(ROOT / "configs"))]
    cfg = composed(config, capsys)
    trainer = cfg["trainer"]
    # from the base
    assert trainer["precision"] == own.get("precision", "bf16-mixed")
    assert trainer["check_val_every_n_epoch"] is None
    assert trainer["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert trainer["logger"]["init_args"]["save_dir"] == "checkpoints/logs"
    # the stage's folder: checkpoints (dirpath null = default_root_dir) and the logger's run name
    assert trainer["default_root_dir"] == f"checkpoints/{stage}"
    logger_name = trainer["logger"]["init_args"]["name"]
    assert (
        Path(trainer["default_root_dir"]).name if logger_name == "lightning_logs" else logger_name
    ) == name
    callbacks = trainer["callbacks"]
    ckpt = callbacks[0]
    assert ckpt["class_path"] == CHECKPOINT
    assert ckpt["init_args"]["dirpath"] is None
    assert ckpt["init_args"]["save_last"] is True
    assert ckpt["init_args"]["enable_version_counter"] is False
    assert ckpt["init_args"]["filename"] == "step{step}"
    got = [
        (c["class_path"], c["init_args"]["every_n_steps"]) if c["class_path"] == SAMPLES else c["class_path"]
        for c in callbacks[1:]
    ]
    assert got == rest
    # the stage's own values win over the base
    for key, value in own.items():
        assert trainer[key] == value, key
    assert cfg["seed_everything"] == (1337 if "shakespeare" in config.name else 0)


def test_later_config_overrides_the_base(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  precision: 32-true\n  logger:\n    init_args:\n      save_dir: elsewhere\n")
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/sft/tinyworld.yaml"),
                "--config",
                str(extra),
                "--print_config",
            ]
        )
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["precision"] == "32-true"
    assert trainer["logger"]["init_args"]["save_dir"] == "elsewhere"
    assert trainer["default_root_dir"] == "checkpoints/sft"


def test_base_ships_inside_the_package():
    assert BASE_CONFIG.is_file()
    assert BASE_CONFIG.parent == Path(__import__("lit_llm.cli", fromlist=["x"]).__file__).parent


def test_stage_checkpoint_and_logger_follow_default_root_dir(tmp_path):
    from lightning import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_llm.callbacks import StageCheckpoint, stage_logger_names

    ckpt = StageCheckpoint()
    logger = TensorBoardLogger(save_dir=str(tmp_path / "logs"))
    trainer = Trainer(
        default_root_dir=str(tmp_path / "sft"), logger=logger, callbacks=[ckpt], accelerator="cpu"
    )
    stage_logger_names(trainer)
    assert logger.name == "sft"
    ckpt.setup(trainer, None, "fit")
    assert Path(ckpt.dirpath) == (tmp_path / "sft").resolve()
    # monitor "auto": val/acc (max) when logged, else val/loss (min); neither: nothing ranked yet
    assert ckpt.monitor is None and not ckpt.resolve_monitor({"val/gold_reward": 1})
    assert ckpt.resolve_monitor({"val/loss": 1.0, "val/acc": 0.5}) and (ckpt.monitor, ckpt.mode) == (
        "val/acc",
        "max",
    )
    other = StageCheckpoint()
    assert other.resolve_monitor({"val/loss": 1.0}) and (other.monitor, other.mode) == ("val/loss", "min")
    assert other.state_key == StageCheckpoint().state_key  # stable for --ckpt_path resume
