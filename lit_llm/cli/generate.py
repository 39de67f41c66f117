"""``lit-llm generate``: continue a prompt with a trained model, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lit_llm.cli.common import (
    COMPILE,
    add_image_args,
    add_sampling_args,
    add_template_arg,
    check_sampling_args,
    load_image_input,
    stream_text,
)


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm generate", description="Continue a prompt with a trained model."
    )
    p.add_argument(
        "--ckpt", required=True, help="a lit_llm checkpoint (.ckpt) or an exported Hugging Face folder"
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template (SFT/PPO models)"
    )
    add_sampling_args(p, max_new_tokens=64)
    add_template_arg(p)
    add_image_args(p)
    a = p.parse_args(argv)
    import torch

    from lit_llm.backbone.generate import stream
    from lit_llm.checkpoint import (
        CHAT_STAGES,
        GENERATIVE_STAGES,
        load_for_inference,
        with_template_file,
    )

    check_sampling_args(a)
    model, tok, _ = load_for_inference(
        a.ckpt, a.precision, CHAT_STAGES if a.chat else GENERATIVE_STAGES, base=a.base
    )
    tok = with_template_file(tok, a.chat_template)
    images = None
    if a.image is not None:  # the image's placeholders follow the prompt text (as the image world trains)
        images, placeholder = load_image_input(a.image, model, tok, a.max_tiles, a.ckpt)
        content = [{"type": "text", "text": a.prompt}, {"type": "image"}]
        if a.chat:
            ids = tok.render_chat([{"role": "user", "content": content}], True, images=[placeholder])[0]
        else:
            ids = tok.encode(a.prompt) + placeholder
    else:
        ids = tok.prompt_ids(a.prompt) if a.chat else tok.encode(a.prompt, bos=tok.adds_bos)
    if not ids:
        raise SystemExit("error: the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(a.seed)
    # a continuation follows its prompt on the same line; a chat reply is the next turn: on its own line
    sys.stdout.write(a.prompt + ("\n" if a.chat else ""))
    tokens = stream(
        model,
        ids,
        a.max_new_tokens,
        a.temperature,
        a.top_k,
        a.top_p,
        tok.stop_ids,
        gen,
        COMPILE[a.compile],
        images=images,
    )
    stream_text(tok, tokens)
    sys.stdout.write("\n")
