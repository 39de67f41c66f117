"""Serving: the continuous-batching engine, stop strings and detokenisation, and the OpenAI-compatible API
driven by the real ``openai`` client against a server on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lit_llm.backbone import Transformer
from lit_llm.backbone.generate import generate
from lit_llm.serve.engine import Engine, Request
from lit_llm.serve.text import TextStream
from lit_llm.tokenizer import Tokenizer
from tests.hf_fixtures import make_hf_llama
from tests.test_backbone import LLAMA4_KINDS, WINDOW_KINDS, tiny

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

# learned positions see a wrong position that RoPE's relative angles can hide; the Llama 4 and window kinds
# have local layers, which read the cache's stored key positions
FLAVOURS = {
    "learned": dict(pos="learned", init_std=0.3),
    "rope": dict(init_std=0.3),
    "llama4": LLAMA4_KINDS,
    "window": WINDOW_KINDS,
}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 6, 14, 2, 9, 5][:n]
    return [torch.randint(1, 97, (k,), generator=g).tolist() for k in lengths]


def _run_all(engine: Engine, reqs: list[tuple[list[int], int, dict]]) -> list[tuple[list[int], str]]:
    """Submit every request to a paused engine, then let it run: (tokens, finish reason) per request."""
    out: list[list[int]] = [[] for _ in reqs]
    ends: list[str | None] = [None] * len(reqs)
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if event[0] == "token":
                out[i].append(int(event[1]))
            else:
                ends[i] = str(event[1])
                done.release()

        return emit

    for i, (p, n, kw) in enumerate(reqs):
        engine.submit(Request(p, n, emitter(i), **kw))
    engine.resume()
    for _ in reqs:
        assert done.acquire(timeout=60)
    return list(zip(out, ends))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_each_row_of_a_continuous_batch_equals_its_decoding_alone(flavour):
    """7 requests of different lengths and budgets through 3 rows: rows join when others finish, prompts are
    prefilled in chunks, and every reply equals greedy ``generate`` of that prompt alone."""
    torch.manual_seed(0)
    model = Transformer(tiny(**FLAVOURS[flavour])).eval().requires_grad_(False)
    prompts = _prompts(7)
    budgets = [20, 7, 15, 4, 18, 9, 12]
    alone = [generate(model, [p], n).response_lists()[0] for p, n in zip(prompts, budgets)]
    engine = Engine(model, max_batch=3, context=48, prefill_chunk=4, paused=True)
    try:
        got = _run_all(engine, [(p, n, {}) for p, n in zip(prompts, budgets)])
    finally:
        engine.close()
    assert [t for t, _ in got] == alone
    assert all(end == "length" for _, end in got)
    assert engine.max_live == 3  # batched, not one after another
    # 7 requests of 85 tokens in all took far fewer passes than decoding them one by one (78 steps)
    assert engine.steps < sum(budgets) - len(budgets)


def test_stop_tokens_end_a_row_and_its_slot_goes_to_the_next_request():
    torch.manual_seed(0)
    model = Transformer(tiny(**FLAVOURS["learned"])).eval().requires_grad_(False)
    prompts = _prompts(4, seed=1)
    free = generate(model, [prompts[0]], 10).response_lists()[0]
    stop = free[3]  # the 4th token of the first reply ends it
    alone = [generate(model, [p], 10, stop_tokens=[stop]).response_lists()[0] for p in prompts]
    engine = Engine(model, max_batch=2, context=40, paused=True)
    try:
        got = _run_all(engine, [(p, 10, {"stop_ids": [stop]}) for p in prompts])
    finally:
        engine.close()
    assert [t for t, _ in got] == alone
    assert got[0][0][-1] == stop and got[0][1] == "stop" and len(got[0][0]) <= 4


def test_a_seeded_sampled_request_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(**FLAVOURS["rope"])).eval().requires_grad_(False)
    prompts = _prompts(4, seed=2)
    kw = {"temperature": 1.0, "top_p": 0.9, "seed": 123}
    engine = Engine(model, max_batch=4, context=40, paused=True)
    try:
        alone = _run_all(engine, [(prompts[0], 16, kw)])[0][0]
        engine.pause()
        others = [(p, 16, {"temperature": 1.0, "seed": i}) for i, p in enumerate(prompts[1:])]
        batched = _run_all(engine, [*others, (prompts[0], 16, kw)])
        engine.pause()
        reseeded = _run_all(engine, [(prompts[0], 16, {**kw, "seed": 124})])[0][0]
    finally:
        engine.close()
    assert batched[-1][0] == alone
    assert reseeded != alone  # the seed, not luck, fixes the tokens


def test_cancel_frees_the_row_and_the_others_go_on():
    torch.manual_seed(0)
    model = Transformer(tiny(**FLAVOURS["rope"])).eval().requires_grad_(False)
    prompts = _prompts(3, seed=3)
    alone = [generate(model, [p], 12).response_lists()[0] for p in prompts]
    engine = Engine(model, max_batch=2, context=40, paused=True)
    events: list[list] = [[], [], []]
    done = threading.Semaphore(0)

    def emitter(i, req_box):
        def emit(event):
            events[i].append(event)
            if event[0] == "token" and i == 0 and len(events[0]) == 2:
                req_box[0].cancel()  # the client of row 0 goes away after two tokens
            if event[0] != "token":
                done.release()

        return emit

    try:
        for i, p in enumerate(prompts):
            box: list = []
            box.append(engine.submit(Request(p, 12 if i else 30, emitter(i, box))))
        engine.resume()
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    assert events[0][-1] == ("done", "cancelled") and len(events[0]) <= 4
    for i in (1, 2):  # the third request took the cancelled row; both equal their decoding alone
        assert [int(v) for k, v in events[i] if k == "token"] == alone[i]
        assert events[i][-1] == ("done", "length")


def test_engine_refuses_what_does_not_fit_before_queueing():
    model = Transformer(tiny()).eval().requires_grad_(False)
    engine = Engine(model, max_batch=1, context=16)
    try:
        with pytest.raises(
            ValueError, match=r"prompt \(10 tokens\) plus max_tokens \(7\) exceeds the context of 16"
        ):
            engine.submit(Request(list(range(1, 11)), 7, lambda e: None))
        with pytest.raises(ValueError, match="no tokens"):
            engine.submit(Request([], 3, lambda e: None))
        with pytest.raises(ValueError, match="top_p"):
            engine.submit(Request([1], 3, lambda e: None, temperature=1.0, top_p=1.5))
        assert not engine.pending
        assert engine.generate([1, 2, 3], 4)[1] == "length"  # and it still serves
    finally:
        engine.close()


# ---- text: detokenisation and stop strings ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("serve") / "tiny", "chatml", max_position_embeddings=128)


def _stream_deltas(tok: Tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    s = TextStream(tok, stop)
    deltas = [s.push(t) for t in tok.encode(text)]
    if not s.stopped:
        deltas.append(s.finish())
    return deltas, s


def test_text_stream_never_shows_any_part_of_a_stop_string(folder):
    tok = Tokenizer.load(folder)
    text = "the cat sat. END of it"
    deltas, s = _stream_deltas(tok, text, ["END", "zzz"])
    assert s.stopped and "".join(deltas) == "the cat sat. "
    sent = ""
    for d in deltas:  # what the client has seen is always a prefix of the final text
        sent += d
        assert "the cat sat. ".startswith(sent)
    deltas, s = _stream_deltas(tok, text, ["nowhere"])
    assert not s.stopped and "".join(deltas) == text


def test_text_stream_holds_back_half_a_character(folder):
    tok = Tokenizer.load(folder)
    text = "smile 🙂 and é"
    assert len(tok.encode("🙂")) > 1  # the emoji's bytes span tokens in this byte-level BPE
    deltas, _ = _stream_deltas(tok, text, [])
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


# ---- the HTTP API --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, folder: Path, max_batch: int = 4) -> None:
        from lit_llm.checkpoint import load_for_inference
        from lit_llm.serve.app import create_app

        self.model, self.tok, _ = load_for_inference(folder)
        self.engine = Engine(self.model, max_batch=max_batch, context=128)
        self.port = _free_port()
        config = uvicorn.Config(
            create_app(self.engine, self.tok, "tiny"), port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()

    def greedy(self, messages, n: int) -> str:
        ids = self.tok.render_chat(messages, add_generation_prompt=True)[0]
        out = generate(self.model, [ids], n, stop_tokens=self.tok.stop_ids).response_lists()[0]
        return self.tok.decode(out)


@pytest.fixture(scope="module")
def server(folder):
    s = _Server(folder)
    yield s
    s.close()
    assert not s.thread.is_alive()  # shut down cleanly


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the cat?"}]


def test_chat_completion_is_the_models_greedy_reply(server):
    r = server.client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == server.greedy(MSGS, 20)
    prompt = server.tok.render_chat(MSGS, add_generation_prompt=True)[0]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 20
    assert r.choices[0].finish_reason == "length"
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_streamed_chunks_reassemble_to_the_non_streamed_reply(server):
    kw = dict(model="tiny", messages=MSGS, max_tokens=24, temperature=0)
    whole = server.client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(
        server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and len({c.id for c in chunks}) == 1


def test_two_concurrent_requests_are_batched_and_each_equals_its_result_alone(server):
    convs = [[{"role": "user", "content": "Tell me about the dog."}], [{"role": "user", "content": "Hi!"}]]
    results: list = [None, None]
    server.engine.pause()

    def ask(i):
        r = server.client.chat.completions.create(
            model="tiny", messages=convs[i], max_tokens=30, temperature=0
        )
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while len(server.engine.pending) < 2:  # both requests wait for the engine: they will share a pass
        assert time.time() < deadline
        time.sleep(0.01)
    server.engine.max_live = 0
    server.engine.resume()
    for t in threads:
        t.join(30)
    assert server.engine.max_live == 2
    assert results == [server.greedy(c, 30) for c in convs]


def test_stop_strings_n_and_seed(server):
    whole = server.greedy(MSGS, 30)
    cut = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert cut and cut in whole
    r = server.client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=30, temperature=0, stop=[cut]
    )
    assert r.choices[0].message.content == whole[: whole.index(cut)]
    assert r.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", messages=MSGS, max_tokens=12, temperature=1.0, n=2, seed=7)
    a = server.client.chat.completions.create(**kw)
    b = server.client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 24


def test_completions_continue_raw_text(server):
    r = server.client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0)
    ids = server.tok.encode("the cat", bos=server.tok.adds_bos)
    want = server.tok.decode(
        generate(server.model, [ids], 8, stop_tokens=server.tok.stop_ids).response_lists()[0]
    )
    assert r.choices[0].text == want and r.object == "text_completion"
    streamed = server.client.completions.create(
        model="tiny", prompt="the cat", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_bad_requests_get_openai_error_objects(server):
    with pytest.raises(openai.BadRequestError) as err:
        server.client.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    assert err.value.body["type"] == "invalid_request_error" and "temperature" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        server.client.chat.completions.create(model="gpt-4", messages=MSGS)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="exceeds the context of 128"):
        server.client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=500)
    long = [{"role": "user", "content": "cat " * 400}]
    with pytest.raises(openai.BadRequestError, match="nothing is truncated") as err:
        server.client.chat.completions.create(model="tiny", messages=long)
    assert err.value.body["code"] == "context_length_exceeded"
    r = httpx.post(
        f"{server.url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    assert not server.engine.pending and not server.engine.rows  # nothing was queued


def test_a_client_leaving_mid_stream_frees_its_row(server):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 80, "temperature": 0, "stream": True}
    server.engine.steps = 0
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = [next(lines) for _ in range(3)]
    assert first[0].startswith("data: ")
    deadline = time.time() + 10
    while server.engine.rows:  # its row is retired, well before 80 tokens
        assert time.time() < deadline, "the abandoned request kept its row"
        time.sleep(0.01)
    assert server.engine.steps < 79
    r = server.client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == server.greedy(MSGS, 5)


# ---- the command -------------------------------------------------------------------------------------------------


def test_serve_command_answers_and_shuts_down_cleanly(folder):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lit_llm",
        "serve",
        "--ckpt",
        str(folder),
        "--port",
        str(port),
        "--max_batch",
        "2",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "lit-llm serve did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        # a second server on the same port says so in one line, before loading anything
        second = subprocess.run([*cmd[:-2]], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"port {port} on 127.0.0.1 is already in use" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Finished server process" in out and "Traceback" not in out
