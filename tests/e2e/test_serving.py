"""Serving on real checkpoints, end to end (issue 4, SPEC 3-5).

Every test starts `seedance-server` on a tiny Hugging Face checkpoint from
tests/fixtures/models (random weights, real tokenizer and chat template) or on `synthetic:tiny`,
and talks to it through clients nobody here wrote: the official `openai` Python client (sync and
async), `websockets`, and `http.client` for raw bodies and SSE.

1. Streamed text equals non-streamed text for the same seed: WS token/chunk/full, SSE and JSON
   on /v1/completions and /v1/chat/completions; seeds are reproducible; temperature 0 is greedy.
2. The `openai` client: chat and completions, streaming and not, usage chunks, models.list,
   stop strings, and the error classes for bad requests and unknown models.
3. Cancel over WS, closing the WS, and dropping an SSE stream free the KV cache and count
   `cancelled`.
4. 64 concurrent WS streams of mixed lengths each equal the same request run alone.
5. Over --max-running/--max-waiting: HTTP 429 with an OpenAI error body and WS `overloaded`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import openai
import pytest

from conftest import Server, metric_value, run
from servinglib import (
    assert_openai_error,
    chat_text,
    completion_text,
    fixture_model,
    kv_usage,
    outcome_count,
    post_json,
    post_ok,
    post_sse,
    sse_text,
    wait_for,
    wait_kv_free,
    ws_generate,
)
from wsclient import collect, open_ws, session_of

MODES = ("token", "chunk", "full")
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me about the river town."},
]
MAX_TOKENS = 48

# Sampled (not greedy) settings: plain temperature, and every filter and penalty at once.
SAMPLED = [
    pytest.param({"temperature": 0.8, "seed": 1234}, id="t0.8"),
    pytest.param(
        {
            "temperature": 0.8,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.02,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.4,
            "frequency_penalty": 0.2,
            "seed": 77,
        },
        id="t0.8-filters-penalties",
    ),
]


def oai(server: Server, **kw) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    return openai.OpenAI(base_url=f"http://{server.addr}/v1", api_key="sk-test", **kw)


def aoai(server: Server, **kw) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    return openai.AsyncOpenAI(base_url=f"http://{server.addr}/v1", api_key="sk-test", **kw)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def ref(request):
    """(server, served model name) for each reference checkpoint."""
    name = request.param
    s = Server(model=fixture_model(name))
    yield s, name
    s.kill()


@pytest.fixture(scope="module")
def qwen():
    s = Server(model=fixture_model("qwen2"))
    yield s
    s.kill()


def ws_all_modes(server: Server, **fields) -> dict[str, object]:
    """The same generation in each stream mode over one connection, one after another."""

    async def go():
        out = {}
        async with open_ws(server) as ws:
            await session_of(ws)
            for mode in MODES:
                await ws.send(json.dumps({"type": "generate", "id": mode, "stream_mode": mode, **fields}))
                s = (await collect(ws, [mode]))[mode]
                assert not s.errors, s.errors
                s.check_order()
                out[mode] = s
        return out

    return run(go())


def check_ws_modes(streams: dict, want: str, max_tokens: int) -> None:
    for mode, s in streams.items():
        assert s.text == want, f"{mode}: WS text differs from the non-streamed text"
        assert s.done["finish_reason"] == "length", (mode, s.done)
        assert s.done["usage"]["completion_tokens"] == max_tokens, (mode, s.done)
    # token mode: a delta per token (plus at most a final flush of held-back bytes);
    # full mode: exactly one delta.
    assert max_tokens <= len(streams["token"].deltas) <= max_tokens + 1, len(streams["token"].deltas)
    assert len(streams["full"].deltas) == 1
    assert len(streams["chunk"].deltas) <= len(streams["token"].deltas)


# ---------------------------------------------------------------- 1. streamed == non-streamed


@pytest.mark.parametrize("sampling", SAMPLED)
def test_prompt_text_equal_across_ws_modes_sse_and_json(ref, sampling):
    server, model = ref
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, **sampling}
    plain = post_ok(server, "/v1/completions", body)
    want = completion_text(plain)
    assert want, plain
    assert plain["object"] == "text_completion"
    assert plain["model"] == model
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == MAX_TOKENS
    assert plain["usage"]["total_tokens"] == plain["usage"]["prompt_tokens"] + MAX_TOKENS

    sse = post_sse(server, "/v1/completions", {**body, "stream": True})
    assert sse_text(sse, chat=False) == want
    assert sse.chunks[-1]["choices"][0]["finish_reason"] == "length"

    streams = ws_all_modes(server, prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, **sampling)
    check_ws_modes(streams, want, MAX_TOKENS)
    assert streams["token"].done["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


@pytest.mark.parametrize("sampling", SAMPLED)
def test_messages_text_equal_across_ws_modes_sse_and_json(ref, sampling):
    server, model = ref
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True, **sampling}
    plain = post_ok(server, "/v1/chat/completions", body)
    want = chat_text(plain)
    assert want, plain
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["role"] == "assistant"
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == MAX_TOKENS

    sse = post_sse(server, "/v1/chat/completions", {**body, "stream": True})
    assert sse_text(sse, chat=True) == want
    roles = [c["choices"][0]["delta"].get("role") for c in sse.chunks if c["choices"]]
    assert roles[0] == "assistant" and all(r is None for r in roles[1:]), roles

    streams = ws_all_modes(server, messages=MESSAGES, max_tokens=MAX_TOKENS, ignore_eos=True, **sampling)
    check_ws_modes(streams, want, MAX_TOKENS)
    assert streams["token"].done["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    # The chat template wraps the messages: more prompt tokens than the bare contents.
    bare = post_ok(server, "/v1/completions", {"model": model, "prompt": MESSAGES[1]["content"], "max_tokens": 1})
    assert plain["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"]


def test_seed_reproducible_and_temperature_zero_greedy(ref):
    server, model = ref
    base = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}

    def text(**kw) -> str:
        return completion_text(post_ok(server, "/v1/completions", {**base, **kw}))

    a1, a2 = text(temperature=0.8, seed=5), text(temperature=0.8, seed=5)
    b = text(temperature=0.8, seed=6)
    assert a1 == a2, "same seed, different text"
    assert a1 != b, "different seeds gave the same 48 sampled tokens"
    g1, g2 = text(temperature=0), text(temperature=0)
    assert g1 == g2, "greedy decoding is not deterministic"
    # Greedy ignores the seed, and equals top_k 1 sampling.
    assert text(temperature=0, seed=123) == g1
    assert text(temperature=0.8, top_k=1, seed=9) == g1
    assert g1 != a1
    # And over WS.
    assert run(ws_generate(server, prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)).text == g1
    assert run(ws_generate(server, prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.8, seed=5)).text == a1


# ---------------------------------------------------------------- 2. the official openai client


def test_openai_sync_models_completions_and_chat(qwen):
    client = oai(qwen)
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen2"]

    kw = dict(model="qwen2", max_tokens=24, temperature=0.8, seed=42, extra_body={"ignore_eos": True})
    c = client.completions.create(prompt=PROMPT, **kw)
    assert c.object == "text_completion" and c.model == "qwen2"
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 24
    text = c.choices[0].text

    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.total_tokens == c.usage.total_tokens

    # Without include_usage there is no usage chunk.
    plain_chunks = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
    assert all(ch.choices and ch.usage is None for ch in plain_chunks)

    chat = client.chat.completions.create(messages=MESSAGES, **kw)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 24
    stream = client.chat.completions.create(messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kw)
    got, usage, finish = [], None, None
    for ch in stream:
        assert ch.object == "chat.completion.chunk"
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            got.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(got) == chat.choices[0].message.content
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 24
    assert usage.prompt_tokens == chat.usage.prompt_tokens


def test_openai_async_concurrent_streams(qwen):
    async def go():
        client = aoai(qwen)
        try:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["qwen2"]

            async def one(i: int):
                kw = dict(model="qwen2", max_tokens=8 + i, temperature=0.8, seed=i, extra_body={"ignore_eos": True})
                if i % 2:
                    full = await client.chat.completions.create(messages=[{"role": "user", "content": f"story {i}"}], **kw)
                    want = full.choices[0].message.content
                    stream = await client.chat.completions.create(
                        messages=[{"role": "user", "content": f"story {i}"}],
                        stream=True,
                        stream_options={"include_usage": True},
                        **kw,
                    )
                    parts, usage = [], None
                    async for ch in stream:
                        usage = ch.usage or usage
                        parts += [c.delta.content or "" for c in ch.choices]
                else:
                    full = await client.completions.create(prompt=f"story {i}", **kw)
                    want = full.choices[0].text
                    stream = await client.completions.create(
                        prompt=f"story {i}", stream=True, stream_options={"include_usage": True}, **kw
                    )
                    parts, usage = [], None
                    async for ch in stream:
                        usage = ch.usage or usage
                        parts += [c.text for c in ch.choices]
                assert "".join(parts) == want, i
                assert usage is not None and usage.completion_tokens == 8 + i, (i, usage)

            await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()

    run(go())


def _stop_candidate(text: str) -> str:
    """A 3-character ASCII-alphanumeric stop string whose first occurrence is well inside `text`."""
    for i in range(4, len(text) - 3):
        cand = text[i : i + 3]
        if cand.isascii() and cand.isalnum() and text.find(cand) == i:
            return cand
    raise AssertionError(f"no usable stop string in {text!r}")


STOP_MAX_TOKENS = 150  # far beyond the stop string: the engine cannot finish before the stop lands


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_openai_stop_truncates_before_stop_string(qwen, endpoint):
    client = oai(qwen)
    kw = dict(model="qwen2", max_tokens=STOP_MAX_TOKENS, temperature=0.8, seed=3, extra_body={"ignore_eos": True})

    def create(**more):
        if endpoint == "chat":
            return client.chat.completions.create(messages=MESSAGES, **kw, **more)
        return client.completions.create(prompt=PROMPT, **kw, **more)

    def text_of(resp) -> str:
        return resp.choices[0].message.content if endpoint == "chat" else resp.choices[0].text

    def stream_text(**more) -> tuple[str, str | None]:
        parts, finish = [], None
        for ch in create(stream=True, **more):
            for c in ch.choices:
                parts.append((c.delta.content or "") if endpoint == "chat" else c.text)
                finish = c.finish_reason or finish
        return "".join(parts), finish

    unstopped = create()
    assert unstopped.choices[0].finish_reason == "length"
    full = text_of(unstopped)
    stop = _stop_candidate(full)
    cut = full[: full.index(stop)]

    stopped = create(stop=[stop, "never-occurs-zz"])
    assert stop not in text_of(stopped)
    assert text_of(stopped) == cut
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < STOP_MAX_TOKENS

    s_text, s_finish = stream_text(stop=[stop])
    assert stop not in s_text
    assert s_text == cut
    assert s_finish == "stop"

    # A single string works too, and WS honours `stop` in every mode.
    assert text_of(create(stop=stop)) == cut
    if endpoint == "completions":
        streams = ws_all_modes(
            qwen, prompt=PROMPT, max_tokens=STOP_MAX_TOKENS, temperature=0.8, seed=3, ignore_eos=True, stop=[stop]
        )
        for mode, s in streams.items():
            assert s.text == cut, mode
            assert s.done["finish_reason"] == "stop", (mode, s.done)


def _tokens_until(server: Server, stop: str, **fields) -> tuple[int, str]:
    """Streams `fields` in token mode and returns (k, text of the first k tokens), k the first
    token count whose text contains `stop`."""
    s = run(ws_generate(server, stream_mode="token", **fields))
    acc = ""
    for k, d in enumerate(s.deltas, 1):
        acc += d["text"]
        if stop in acc:
            return k, acc
    raise AssertionError(f"{stop!r} not in {acc!r}")



def test_stop_string_completed_by_last_token_is_finish_stop(qwen):
    """The stop string is completed by token k and max_tokens is k: the text is truncated before
    it, so finish_reason must be "stop" (OpenAI, vLLM), and usage counts k tokens."""
    fields = dict(prompt=PROMPT, temperature=0.8, seed=3, ignore_eos=True)
    full = completion_text(post_ok(qwen, "/v1/completions", {"model": "qwen2", "max_tokens": 64, **fields}))
    stop = _stop_candidate(full)
    k, _ = _tokens_until(qwen, stop, max_tokens=64, **fields)
    body = post_ok(qwen, "/v1/completions", {"model": "qwen2", "max_tokens": k, "stop": [stop], **fields})
    assert completion_text(body) == full[: full.index(stop)]
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) == ("stop", k)


def test_stop_string_usage_is_deterministic(qwen):
    """The same seeded request stopped by a stop string reports the same usage every time: the k
    tokens up to the one that completed the stop string (not whatever the engine ran ahead)."""
    fields = dict(prompt=PROMPT, temperature=0.8, seed=3, ignore_eos=True)
    full = completion_text(post_ok(qwen, "/v1/completions", {"model": "qwen2", "max_tokens": 64, **fields}))
    stop = _stop_candidate(full)
    k, _ = _tokens_until(qwen, stop, max_tokens=64, **fields)
    seen = []
    for _ in range(30):
        body = post_ok(qwen, "/v1/completions", {"model": "qwen2", "max_tokens": 64, "stop": [stop], **fields})
        assert completion_text(body) == full[: full.index(stop)]
        seen.append(body["usage"]["completion_tokens"])
    assert seen == [k] * 30, f"completion_tokens over 30 identical requests: {seen}, stop completed by token {k}"


def test_openai_errors(qwen):
    client = oai(qwen)
    bad = [
        lambda: client.completions.create(model="qwen2", prompt="x", temperature=5),
        lambda: client.chat.completions.create(model="qwen2", messages=MESSAGES, temperature=5),
        lambda: client.completions.create(model="qwen2", prompt="x", max_tokens=0),
        lambda: client.chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=0),
        lambda: client.chat.completions.create(model="qwen2", messages=openai.omit),
        lambda: client.chat.completions.create(model="qwen2", messages=MESSAGES, top_p=0),
        lambda: client.completions.create(model="qwen2", prompt="x", stream=True, temperature=-1),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(openai.BadRequestError) as ei:
            call()
        assert ei.value.status_code == 400, i
        assert isinstance(ei.value.body, dict) and ei.value.body.get("message"), (i, ei.value.body)
        assert ei.value.type == "invalid_request_error", (i, ei.value.body)

    for call in (
        lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=1),
        lambda: client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=1),
        lambda: client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=1, stream=True),
    ):
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        assert ei.value.status_code == 404
        assert ei.value.code == "model_not_found", ei.value.body

    # Raw bodies the client would never send: OpenAI-shaped 400s.
    for path in ("/v1/completions", "/v1/chat/completions"):
        for raw in (b'{"model":"qwen2","prompt":', b"not json", b"[1,2,3]", b""):
            status, headers, data = post_json(qwen, path, raw)
            assert_openai_error(status, data, 400)
            assert headers["content-type"].startswith("application/json")
    status, _, data = post_json(qwen, "/v1/chat/completions", {"model": "qwen2", "messages": "hi"})
    assert_openai_error(status, data, 400)
    status, _, data = post_json(qwen, "/v1/completions", {"model": "qwen2"})
    assert_openai_error(status, data, 400)

    # The server still serves (EOS ignored: a sampled first token may be EOS).
    r = client.completions.create(model="qwen2", prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_unsupported_openai_features_are_refused_not_ignored(qwen):
    """Tool calling, JSON mode, logit_bias, echo: a 400 naming the parameter, never an answer
    that silently ignores what was asked; their neutral values pass."""
    client = oai(qwen)
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    for call, param in (
        (lambda: client.chat.completions.create(model="qwen2", messages=MESSAGES, tools=[tool]), "tools"),
        (lambda: client.chat.completions.create(model="qwen2", messages=MESSAGES, response_format={"type": "json_object"}), "response_format"),
        (lambda: client.chat.completions.create(model="qwen2", messages=MESSAGES, logit_bias={"5": 100}), "logit_bias"),
        (lambda: client.completions.create(model="qwen2", prompt="x", echo=True), "echo"),
    ):
        with pytest.raises(openai.BadRequestError) as ei:
            call()
        assert ei.value.param == param, ei.value.body
        assert ei.value.code == "unsupported_parameter", ei.value.body
    r = client.chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=2, tools=[], tool_choice="none",
                                       response_format={"type": "text"}, logit_bias={}, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_tool_choice_auto_without_tools_is_not_refused(qwen):
    """Some SDKs send `tool_choice: "auto"` (and empty tool lists) on every request; with no
    tools it asks for plain text, which is what seedance answers: not a 400."""
    client = oai(qwen)
    r = client.chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=2, tool_choice="auto",
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2
    r = client.chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=2, tools=[], tool_choice="auto",
                                       extra_body={"functions": [], "function_call": "none", "ignore_eos": True})
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=2, tool_choice="required")
    assert ei.value.param == "tool_choice", ei.value.body


def test_prompt_longer_than_context_is_400(qwen):
    client = oai(qwen)
    prompt = "word " * 400  # > 256 tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="qwen2", prompt=prompt, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen2", messages=[{"role": "user", "content": prompt}], max_tokens=4, stream=True)


def test_max_tokens_beyond_the_context_is_400_naming_it(qwen):
    """prompt + max_tokens > max_model_len (256 for the fixture): refused up front like OpenAI
    and vLLM, over HTTP and WS; exactly filling the context is fine."""
    client = oai(qwen)
    usage = client.completions.create(model="qwen2", prompt=PROMPT, max_tokens=1).usage
    room = 256 - usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="qwen2", prompt=PROMPT, max_tokens=room + 1)
    assert ei.value.code == "context_length_exceeded", ei.value.body
    assert ei.value.param == "max_tokens", ei.value.body
    assert f"at most {room}" in ei.value.message
    full = client.completions.create(model="qwen2", prompt=PROMPT, max_tokens=room, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == room
    assert full.choices[0].finish_reason == "length"

    async def ws():
        async with open_ws(qwen) as conn:
            await session_of(conn)
            await conn.send(json.dumps({"type": "generate", "id": "big", "prompt": PROMPT, "max_tokens": room + 1}))
            return (await collect(conn, ["big"]))["big"]

    s = run(ws())
    assert [e["code"] for e in s.errors] == ["context_length_exceeded"], s.errors
    assert not s.deltas


# ---------------------------------------------------------------- 3. cancellation frees KV

LONG = 4000  # tokens: seconds of generation on synthetic:tiny, far longer than any cancel takes


@pytest.fixture
def synth(start_server):
    """synthetic:tiny with a small KV cache (so one sequence's blocks show in the ratio)."""
    # A short resume grace: a vanished client's generation runs on that long, then is cancelled.
    s = start_server("--kv-cache-mb", "4", "--resume-grace-ms", "1000", model="synthetic:tiny")
    ids = [m["id"] for m in json.loads(s.get("/v1/models")[2])["data"]]
    assert len(ids) == 1
    s.model_name = ids[0]
    return s


def test_ws_cancel_mid_stream_frees_kv(synth):
    before = outcome_count(synth, "cancelled", synth.model_name)

    async def go():
        async with open_ws(synth) as ws:
            await session_of(ws)
            await ws.send(json.dumps({"type": "generate", "id": "c", "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream_mode": "token", "temperature": 0.8, "seed": 1}))
            first = json.loads(await ws.recv())
            assert first["type"] == "delta" and first["seq"] == 1, first
            # Running: blocks are held.
            used = await asyncio.to_thread(kv_usage, synth)
            assert used > 0, "no KV blocks in use while a sequence runs"
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            seqs = [1]
            while True:
                m = json.loads(await ws.recv())
                assert m["id"] == "c", m
                if m["type"] == "done":
                    break
                assert m["type"] == "delta", m
                seqs.append(m["seq"])
            assert seqs == list(range(1, len(seqs) + 1))
            assert m["finish_reason"] == "cancelled", m
            assert m["seq"] == len(seqs) + 1
            assert m["usage"]["completion_tokens"] < LONG
            await asyncio.to_thread(wait_kv_free, synth, 5.0)
            # The connection and engine still serve.
            await ws.send(json.dumps({"type": "generate", "id": "after", "prompt": "hi", "max_tokens": 4, "ignore_eos": True}))
            s = (await collect(ws, ["after"]))["after"]
            assert s.done["finish_reason"] == "length"

    run(go(), 30)
    assert outcome_count(synth, "cancelled", synth.model_name) == before + 1
    wait_kv_free(synth)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_ws_disconnect_mid_stream_frees_kv(synth, how):
    before = outcome_count(synth, "cancelled", synth.model_name)

    async def go():
        # max_queue=None: websockets stops reading the socket once 16 unread messages queue up,
        # and would then never see the server's close frame (close() would wait close_timeout).
        ws = await open_ws(synth, max_queue=None)
        await session_of(ws)
        for i in range(3):  # several generations on the one connection
            await ws.send(json.dumps({"type": "generate", "id": f"d{i}", "prompt": f"{i} {PROMPT}", "max_tokens": LONG, "ignore_eos": True, "stream_mode": "token"}))
        seen = set()
        while len(seen) < 3:
            m = json.loads(await ws.recv())
            assert m["type"] == "delta", m
            seen.add(m["id"])
        assert await asyncio.to_thread(kv_usage, synth) > 0
        if how == "close":
            await ws.close()  # a deliberate close cancels at once
        else:
            ws.transport.abort()  # no close frame: a TCP reset / vanished client

    run(go(), 30)
    if how == "abort":
        # Resumable: the generations go on for resume_grace (1 s here), then are cancelled.
        time.sleep(0.3)
        assert kv_usage(synth) > 0, "a vanished client's generation must wait for a resume"
    wait_kv_free(synth, 5.0 if how == "close" else 8.0)
    wait_for(
        lambda: outcome_count(synth, "cancelled", synth.model_name) == before + 3,
        5.0,
        what="3 more cancelled requests",
    )


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_sse_drop_mid_stream_frees_kv(synth, endpoint):
    before = outcome_count(synth, "cancelled", synth.model_name)
    body = {"model": synth.model_name, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    body.update({"prompt": PROMPT} if endpoint == "/v1/completions" else {"messages": MESSAGES})
    sock = socket.create_connection((synth.host, synth.port), timeout=10)
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {endpoint} HTTP/1.1\r\nHost: {synth.addr}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    got = b""
    while got.count(b"\ndata: ") < 3:  # a few events arrived: generation is under way
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert kv_usage(synth) > 0
    sock.close()
    wait_kv_free(synth, 5.0)
    wait_for(
        lambda: outcome_count(synth, "cancelled", synth.model_name) == before + 1,
        5.0,
        what="1 more cancelled request",
    )


def test_openai_client_stream_closed_early_frees_kv(synth):
    before = outcome_count(synth, "cancelled", synth.model_name)
    client = oai(synth)
    stream = client.chat.completions.create(
        model=synth.model_name, messages=MESSAGES, max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    client.close()
    wait_kv_free(synth, 5.0)
    wait_for(lambda: outcome_count(synth, "cancelled", synth.model_name) == before + 1, 5.0, what="cancelled")


# ---------------------------------------------------------------- 4. 64 concurrent streams

WORDS = (
    "river town baker harbour quay rope boat sail hill school window stove board question market "
    "apples plums cheese honey hats winter bell sailors clouds wind rain gutters sea"
).split()


def _request(i: int) -> dict:
    prompt_words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + (i * 5) % 40)]
    req = {
        "type": "generate",
        "id": f"r{i}",
        "max_tokens": 1 + (i * 37) % 64,  # 1..64, mixed
        "ignore_eos": True,
        "stream_mode": MODES[i % 3],
        "seed": 1000 + i,
        "temperature": 0.0 if i % 8 == 0 else 0.8,
    }
    if i % 4 == 3:
        req["messages"] = [{"role": "user", "content": " ".join(prompt_words)}]
    else:
        req["prompt"] = f"{i}: " + " ".join(prompt_words)
    if i % 5 == 1:
        req.update(top_p=0.9, top_k=50, repetition_penalty=1.1)
    return req


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param((), id="default"),
        # Tight: a 1 MiB KV cache in 64-token blocks (64 blocks, 4096 tokens) for 64 sequences
        # needing ~7,000 tokens, and a small per-step token budget: admission waits for blocks,
        # running sequences run out of blocks (preemption by recompute), chunked prefill is
        # interleaved with decodes.
        pytest.param(("--kv-cache-mb", "1", "--kv-block-size", "64", "--max-num-batched-tokens", "128"), id="tight-kv"),
    ],
)
def test_64_concurrent_streams_match_solo(start_server, flags):
    server = start_server(*flags, model=fixture_model("qwen2"))
    reqs = [_request(i) for i in range(64)]
    assert sorted({r["max_tokens"] for r in reqs}) == list(range(1, 65))

    async def solo():
        out = {}
        async with open_ws(server) as ws:
            await session_of(ws)
            for r in reqs:
                await ws.send(json.dumps(r))
                s = (await collect(ws, [r["id"]]))[r["id"]]
                assert not s.errors, s.errors
                s.check_order()
                out[r["id"]] = s.text
        return out

    t0 = time.monotonic()
    alone = run(solo())
    t_solo = time.monotonic() - t0

    peak = [0.0]
    stop = threading.Event()

    sample_errors: list[BaseException] = []

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], kv_usage(server))
            except BaseException as e:  # reported below, with the server's state
                sample_errors.append(e)
                return
            time.sleep(0.01)

    async def together():
        conns = 16

        async def one_conn(c: int):
            mine = [r for r in reqs if int(r["id"][1:]) % conns == c]
            async with open_ws(server) as ws:
                await session_of(ws)
                for r in mine:
                    await ws.send(json.dumps(r))
                return await collect(ws, [r["id"] for r in mine])

        merged = {}
        for part in await asyncio.gather(*(one_conn(c) for c in range(conns))):
            merged.update(part)
        return merged

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        streams = run(together())
    finally:
        stop.set()
        sampler.join(5)
    t_conc = time.monotonic() - t0
    assert server.proc.poll() is None, f"server exited ({server.proc.returncode}):\n{server.stderr[-4000:]}"
    assert not sample_errors, f"/metrics failed during the run: {sample_errors!r}\n{server.stderr[-4000:]}"

    bad = []
    for r in reqs:
        s = streams[r["id"]]
        assert not s.errors, (r, s.errors)
        s.check_order()
        assert s.done["finish_reason"] == "length", (r, s.done)
        assert s.done["usage"]["completion_tokens"] == r["max_tokens"], (r, s.done)
        if r["stream_mode"] == "full":
            assert len(s.deltas) == 1
        if s.text != alone[r["id"]]:
            bad.append(r["id"])
    assert not bad, f"{len(bad)} of 64 concurrent streams differ from the same request alone: {bad}"
    wait_kv_free(server, 5.0)
    if flags:
        assert peak[0] > 0.5, f"the tight KV cache was never under pressure (peak usage {peak[0]})"
    print(f"64 streams: solo sequential {t_solo:.2f}s, concurrent {t_conc:.2f}s, peak KV usage {peak[0]:.2f}")


# ---------------------------------------------------------------- 5. overload


def test_overload_http_429_and_ws_overloaded(start_server):
    server = start_server("--max-running", "1", "--max-waiting", "1", "--kv-cache-mb", "4", model="synthetic:tiny")
    model = json.loads(server.get("/v1/models")[2])["data"][0]["id"]
    burst_body = {"model": model, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}

    # HTTP burst: 6 requests at once; one runs, one waits, the rest are refused.
    results: list = [None] * 6
    barrier = threading.Barrier(6)

    def fire(i: int):
        barrier.wait()
        status, _, data = post_json(server, "/v1/completions", burst_body)
        results[i] = (status, data)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted(s for s, _ in results)
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for status, data in results:
        if status == 429:
            err = assert_openai_error(status, data, 429)
            assert err["code"] == "overloaded", err
        else:
            assert json.loads(data)["usage"]["completion_tokens"] == 300
    rejected = statuses.count(429)
    wait_kv_free(server, 5.0)

    # WS burst: 4 generations at once on one connection.
    async def ws_burst():
        async with open_ws(server) as ws:
            await session_of(ws)
            ids = [f"w{i}" for i in range(4)]
            for i in ids:
                await ws.send(json.dumps({"type": "generate", "id": i, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}))
            streams = await collect(ws, ids)
        done = [s for s in streams.values() if s.done]
        refused = [s for s in streams.values() if s.errors]
        assert done and refused, streams
        for s in refused:
            assert [e["code"] for e in s.errors] == ["overloaded"], s.errors
            assert not s.deltas
        for s in done:
            s.check_order()
            assert s.done["finish_reason"] == "length"
        return len(refused)

    rejected += run(ws_burst())
    wait_kv_free(server, 5.0)

    # Deterministic: two long WS generations hold the one running slot and the one waiting slot;
    # then every further request is refused, over HTTP (raw, SSE, the openai client) and WS.
    client = oai(server)

    async def held():
        nonlocal rejected
        async with open_ws(server, max_queue=None) as ws:
            await session_of(ws)
            for i in ("run", "wait"):
                # One at a time: two arriving in one engine iteration both count as waiting.
                await ws.send(json.dumps({"type": "generate", "id": i, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream_mode": "token"}))
                if i == "run":
                    first = json.loads(await ws.recv())
                    assert first["type"] == "delta" and first["id"] == "run", first
            await asyncio.to_thread(wait_for, lambda: _queue_depth(server) == 1, 5.0, 0.02, "queue depth 1")

            def refused_over_http():
                status, _, data = post_json(server, "/v1/completions", burst_body)
                assert assert_openai_error(status, data, 429)["code"] == "overloaded"
                status, _, data = post_json(server, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "stream": True})
                assert assert_openai_error(status, data, 429)["code"] == "overloaded"
                with pytest.raises(openai.RateLimitError) as ei:
                    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
                assert ei.value.status_code == 429 and ei.value.code == "overloaded"
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=model, prompt="x", max_tokens=4, stream=True)

            await asyncio.to_thread(refused_over_http)
            rejected += 4
            await ws.send(json.dumps({"type": "generate", "id": "extra", "prompt": "x", "max_tokens": 4}))
            while True:
                m = json.loads(await ws.recv())
                if m["id"] == "extra":
                    break
            assert m["type"] == "error" and m["code"] == "overloaded", m
            rejected += 1
            for i in ("run", "wait"):
                await ws.send(json.dumps({"type": "cancel", "id": i}))
            ends = {}
            while len(ends) < 2:
                m = json.loads(await ws.recv())
                if m["type"] == "done":
                    ends[m["id"]] = m["finish_reason"]
            assert ends == {"run": "cancelled", "wait": "cancelled"}, ends

    run(held())
    assert outcome_count(server, "rejected", model) == rejected
    wait_kv_free(server, 5.0)
    assert _queue_depth(server) == 0

    # Keeps serving afterwards.
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 8
    assert run(ws_generate(server, prompt="hi", max_tokens=3, ignore_eos=True)).done["finish_reason"] == "length"


def _queue_depth(server: Server) -> float:
    return metric_value(server.metrics(), "seedance_queue_depth")
