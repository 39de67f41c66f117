"""The OpenAI-compatible HTTP API (FastAPI) over a continuous-batching :class:`~lit_llm.serve.engine.Engine`.

Routes: ``POST /v1/chat/completions`` (messages rendered by the model's own chat template, the reply ending
at its end-of-turn tokens), ``POST /v1/completions`` (raw text continued), ``GET /v1/models``,
``GET /health``. ``stream: true`` answers with server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``. Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``:
400 for a bad request (malformed JSON, a bad field, a prompt beyond the context), 404 for an unknown model,
500 (no traceback) if decoding itself fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lit_llm.serve.engine import Engine
from lit_llm.serve.engine import Request as EngineRequest
from lit_llm.serve.text import TextStream
from lit_llm.tokenizer import Tokenizer

# ---- request bodies (unknown fields are ignored, as OpenAI-compatible servers do) ----------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, as llama.cpp and vLLM accept it
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class APIError(Exception):
    """An OpenAI error answer: ``status`` and the fields of its ``error`` object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem of a request body, and the field it names."""
    first = err.errors()[0] if err.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("msg", "")), None
    param = ".".join(loc) or None
    return (f"{param}: " if param else "") + str(first.get("msg", "invalid request")), param


# ---- the app ---------------------------------------------------------------------------------------------------


class _Served:
    """What the routes share: the engine, the tokenizer and the served model's name."""

    def __init__(self, engine: Engine, tok: Tokenizer, name: str) -> None:
        self.engine, self.tok, self.name = engine, tok, name
        self.created = int(time.time())

    def check(self, body: _Body) -> None:
        if body.model is not None and body.model != self.name:
            raise APIError(
                f"the model {body.model!r} does not exist: this server serves {self.name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        for field, value in (
            ("presence_penalty", body.presence_penalty),
            ("frequency_penalty", body.frequency_penalty),
        ):
            if value:
                raise APIError(f"{field} is not supported by lit-llm serve (send 0)", param=field)
        if body.logprobs:
            raise APIError("logprobs are not supported by lit-llm serve", param="logprobs")

    def budget(self, prompt: Sequence[int], asked: int | None, param: str) -> int:
        """``max_tokens`` for ``prompt``: as asked, or the rest of the context; refused beyond it."""
        ctx = self.engine.context
        if len(prompt) == 0:
            raise APIError("the prompt encodes to no tokens", param="messages")
        if len(prompt) >= ctx:
            raise APIError(
                f"the prompt is {len(prompt)} tokens but the context is {ctx}: shorten it (nothing is "
                "truncated)",
                param="messages",
                code="context_length_exceeded",
            )
        if asked is None:
            return ctx - len(prompt)
        if len(prompt) + asked > ctx:
            raise APIError(
                f"max_tokens={asked} with a prompt of {len(prompt)} tokens exceeds the context of {ctx} "
                f"tokens: ask for at most {ctx - len(prompt)}",
                param=param,
                code="context_length_exceeded",
            )
        return asked

    def chat_prompt(self, body: ChatBody) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, str):
                content = m.content
            else:
                if any(p.type != "text" for p in m.content):
                    raise APIError(
                        "only text parts are supported by lit-llm serve", param=f"messages.{i}.content"
                    )
                content = "".join(p.text or "" for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            return self.tok.render_chat(messages, add_generation_prompt=True)[0]
        except Exception as err:  # noqa: BLE001 - the template refuses (e.g. no system role): a bad request
            raise APIError(
                f"the model's chat template refused these messages: {err}", param="messages"
            ) from None

    def start(
        self, prompt: list[int], body: _Body, max_tokens: int, queue: asyncio.Queue, index: int
    ) -> EngineRequest:
        loop = asyncio.get_running_loop()

        def emit(event: tuple[str, object]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        seed = None if body.seed is None else body.seed + index
        req = EngineRequest(
            prompt,
            max_tokens,
            emit,
            temperature=body.temperature,
            top_p=None if body.top_p >= 1 else body.top_p,
            top_k=body.top_k or None,
            seed=seed,
            stop_ids=self.tok.stop_ids,
        )
        try:
            return self.engine.submit(req)
        except ValueError as err:
            raise APIError(str(err)) from None


def _stops(body: _Body) -> list[str]:
    if body.stop is None:
        return []
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if len(stops) > 4:
        raise APIError("stop takes at most 4 strings", param="stop")
    return stops


class _Choice:
    def __init__(self, tok: Tokenizer, stops: list[str]) -> None:
        self.text = TextStream(tok, stops)
        self.tokens = 0
        self.finish: str | None = None
        self.error: str | None = None


async def _events(
    served: _Served, prompts: list[list[int]], body: _Body, max_tokens: list[int]
) -> AsyncIterator[tuple[int, str, _Choice]]:
    """Run one engine request per choice; yield ``(index, delta, choice)`` as text arrives, and once more
    (delta ``""``) when a choice ends (``choice.finish`` or ``choice.error`` set). Cancels what is still running
    when the consumer stops early (a client that went away)."""
    queue: asyncio.Queue = asyncio.Queue()
    stops = _stops(body)
    choices = [_Choice(served.tok, stops) for _ in prompts]
    reqs: list[EngineRequest] = []
    try:
        for i, p in enumerate(prompts):
            reqs.append(served.start(p, body, max_tokens[i], queue, i))
        live = len(reqs)
        while live:
            i, (kind, value) = await queue.get()
            c = choices[i]
            if c.finish is not None or c.error is not None:
                continue  # a choice ended by a stop string: its request's late events are dropped
            if kind == "token":
                c.tokens += 1
                delta = c.text.push(int(value))
                if c.text.stopped:
                    reqs[i].cancel()
                    c.finish = "stop"
                    live -= 1
                    yield i, delta, c
                elif delta:
                    yield i, delta, c
            else:
                live -= 1
                if kind == "error" or value == "cancelled":  # cancelled here: the engine shut down
                    c.error = str(value) if kind == "error" else "the server shut down mid-reply"
                    yield i, "", c
                else:
                    c.finish = "stop" if value == "stop" else "length"
                    yield i, c.text.finish(), c
    finally:
        for r in reqs:
            r.cancel()


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict[str, int]:
    done = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


def create_app(engine: Engine, tok: Tokenizer, model_name: str) -> FastAPI:
    """The FastAPI application serving ``engine`` under the name ``model_name``."""
    app = FastAPI(title="lit-llm serve", description="An OpenAI-compatible API over a lit_llm model.")
    served = _Served(engine, tok, model_name)
    app.state.served = served

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return JSONResponse(APIError(message, param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        e = APIError(f"internal error: {type(err).__name__}: {err}", 500, kind="server_error")
        return JSONResponse(e.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": served.name,
            "live": len(engine.rows),
            "waiting": len(engine.pending),
        }

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "lit_llm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != served.name:
            raise APIError(f"the model {name!r} does not exist", 404, param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        served.check(body)
        prompt = served.chat_prompt(body)
        asked = body.max_completion_tokens or body.max_tokens
        budget = served.budget(prompt, asked, "max_tokens")
        prompts = [prompt] * body.n
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": served.name, "system_fingerprint": None}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))

            async def sse() -> AsyncIterator[str]:
                chunk = {**head, "object": "chat.completion.chunk"}
                for i in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse({**chunk, "choices": [_chunk_choice(i, delta, None)]})
                choices: dict[int, _Choice] = {}
                async for i, delta, c in _events(served, prompts, body, [budget] * body.n):
                    choices[i] = c
                    if c.error is not None:
                        yield _sse(APIError(c.error, 500, kind="server_error").body())
                        continue
                    if delta:
                        yield _sse({**chunk, "choices": [_chunk_choice(i, {"content": delta}, None)]})
                    if c.finish is not None:
                        yield _sse({**chunk, "choices": [_chunk_choice(i, {}, c.finish)]})
                if usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(len(prompt), list(choices.values()))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        choices = await _collect(served, prompts, body, [budget] * body.n)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text.text},
                    "logprobs": None,
                    "finish_reason": c.finish,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(len(prompt), choices),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        served.check(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError("prompt is empty", param="prompt")
        encoded = [tok.encode(t, bos=tok.adds_bos) for t in texts]
        budgets = [served.budget(p, body.max_tokens, "max_tokens") for p in encoded]
        # choice k = prompt k // n, sample k % n (as OpenAI orders them)
        prompts = [p for p in encoded for _ in range(body.n)]
        budgets = [b for b in budgets for _ in range(body.n)]
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": served.name, "object": "text_completion"}
        n_prompt = sum(len(p) for p in encoded)
        if body.stream:

            async def sse() -> AsyncIterator[str]:
                choices: dict[int, _Choice] = {}
                async for i, delta, c in _events(served, prompts, body, budgets):
                    choices[i] = c
                    if c.error is not None:
                        yield _sse(APIError(c.error, 500, kind="server_error").body())
                    elif delta or c.finish is not None:
                        item = {"index": i, "text": delta, "logprobs": None, "finish_reason": c.finish}
                        yield _sse({**head, "choices": [item]})
                if (body.stream_options or {}).get("include_usage"):
                    yield _sse({**head, "choices": [], "usage": _usage(n_prompt, list(choices.values()))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        choices = await _collect(served, prompts, body, budgets)
        return {
            **head,
            "choices": [
                {"index": i, "text": c.text.text, "logprobs": None, "finish_reason": c.finish}
                for i, c in enumerate(choices)
            ],
            "usage": _usage(n_prompt, choices),
        }

    return app


async def _collect(
    served: _Served, prompts: list[list[int]], body: _Body, budgets: list[int]
) -> list[_Choice]:
    """Every choice to its end (non-streamed answers); an engine failure becomes a 500 error object."""
    choices: dict[int, _Choice] = {}
    async for i, _, c in _events(served, prompts, body, budgets):
        choices[i] = c
        if c.error is not None:
            raise APIError(f"decoding failed: {c.error}", 500, kind="server_error")
    return [choices[i] for i in range(len(prompts))]


def _chunk_choice(i: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
