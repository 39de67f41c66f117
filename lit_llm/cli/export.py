"""``lit-llm export``: a checkpoint as a Hugging Face folder or a GGUF file for llama.cpp."""

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
    p.add_argument("--ckpt", required=True, help="a lit_llm checkpoint (.ckpt)")
    p.add_argument(
        "--out", required=True, help="output folder (hf) or .gguf file (gguf; its folder must exist)"
    )
    p.add_argument(
        "--format", choices=["hf", "gguf"], default="hf", help="hf: a Hugging Face folder; gguf: llama.cpp"
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
    a = p.parse_args(argv)
    from lit_llm.checkpoint import load_for_inference
    from lit_llm.errors import UserError

    if a.format == "hf" and a.dtype == "q8_0":
        raise UserError("--dtype q8_0 is a GGUF quantisation: use it with --format gguf")
    model, tok, _ = load_for_inference(a.ckpt)
    if a.format == "gguf":
        from lit_llm.gguf_export import export_gguf

        out = export_gguf(model, tok, a.out, dtype=a.dtype or "f32", arch=a.arch)
    else:
        import torch

        from lit_llm.hf import export_hf

        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(a.dtype)
        out = export_hf(model, tok, a.out, arch=a.arch, dtype=dtype)
    print(f"exported to {out}")
