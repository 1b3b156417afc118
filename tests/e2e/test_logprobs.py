"""Logprobs (issue 4; SPEC 2 "optional logprobs", SPEC 5 OpenAI shapes), end to end.

The server runs a tiny Qwen2 checkpoint (random weights, real byte-level tokenizer). Clients: the
official `openai` client for chat and completions, streamed and not; `websockets` for the WS
`logprobs` field. What a user relies on:
- one report per generated token, in order, whose `bytes` spell the returned text;
- `top_logprobs` sorted, at most 1 in total probability, the greedy token first;
- logprobs describe the model's distribution (temperature 1, before truncation): the first
  token's report is the same whatever the sampling settings;
- streamed reports equal non-streamed ones for the same seed, on every interface and stream mode;
- nothing is reported unless asked for.
"""

from __future__ import annotations

import json
import math
import re

import openai
import pytest

from conftest import Server, run
from servinglib import fixture_model, post_json, post_ok
from wsclient import collect, open_ws, session_of

MESSAGES = [{"role": "user", "content": "Tell me about the river town."}]
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
N = 24
# Qwen2's special tokens: reported in logprobs under their names, never part of the text.
SPECIAL = re.compile(r"^<\|[a-z_]+\|>$")


@pytest.fixture(scope="module")
def qwen():
    s = Server(model=fixture_model("qwen2"))
    yield s
    s.kill()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{server.addr}/v1", api_key="sk-test", max_retries=0, timeout=30)


def spelled(entries) -> str:
    """The text a list of chat-shaped reports spells (special tokens left out)."""
    raw = b"".join(bytes(e["bytes"]) for e in entries if not SPECIAL.match(e["token"]))
    return raw.decode("utf-8", "replace")


def spells(entries, text: str) -> bool:
    """Whether a message's reports spell its text. Random weights emit invalid UTF-8 now and
    then; where the text holds U+FFFD the grouping of bad bytes into replacement characters is
    the decoder's choice, so such a message is only checked as part of the whole text."""
    return "\ufffd" in text or spelled(entries) == text


def check_top(entry: dict, n: int, greedy: bool) -> None:
    top = entry["top_logprobs"]
    assert len(top) == n, entry
    lps = [t["logprob"] for t in top]
    assert lps == sorted(lps, reverse=True), lps
    assert all(lp <= 1e-6 for lp in lps + [entry["logprob"]]), entry
    assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-4, lps
    if greedy and n:
        assert top[0]["token"] == entry["token"], entry
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)
    if n:
        # The sampled token is never more likely than the best one.
        assert entry["logprob"] <= top[0]["logprob"] + 1e-6


def test_chat_logprobs_with_the_openai_client(qwen):
    r = client(qwen).chat.completions.create(
        model="qwen2",
        messages=MESSAGES,
        max_tokens=N,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    entries = [e.model_dump() for e in choice.logprobs.content]
    assert len(entries) == r.usage.completion_tokens == N
    assert spelled(entries) == choice.message.content
    for e in entries:
        check_top(e, 3, greedy=True)
        assert e["token"] == bytes(e["bytes"]).decode("utf-8", "replace")


def test_no_logprobs_unless_asked(qwen):
    r = client(qwen).chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=4)
    assert r.choices[0].logprobs is None
    c = client(qwen).completions.create(model="qwen2", prompt=PROMPT, max_tokens=4)
    assert c.choices[0].logprobs is None
    # logprobs: true without top_logprobs reports the sampled token alone.
    r = client(qwen).chat.completions.create(model="qwen2", messages=MESSAGES, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_chat_stream_reports_equal_the_non_streamed_ones(qwen, sampling):
    kw = dict(model="qwen2", messages=MESSAGES, max_tokens=N, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True}, **sampling)
    plain = client(qwen).chat.completions.create(**kw)
    want = [e.model_dump() for e in plain.choices[0].logprobs.content]
    got, text = [], []
    for chunk in client(qwen).chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text.append(c.delta.content or "")
            if c.logprobs is not None and c.logprobs.content:
                got.extend(e.model_dump() for e in c.logprobs.content)
                # A chunk's reports spell that chunk's text.
                assert spells([e.model_dump() for e in c.logprobs.content], c.delta.content or "")
    assert "".join(text) == plain.choices[0].message.content
    assert got == want


def test_completion_logprobs_shape_offsets_and_stream(qwen):
    kw = dict(model="qwen2", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    plain = client(qwen).completions.create(**kw)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == N
    assert "".join(t for t in lp.tokens if not SPECIAL.match(t)) == plain.choices[0].text
    assert lp.text_offset[0] == 0
    for i in range(N - 1):
        assert lp.text_offset[i + 1] - lp.text_offset[i] == len(lp.tokens[i])
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2
        # Greedy: the chosen token is the most likely one.
        assert max(top.values()) == pytest.approx(tlp, abs=1e-6)
        assert top.get(tok) == pytest.approx(tlp, abs=1e-6)

    tokens, offsets, values = [], [], []
    for chunk in client(qwen).completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
                values += c.logprobs.token_logprobs
    assert tokens == lp.tokens
    assert offsets == lp.text_offset
    assert values == lp.token_logprobs


def test_reports_describe_the_model_not_the_sampling_settings(qwen):
    """The first token's distribution is the model's at temperature 1 whatever the request's
    temperature, top_p or top_k (as OpenAI and vLLM report it)."""

    def first(**sampling) -> dict:
        r = post_ok(qwen, "/v1/chat/completions", {
            "model": "qwen2", "messages": MESSAGES, "max_tokens": 1, "logprobs": True,
            "top_logprobs": 5, **sampling})
        return r["choices"][0]["logprobs"]["content"][0]

    greedy = first(temperature=0)
    for s in ({"temperature": 1.7, "seed": 3}, {"temperature": 0.3, "top_p": 0.5, "seed": 4},
              {"temperature": 1.0, "top_k": 2, "seed": 5}):
        other = first(**s)
        assert [t["token"] for t in other["top_logprobs"]] == [t["token"] for t in greedy["top_logprobs"]], s
        for a, b in zip(other["top_logprobs"], greedy["top_logprobs"]):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5), s
        # Whatever was drawn, its reported logprob is its entry in the same distribution.
        match = [t for t in greedy["top_logprobs"] if t["bytes"] == other["bytes"]]
        if match:
            assert other["logprob"] == pytest.approx(match[0]["logprob"], abs=1e-5)


def test_ws_logprobs_in_every_stream_mode(qwen):
    fields = {"prompt": PROMPT, "max_tokens": N, "ignore_eos": True, "temperature": 0.8, "seed": 21,
              "logprobs": True, "top_logprobs": 2}

    async def go():
        out = {}
        async with open_ws(qwen) as ws:
            await session_of(ws)
            for mode in ("token", "chunk", "full"):
                await ws.send(json.dumps({"type": "generate", "id": mode, "stream_mode": mode, **fields}))
                out[mode] = (await collect(ws, [mode]))[mode]
            await ws.send(json.dumps({"type": "generate", "id": "plain", "prompt": PROMPT, "max_tokens": 4}))
            out["plain"] = (await collect(ws, ["plain"]))["plain"]
        return out

    streams = run(go())
    reports = {}
    for mode in ("token", "chunk", "full"):
        s = streams[mode]
        assert not s.errors, s.errors
        s.check_order()
        entries = []
        for d in s.deltas:
            # A delta carries the reports of the tokens whose text it carries (in token mode a
            # delta whose token's text is still held back carries none).
            lp = d.get("logprobs", [])
            if d["text"]:
                assert lp and spells(lp, d["text"]), (mode, d)
            else:
                assert not lp, (mode, d)
            entries += lp
        entries += s.done.get("logprobs", [])
        assert len(entries) == s.done["usage"]["completion_tokens"] == N, mode
        for e in entries:
            check_top(e, 2, greedy=False)
        assert spelled(entries) == s.text, mode
        reports[mode] = entries
    assert reports["token"] == reports["chunk"] == reports["full"]
    assert all("logprobs" not in d for d in streams["plain"].deltas)
    assert "logprobs" not in streams["plain"].done


def test_null_model_reports_certainty(server):
    """The null model's next word is certain: logprob 0, and it is the only alternative."""
    r = post_ok(server, "/v1/chat/completions", {
        "model": "null", "messages": MESSAGES, "max_tokens": 5, "logprobs": True, "top_logprobs": 3})
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
    for e in content:
        assert e["logprob"] == 0.0
        assert e["top_logprobs"] == [{"token": e["token"], "logprob": 0.0, "bytes": e["bytes"]}]


@pytest.mark.parametrize("body,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_logprob_fields_are_400_naming_the_field(qwen, body, param):
    status, _, data = post_json(qwen, "/v1/chat/completions", {"model": "qwen2", "messages": MESSAGES, **body})
    assert status == 400, data
    err = json.loads(data)["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error", err


def test_reports_stop_with_the_text_at_a_stop_string(qwen):
    """Tokens whose text a matched stop string swallowed are not reported; the last report may
    be the token in which the stop string begins (its text is partly in the output)."""
    kw = dict(model="qwen2", messages=MESSAGES, max_tokens=N, temperature=0, logprobs=True,
              extra_body={"ignore_eos": True})
    full = client(qwen).chat.completions.create(**kw)
    text = full.choices[0].message.content
    # A stop string from the middle of the greedy text that does not occur earlier.
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 3)
                if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    cut = client(qwen).chat.completions.create(stop=[stop], **kw)
    content = cut.choices[0].message.content
    assert content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    entries = [e.model_dump() for e in cut.choices[0].logprobs.content]
    got = spelled(entries)
    assert got.startswith(content), (got, content)
    last = spelled(entries[-1:]) if entries else ""
    assert len(got) - len(content) < max(len(last), 1), (got, content)
    # The same tokens as the unstopped run, up to where the stop cut it.
    assert entries == [e.model_dump() for e in full.choices[0].logprobs.content][: len(entries)]
