"""The ``lit-llm`` command.

Training and evaluation go through LightningCLI::

    lit-llm fit --config configs/pretrain/tiny.yaml
    lit-llm validate --config configs/pretrain/tiny.yaml --ckpt_path checkpoints/pretrain/last.ckpt

Helpers work from a checkpoint alone::

    lit-llm generate --ckpt checkpoints/pretrain/last.ckpt --prompt "Alice is in the"
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

HELPERS = ("generate", "chat", "pipeline", "export")


class LitLLMCLI(LightningCLI):
    """LightningCLI with the links that keep model and data consistent.

    * ``data.vocab_size`` -> ``model.vocab_size``: the tokenizer decides the vocabulary, never the user.
    * ``data.seq_len`` -> ``model.block_size``: the model is built long enough for the data.
    * ``model.init_from`` -> ``data.tokenizer``: a stage that starts from a checkpoint uses its tokenizer.

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
        return super().instantiate_trainer(**kwargs)


def run_lightning(args: Sequence[str] | None) -> LitLLMCLI:
    """LightningCLI on ``args`` (``None``: the command line)."""
    kwargs = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": DESCRIPTION, "formatter_class": argparse.RawDescriptionHelpFormatter},
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

Training (LightningCLI; `lit-llm fit --help` lists every option of a config):
  lit-llm fit --config configs/pretrain/tiny.yaml          pretrain on the built-in tinyworld text
  lit-llm fit --config configs/sft/tinyworld.yaml          supervised fine-tuning
  lit-llm fit --config configs/reward/tinyworld.yaml       reward model
  lit-llm fit --config configs/ppo/tinyworld.yaml          RLHF with PPO
  lit-llm validate|test --config ... --ckpt_path CKPT      evaluate a checkpoint
Helpers (each has --help):
  lit-llm generate --ckpt CKPT --prompt TEXT               continue a prompt
  lit-llm chat --ckpt CKPT                                 multi-turn chat in the terminal
  lit-llm pipeline [--fast]                                all four stages on tinyworld + a summary
  lit-llm export --ckpt CKPT --out DIR                     a Hugging Face folder (safetensors)
"""


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["32", "bf16", "int8"],
        default="32",
        help="weights while decoding: float32 (exact), bfloat16, or int8 weight-only with bfloat16 "
        "activations (fastest on CPU; greedy tokens can differ where two logits nearly tie)",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on", "frozen"],
        default="off",
        help="torch.compile the decode step: the first call compiles (tens of seconds), so it pays off for "
        "long outputs; 'frozen' also bakes the weights into the compiled code (a CPU option)",
    )


def _inference_model(ckpt: str, precision: str):
    """(model, tokenizer, meta) from a checkpoint, frozen for inference in the requested precision."""
    import torch

    from lit_llm.backbone.quantize import quantize_int8
    from lit_llm.stages.base import load_backbone

    model, tok, meta = load_backbone(ckpt)
    model.eval().requires_grad_(False)
    if precision != "32":
        model.to(torch.bfloat16)
    if precision == "int8":
        quantize_int8(model)
    return model, tok, meta


_COMPILE = {"off": False, "on": True, "frozen": "frozen"}


def cmd_generate(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm generate", description="Continue a prompt with a trained model."
    )
    p.add_argument("--ckpt", required=True, help="a lit_llm checkpoint (.ckpt)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template (SFT/PPO models)"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_decoding_args(p)
    a = p.parse_args(argv)
    import torch

    from lit_llm.backbone.generate import stream

    model, tok, _ = _inference_model(a.ckpt, a.precision)
    ids = tok.prompt_ids(a.prompt) if a.chat else tok.encode(a.prompt)
    stops = [tok.end_id, tok.eos_id]
    gen = torch.Generator().manual_seed(a.seed)
    sys.stdout.write(a.prompt)
    tokens = stream(
        model, ids, a.max_new_tokens, a.temperature, a.top_k, a.top_p, stops, gen, _COMPILE[a.compile]
    )
    _stream_text(tok, tokens)
    sys.stdout.write("\n")


def _stream_text(tok, token_iter, out=None) -> list[int]:
    """Print tokens as they arrive (decoding the whole reply each time keeps multi-byte characters whole)."""
    out = out or sys.stdout
    ids: list[int] = []
    printed = ""
    for t in token_iter:
        ids.append(t)
        text = tok.decode(ids)
        out.write(text[len(printed) :])
        out.flush()
        printed = text
    return ids


def cmd_chat(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm chat",
        description="Chat with an SFT or PPO model in the terminal. Type a message and press Enter; "
        "'/reset' clears the history, '/exit' or Ctrl-D quits.",
    )
    p.add_argument("--ckpt", required=True, help="a lit_llm checkpoint (.ckpt) of a chat model")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _add_decoding_args(p)
    a = p.parse_args(argv)
    import torch

    from lit_llm.backbone.generate import stream

    model, tok, meta = _inference_model(a.ckpt, a.precision)
    gen = torch.Generator().manual_seed(a.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lit-llm chat ({meta.get('stage')} model, {a.ckpt}); /reset clears, /exit quits")
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.render_chat(history, add_generation_prompt=True)[0]
        budget = model.config.block_size - a.max_new_tokens
        if budget < 1:
            raise SystemExit(f"--max_new_tokens {a.max_new_tokens} leaves no room in block_size")
        ids = ids[-budget:]  # forget the oldest turns when the conversation outgrows the context
        sys.stdout.write("assistant> ")
        try:
            reply = _stream_text(
                tok,
                stream(
                    model,
                    ids,
                    a.max_new_tokens,
                    a.temperature,
                    a.top_k,
                    a.top_p,
                    [tok.end_id, tok.eos_id],
                    gen,
                    _COMPILE[a.compile],
                ),
            )
        except KeyboardInterrupt:
            reply = []
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": tok.decode(reply)})


def cmd_export(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm export",
        description="Write a checkpoint as a Hugging Face folder (config.json, model.safetensors, tokenizer "
        "files) that AutoModelForCausalLM / AutoTokenizer.from_pretrained load offline.",
    )
    p.add_argument("--ckpt", required=True, help="a lit_llm checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "llama4"],
        default="auto",
        help="auto: Llama when the config fits, else Llama 4",
    )
    a = p.parse_args(argv)
    from lit_llm.backbone.hf import export_hf
    from lit_llm.stages.base import load_backbone

    model, tok, _ = load_backbone(a.ckpt)
    out = export_hf(model, tok, a.out, arch=a.arch)
    print(f"exported to {out}")


def cmd_pipeline(argv: Sequence[str]) -> None:
    from lit_llm.pipeline import run

    run(argv)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lit-llm`` (and ``python -m lit_llm``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in HELPERS:
        {"generate": cmd_generate, "chat": cmd_chat, "pipeline": cmd_pipeline, "export": cmd_export}[argv[0]](
            argv[1:]
        )
        return
    run_lightning(args)


if __name__ == "__main__":
    main()
