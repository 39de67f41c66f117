"""``lit-llm serve``: a model behind an OpenAI-compatible HTTP API, requests batched as they arrive.

    lit-llm serve --ckpt checkpoints/sft/last.ckpt --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sft", "messages": [{"role": "user", "content": "Where is Alice?"}]}'
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from lit_llm.cli.common import add_template_arg, positive_int
from lit_llm.errors import UserError


def check_port(host: str, port: int) -> None:
    """Refuse, before anything is loaded, a port that another program already listens on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} on {host} is already in use: pick another with --port"
                ) from None
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def default_name(ckpt: str) -> str:
    """The served model's name: the checkpoint's folder (``checkpoints/sft/last.ckpt`` -> ``sft``) or file."""
    p = Path(ckpt)
    if p.suffix == ".ckpt":
        return p.parent.name or p.stem
    return p.stem if p.suffix == ".gguf" else p.name


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="lit-llm serve",
        description="Serve a model behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models; stream: true as server-sent events). Concurrent requests are decoded together in one "
        "batch (continuous batching): a finished request's row goes to the next waiting one.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="a lit_llm checkpoint (.ckpt), a Hugging Face folder or a .gguf file",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--model_name", default=None, help="the model's name in the API (default: from --ckpt)")
    p.add_argument("--max_batch", type=positive_int, default=8, help="requests decoded together; more wait")
    p.add_argument(
        "--context",
        type=positive_int,
        default=None,
        help="longest prompt + reply of one request (default: the model's context, at most 2048); the KV "
        "cache holds max_batch x context positions",
    )
    p.add_argument(
        "--precision",
        choices=["32", "bf16"],
        default="32",
        help="weights while decoding: float32 (exact) or bfloat16",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8", "int4"],
        default="none",
        help="weight-only quantised linear layers with bfloat16 activations: int8 (one scale per row) or int4 "
        "(groups of 32, as llama.cpp's Q4_1; fastest on CPU); greedy tokens can differ from float32 where two "
        "logits nearly tie",
    )
    p.add_argument("--base", default=None, help="for a LoRA adapter checkpoint: its base checkpoint")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_template_arg(p)
    a = p.parse_args(argv)
    check_port(a.host, a.port)

    import torch
    import uvicorn

    from lit_llm.checkpoint import CHAT_STAGES, GENERATIVE_STAGES, load_for_inference, with_template_file
    from lit_llm.serve.app import create_app
    from lit_llm.serve.engine import Engine

    if a.threads:
        torch.set_num_threads(a.threads)
    precision = a.precision if a.quantize == "none" else a.quantize
    model, tok, meta = load_for_inference(a.ckpt, precision, GENERATIVE_STAGES, base=a.base)
    tok = with_template_file(tok, a.chat_template)
    context = a.context or min(model.config.block_size, 2048)
    if context > model.config.block_size:
        raise UserError(
            f"--context {context} exceeds the model's context of {model.config.block_size} tokens"
        )
    engine = Engine(model, max_batch=a.max_batch, context=context)
    name = a.model_name or default_name(a.ckpt)
    app = create_app(engine, tok, name)
    if meta.get("stage") not in CHAT_STAGES:
        print(f"note: {a.ckpt} is a {meta.get('stage')!r} model: use /v1/completions", file=sys.stderr)
    print(
        f"serving {name!r} ({a.ckpt}, {precision}, max_batch {a.max_batch}, context {context}) at "
        f"http://{a.host}:{a.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    finally:
        engine.close()
