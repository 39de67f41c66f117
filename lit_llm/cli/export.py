"""``lit-llm export``: a checkpoint as a Hugging Face folder."""

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
    a = p.parse_args(argv)
    from lit_llm.checkpoint import load_for_inference
    from lit_llm.hf import export_hf

    model, tok, _ = load_for_inference(a.ckpt)
    out = export_hf(model, tok, a.out, arch=a.arch)
    print(f"exported to {out}")
