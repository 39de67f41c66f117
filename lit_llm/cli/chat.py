"""``lit-llm chat``: a multi-turn conversation with a chat model in the terminal."""

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
        prog="lit-llm chat",
        description="Chat with an SFT or RL-aligned model in the terminal. Type a message and press Enter; "
        "'/reset' clears the history, '/exit' or Ctrl-D quits.",
    )
    p.add_argument(
        "--ckpt", required=True, help="a chat model: an sft/ppo .ckpt or an exported Hugging Face folder"
    )
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument(
        "--single_turn",
        action="store_true",
        help="answer each message on its own (with the system prompt and the image, without earlier "
        "turns), for a model trained on one question per conversation such as configs/vision/shapes.yaml",
    )
    add_sampling_args(p, max_new_tokens=None)
    add_template_arg(p)
    add_image_args(p)
    a = p.parse_args(argv)
    import torch

    from lit_llm.backbone.generate import stream
    from lit_llm.checkpoint import CHAT_STAGES, load_for_inference, with_template_file

    check_sampling_args(a)
    model, tok, meta = load_for_inference(a.ckpt, a.precision, CHAT_STAGES, base=a.base)
    tok = with_template_file(tok, a.chat_template)
    # a small model's context (the image config's is 80) must hold the prompt too
    if a.max_new_tokens is None:
        a.max_new_tokens = min(128, model.config.block_size // 2)
    budget = model.config.block_size - a.max_new_tokens
    if budget < 1:
        raise SystemExit(
            f"error: --max_new_tokens {a.max_new_tokens} leaves no room in the model's context "
            f"(block_size {model.config.block_size})"
        )
    images, placeholders = None, []
    if a.image is not None:  # the image goes with the first user message, after its text
        images, placeholder = load_image_input(a.image, model, tok, a.max_tiles, a.ckpt)
        placeholders = [placeholder]
    gen = torch.Generator().manual_seed(a.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lit-llm chat ({meta.get('stage')} model, {a.ckpt}); /reset clears, /exit quits")
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    first = len(history)  # where the conversation starts, after the system prompt
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
            history = history[:first]
            continue
        if not line.strip():
            continue
        text = line.rstrip("\n")
        if a.single_turn:
            history = history[:first]
        first_user = images is not None and not any(m["role"] == "user" for m in history)
        history.append(
            {
                "role": "user",
                "content": [{"type": "text", "text": text}, {"type": "image"}] if first_user else text,
            }
        )
        ids = tok.render_chat(history, add_generation_prompt=True, images=placeholders)[0]
        if images is not None:
            # cutting the start would cut the image: keep the first question (it holds the image) and its
            # answer, and forget the oldest exchanges after it until the conversation fits
            while len(ids) > budget and len(history) - first > 3:
                del history[first + 2 : first + 4]
                ids = tok.render_chat(history, add_generation_prompt=True, images=placeholders)[0]
            if len(ids) > budget:
                sys.stdout.write("(the conversation with its image no longer fits the context: /reset)\n")
                history.pop()
                continue
        ids = ids[-budget:]  # forget the oldest turns when the conversation outgrows the context
        sys.stdout.write("assistant> ")
        stops = tok.stop_ids
        try:
            tokens = stream(
                model,
                ids,
                a.max_new_tokens,
                a.temperature,
                a.top_k,
                a.top_p,
                stops,
                gen,
                COMPILE[a.compile],
                images=images,
            )
            reply = stream_text(tok, tokens)
        except KeyboardInterrupt:
            reply = []
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": tok.decode(reply)})
