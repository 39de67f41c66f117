"""``lit-llm export``: a checkpoint as a Hugging Face folder (or a LoRA checkpoint as a PEFT adapter)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str]) -> None:
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
    p.add_argument(
        "--adapter",
        choices=["merged", "peft"],
        default="merged",
        help="for a LoRA checkpoint: merged (default): one Hugging Face folder with the adapters merged into "
        "the weights; peft: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) at --out, "
        "and the base model as a Hugging Face folder at --base_out",
    )
    p.add_argument(
        "--base_out", default=None, help="with --adapter peft: where the base goes (default: OUT/base)"
    )
    a = p.parse_args(argv)
    from lit_llm.checkpoint import load_for_inference
    from lit_llm.hf import export_hf

    if a.adapter == "peft":
        _export_peft(a.ckpt, a.out, a.base_out, a.arch)
        return
    model, tok, _ = load_for_inference(a.ckpt)
    out = export_hf(model, tok, a.out, arch=a.arch)
    print(f"exported to {out}")


def _export_peft(ckpt: str, out: str, base_out: str | None, arch: str) -> None:
    """A LoRA checkpoint as a PEFT adapter folder plus its base as a Hugging Face folder."""
    from pathlib import Path

    from lit_llm.checkpoint import load_backbone, read_meta
    from lit_llm.errors import UserError
    from lit_llm.hf import export_hf
    from lit_llm.lora import adapters_disabled, export_peft

    info = read_meta(ckpt).get("lora")
    if not info:
        raise UserError(f"{ckpt} holds no LoRA adapters: export it without --adapter peft")
    if info["config"].get("train_modules"):
        raise UserError(
            f"{ckpt} also trains {info['config']['train_modules']} in full (lora.train_modules), which a PEFT "
            "adapter folder here does not carry: export it without --adapter peft (merged)"
        )
    model, tok, _ = load_backbone(ckpt, keep_adapters=True)
    model.eval().requires_grad_(False)
    base_dir = Path(base_out) if base_out else Path(out) / "base"
    with adapters_disabled(model):
        export_hf(model, tok, base_dir, arch=arch)  # the base weights (adapter keys are not converted)
    export_peft(model, out, base_model_name_or_path=str(base_dir.resolve()), arch=arch)
    print(f"exported the adapter to {out} and its base to {base_dir}")
