"""``lit-llm fit|validate|test|predict``: LightningCLI with the links that keep model and data consistent."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lit_llm.errors import UserError


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of the run went away (gloo / NCCL)."""
    text = str(err)
    return any(
        s in text
        for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
    )


class LitLLMCLI(LightningCLI):
    """LightningCLI with the links that keep model and data consistent.

    * ``data.vocab_size`` -> ``model.vocab_size``: the tokenizer decides the vocabulary, never the user.
    * ``data.seq_len`` -> ``model.block_size``: the model is built long enough for the data.
    * ``model.init_from`` -> ``data.tokenizer``: a stage that starts from a checkpoint uses its tokenizer.

    Every subcommand first loads the shared base config ``BASE_CONFIG`` (``lit_llm/cli/base.yaml``: trainer
    defaults, the TensorBoard logger, the checkpoint callback), then the ``--config`` files in order, so a
    stage YAML holds only what differs; ``--print_config`` shows the composed result.

    And two defaults for reliable runs:

    * checkpoints are written atomically (``lit_llm.checkpoint.AtomicCheckpointIO``: temp file, fsync,
      rename), unless ``--trainer.plugins`` names another ``CheckpointIO``;
    * the DataModule's training loader is made resumable (``lit_llm.resumable``): a seeded order split over
      ranks like ``DistributedSampler``, whose position is saved in checkpoints, so ``--ckpt_path last``
      continues with exactly the batches an uninterrupted run would have seen.

    A run stopped by SIGTERM (cluster preemption, ``kill``) exits with status 143 (128 + SIGTERM) and says
    where to resume, instead of Lightning's silent status 0, so job scripts can tell it from a finished run.
    """

    def __init__(self, *args, **kwargs) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            super().__init__(*args, **kwargs)
        except SIGTERMException:
            trainer = getattr(self, "trainer", None)
            step = f" at step {trainer.global_step}" if trainer is not None else ""
            sys.stderr.write(
                f"lit-llm: stopped by SIGTERM{step}. Resume from the last checkpoint with the same command "
                "and --ckpt_path last (or the path of last.ckpt).\n"
            )
            raise SystemExit(128 + signal.SIGTERM) from None
        except RuntimeError as err:
            if not lost_peer(err):
                raise
            trainer = getattr(self, "trainer", None)
            step = f" at step {trainer.global_step}" if trainer is not None else ""
            where = f" under {trainer.default_root_dir}" if trainer is not None else ""
            raise UserError(
                f"another process of this run stopped{step} (it died or was killed; its own output says why): "
                f"{str(err).splitlines()[0][:200]}. The checkpoints{where} are whole (they are written to a "
                "temporary name and renamed); resume with the same command and --ckpt_path last."
            ) from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.block_size", apply_on="instantiate")
        parser.link_arguments("model.init_args.init_from", "data.init_args.tokenizer", apply_on="parse")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        from lit_llm.resumable import make_resumable

        if isinstance(self.datamodule, LightningDataModule):
            make_resumable(self.datamodule)

    def instantiate_trainer(self, **kwargs):
        from lit_llm.checkpoint import with_atomic_checkpoint_io

        configured = self._get(self.config_init, "trainer", default={}).get("plugins")
        kwargs["plugins"] = with_atomic_checkpoint_io(kwargs.get("plugins", configured))
        from lit_llm.strategies import register_strategies

        register_strategies()
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as err:
            if "requires a GPU accelerator" in str(err):  # Lightning's FSDP (FSDP1) on a CPU
                raise UserError(
                    f"{err} On this machine use --trainer.strategy fsdp2 (lit_llm's FSDP2, on CPUs and GPUs) "
                    "or ddp."
                ) from None
            raise
        from lit_llm.callbacks import stage_logger_names

        stage_logger_names(trainer)
        return trainer


# loaded before any --config by every subcommand (jsonargparse default_config_files); shipped in the package
# (pyproject.toml package-data), so it is found from any working directory and in non-editable installs
BASE_CONFIG = Path(__file__).resolve().with_name("base.yaml")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_lightning(args: Sequence[str] | None) -> LitLLMCLI:
    """LightningCLI on ``args`` (``None``: the command line)."""
    kwargs = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={
            "description": DESCRIPTION,
            "formatter_class": argparse.RawDescriptionHelpFormatter,
            **{cmd: {"default_config_files": [str(BASE_CONFIG)]} for cmd in SUBCOMMANDS},
        },
    )
    if args is None:
        return LitLLMCLI(LightningModule, LightningDataModule, **kwargs)
    # explicit args (``lit-llm pipeline``, tests): hide this process's own command line, which LightningCLI
    # would otherwise warn about ("args and command line")
    saved = sys.argv
    sys.argv = sys.argv[:1]
    try:
        return LitLLMCLI(LightningModule, LightningDataModule, args=list(args), **kwargs)
    finally:
        sys.argv = saved


DESCRIPTION = """lit-llm: train and use a Llama-style LLM, stage by stage.

Training (LightningCLI; `lit-llm fit --model.help CLASS` explains a stage's options; every config
is composed with lit_llm/cli/base.yaml, see it with --print_config):
  lit-llm fit --config configs/pretrain/tiny.yaml          pretrain on the built-in tinyworld text
  lit-llm fit --config configs/sft/tinyworld.yaml          supervised fine-tuning
  lit-llm fit --config configs/reward/tinyworld.yaml       reward model
  lit-llm fit --config configs/ppo/tinyworld.yaml          RLHF with PPO against the reward model
  lit-llm fit --config configs/grpo/tinyworld.yaml         GRPO against tinyworld's verifier
  lit-llm fit --config configs/dpo/tinyworld.yaml          DPO on preference pairs
  lit-llm fit --config configs/vision/shapes.yaml          images (Llama 4 early fusion) from scratch
  lit-llm validate|test --config ... --ckpt_path CKPT      evaluate a checkpoint
Helpers (each has --help):
  lit-llm generate --ckpt CKPT --prompt TEXT               continue a prompt
  lit-llm chat --ckpt CKPT                                 multi-turn chat in the terminal
  lit-llm generate|chat ... --image PATH                   ask a vision model about an image
  lit-llm pipeline [--fast] [--align ppo|grpo|dpo|all]     the whole chain on tinyworld + a summary
  lit-llm export --ckpt CKPT --out DIR                     a Hugging Face folder (safetensors)
  lit-llm serve --ckpt CKPT                                an OpenAI-compatible HTTP server
  lit-llm plot checkpoints/logs/RUN ... --tags T --out F   TensorBoard curves as a PNG
The course through the code, chapter by chapter: docs/course/README.md
"""
