"""``lit-llm export``: a checkpoint as a Hugging Face folder or a GGUF file for llama.cpp (or a LoRA
checkpoint as a PEFT adapter)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DTYPES = ("f32", "f16", "bf16", "q8_0")


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm export",
        description="Write a checkpoint as a Hugging Face folder (config.json, model.safetensors, tokenizer "
        "files) that AutoModelForCausalLM / AutoTokenizer.from_pretrained load offline (--format hf), or as "
        "one GGUF file with the tokenizer and chat template that llama.cpp, Ollama, LM Studio and "
        "llama-cpp-python load (--format gguf).",
    )
    p.add_argument("--ckpt", required=True, help="a lit_llm checkpoint (.ckpt file, or a folder of shards)")
    p.add_argument(
        "--out", required=True, help="output folder (hf) or .gguf file (gguf; its folder must exist)"
    )
    p.add_argument(
        "--format",
        choices=["hf", "gguf", "ckpt"],
        default="hf",
        help="hf: a Hugging Face folder; gguf: llama.cpp; ckpt: one lit_llm .ckpt file (a sharded checkpoint "
        "folder gathered: weights, config, tokenizer, no optimizer state)",
    )
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "llama4"],
        default="auto",
        help="auto: Llama when the config fits, else Llama 4",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="stored weight type: f32, f16, bf16, or q8_0 (llama.cpp's 8-bit quantisation, gguf only); "
        "default: the checkpoint's dtype (hf), f32 (gguf)",
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
    from lit_llm.errors import UserError

    if a.format == "hf" and a.dtype == "q8_0":
        raise UserError("--dtype q8_0 is a GGUF quantisation: use it with --format gguf")
    if a.format == "ckpt":
        from lit_llm.checkpoint import gather_checkpoint

        print(f"gathered into {gather_checkpoint(a.ckpt, a.out)}")
        return
    if a.adapter == "peft":
        if a.format != "hf":
            raise UserError("--adapter peft writes a Hugging Face PEFT folder: use it with --format hf")
        _export_peft(a.ckpt, a.out, a.base_out, a.arch)
        return
    model, tok, _ = load_for_inference(a.ckpt)
    if a.format == "gguf":
        from lit_llm.formats.gguf import export_gguf

        out = export_gguf(model, tok, a.out, dtype=a.dtype or "f32", arch=a.arch)
    else:
        import torch

        from lit_llm.formats.hf import export_hf

        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(a.dtype)
        out = export_hf(model, tok, a.out, arch=a.arch, dtype=dtype)
    print(f"exported to {out}")


def _export_peft(ckpt: str, out: str, base_out: str | None, arch: str) -> None:
    """A LoRA checkpoint as a PEFT adapter folder plus its base as a Hugging Face folder."""
    from pathlib import Path

    from lit_llm.checkpoint import load_backbone, read_meta
    from lit_llm.errors import UserError
    from lit_llm.formats.hf import export_hf
    from lit_llm.formats.peft import export_peft
    from lit_llm.lora import adapters_disabled

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
