"""Small helpers over the `websockets` asyncio client for the seedance protocol (SPEC 4)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect

from conftest import Server, loads

# Sentence / clause boundaries of chunk mode (SPEC 4).
BOUNDARY = re.compile(r"[.!?;,:\n。！？；，、]")


def open_ws(server: Server, query: str = "", headers: dict[str, str] | None = None, **kw):
    """`websockets.connect` to /v1/chat with test-friendly defaults (no proxy, long timeouts)."""
    kw.setdefault("proxy", None)
    kw.setdefault("open_timeout", 60)
    kw.setdefault("close_timeout", 10)
    return connect(server.ws_url + query, additional_headers=headers, **kw)


async def recv_json(ws: ClientConnection) -> dict:
    return loads(await ws.recv())


async def session_of(ws: ClientConnection) -> dict:
    m = await recv_json(ws)
    assert m["type"] == "session", m
    return m


def gen_msg(id: str, n: int | None = None, mode: str | None = None, prompt: str = "Tell me a story", **extra) -> str:
    m: dict = {"type": "generate", "id": id, "prompt": prompt}
    if n is not None:
        m["max_tokens"] = n
    if mode is not None:
        m["stream_mode"] = mode
    m.update(extra)
    return json.dumps(m)


@dataclass
class Stream:
    """Everything received for one request id."""

    id: str
    deltas: list[dict] = field(default_factory=list)
    done: dict | None = None
    errors: list[dict] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.deltas)

    def check_order(self) -> None:
        """Deltas carry seq 1..n with no gap; done carries n+1."""
        seqs = [d["seq"] for d in self.deltas]
        assert seqs == list(range(1, len(seqs) + 1)), f"{self.id}: seqs {seqs}"
        assert self.done is not None, f"{self.id}: no done"
        assert self.done["seq"] == len(seqs) + 1, f"{self.id}: done seq {self.done['seq']} after {len(seqs)} deltas"


async def collect(ws: ClientConnection, ids, order: list | None = None) -> dict[str, Stream]:
    """Reads until every id in `ids` has its `done` (or an error). Messages for other ids, or
    after a request's done, fail the test."""
    streams = {i: Stream(i) for i in ids}
    pending = set(ids)
    while pending:
        m = await recv_json(ws)
        if order is not None:
            order.append(m)
        kind, mid = m.get("type"), m.get("id")
        assert mid in streams, f"message for unexpected id: {m}"
        s = streams[mid]
        assert s.done is None, f"message after done: {m}"
        if kind == "delta":
            assert set(m) >= {"type", "id", "seq", "text"}, m
            s.deltas.append(m)
        elif kind == "done":
            s.done = m
            pending.discard(mid)
        elif kind == "error":
            s.errors.append(m)
            pending.discard(mid)
        else:
            raise AssertionError(f"unexpected message {m}")
    return streams


async def generate(ws: ClientConnection, id: str, n: int | None = None, mode: str | None = None, **extra) -> Stream:
    await ws.send(gen_msg(id, n, mode, **extra))
    return (await collect(ws, [id]))[id]
