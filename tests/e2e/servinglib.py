"""Helpers for the serving tests (test_serving.py): real checkpoints behind the server, raw
OpenAI-compatible HTTP and SSE, WebSocket generations with sampling fields, and metrics polling.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field

from conftest import REPO, Server, metric_value
from wsclient import Stream, collect, open_ws, session_of

FIXTURES = REPO / "tests" / "fixtures" / "models"


def fixture_model(name: str) -> str:
    """Absolute path of a tiny reference checkpoint (served as `name`)."""
    path = FIXTURES / name
    assert (path / "config.json").exists(), f"missing fixture checkpoint {path}"
    return str(path)


# ---------------------------------------------------------------- raw HTTP


def post_json(server: Server, path: str, body, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """POSTs `body` (a dict, or raw bytes/str sent as is) and reads the whole response."""
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    if isinstance(raw, str):
        raw = raw.encode()
    c = server.http(timeout)
    try:
        c.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def post_ok(server: Server, path: str, body: dict) -> dict:
    status, _, data = post_json(server, path, body)
    assert status == 200, (status, data)
    return json.loads(data)


def assert_openai_error(status: int, data: bytes, want_status: int) -> dict:
    """An OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    assert status == want_status, (status, data)
    body = json.loads(data)
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert "param" in err and "code" in err, body
    return err


@dataclass
class SseEvent:
    id: str | None
    data: str

    def json(self) -> dict:
        return json.loads(self.data)


@dataclass
class SseResult:
    status: int
    headers: dict[str, str]
    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> list[dict]:
        """Every JSON chunk before `[DONE]`."""
        out = []
        for e in self.events:
            if e.data == "[DONE]":
                break
            out.append(e.json())
        return out

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].data == "[DONE]"


def _read_sse(resp: http.client.HTTPResponse, res: SseResult, max_events: int | None = None) -> None:
    ev_id: str | None = None
    data: list[str] = []
    while True:
        raw = resp.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                res.events.append(SseEvent(ev_id, "\n".join(data)))
                if max_events is not None and len(res.events) >= max_events:
                    return
            ev_id, data = None, []
        elif line.startswith(":"):
            res.comments.append(line)
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                ev_id = value
            elif name == "data":
                data.append(value)


def post_sse(server: Server, path: str, body: dict, timeout: float = 30) -> SseResult:
    """POSTs a `stream: true` request and reads the event stream to its end."""
    c = server.http(timeout)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        res = SseResult(r.status, {k.lower(): v for k, v in r.getheaders()})
        if r.status == 200:
            _read_sse(r, res)
        return res
    finally:
        c.close()


def sse_text(res: SseResult, chat: bool) -> str:
    """Concatenated text of an SSE stream, checking its shape on the way: 200, event ids 0 (the
    role chunk) then the delta seqs 1..n, `[DONE]` last."""
    assert res.status == 200, res
    assert res.headers.get("content-type", "").startswith("text/event-stream"), res.headers
    assert res.done, f"stream did not end with [DONE]: {res.events[-3:]}"
    ids = [int(e.id) for e in res.events if e.id is not None]
    assert ids == list(range(len(ids))), f"SSE ids {ids}"
    text = []
    for ch in res.chunks:
        for c in ch["choices"]:
            if chat:
                text.append(c["delta"].get("content") or "")
            else:
                text.append(c["text"])
    return "".join(text)


def completion_text(body: dict) -> str:
    return body["choices"][0]["text"]


def chat_text(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- WebSocket


async def ws_generate(server: Server, id: str = "g", **fields) -> Stream:
    """One generation on a fresh connection; every keyword becomes a field of `generate`."""
    async with open_ws(server) as ws:
        await session_of(ws)
        await ws.send(json.dumps({"type": "generate", "id": id, **fields}))
        s = (await collect(ws, [id]))[id]
    assert not s.errors, s.errors
    s.check_order()
    return s


# ---------------------------------------------------------------- metrics


def kv_usage(server: Server) -> float:
    return metric_value(server.metrics(), "seedance_kv_cache_usage_ratio")


def outcome_count(server: Server, outcome: str, model: str) -> float:
    return metric_value(
        server.metrics(), f'seedance_requests_total{{tenant="",model="{model}",outcome="{outcome}"}}'
    )


def wait_for(pred, timeout: float = 5.0, interval: float = 0.02, what: str = "condition"):
    """Polls `pred()` until it returns a truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last is True or (last and not isinstance(last, tuple)):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def wait_kv_free(server: Server, timeout: float = 5.0) -> None:
    """KV usage back to exactly 0 and no sequence running (within `timeout`)."""

    def idle():
        text = server.metrics()
        kv = metric_value(text, "seedance_kv_cache_usage_ratio")
        running = metric_value(text, "seedance_engine_running")
        return True if kv == 0 and running == 0 else (False, f"kv usage {kv}, running {running}")

    wait_for(idle, timeout, what="seedance_kv_cache_usage_ratio 0 and seedance_engine_running 0")
