"""1,000 concurrent WebSocket connections, each streaming a 64-token generation: every stream
complete and in order (issue 2, "Tests")."""

from __future__ import annotations

import asyncio
import os
import resource
import time

from conftest import WORDS, metric_value, run
from wsclient import gen_msg, open_ws, recv_json, session_of

CONNECTIONS = int(os.environ.get("SEEDANCE_E2E_CONNECTIONS", "1000"))
TOKENS = 64


def test_1000_concurrent_streams(start_server):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Client and server share this limit (the server inherits it): one fd each per connection.
    assert soft >= CONNECTIONS + 200, f"RLIMIT_NOFILE {soft} too low for {CONNECTIONS} connections"
    srv = start_server()
    expected = [(" " if i else "") + w for i, w in enumerate(WORDS[:TOKENS])]
    opened = asyncio.Event()
    counter = {"open": 0}

    async def one(i: int) -> int:
        async with open_ws(srv, "?stream_mode=token", ping_interval=None, compression=None) as ws:
            await session_of(ws)
            counter["open"] += 1
            if counter["open"] == CONNECTIONS:
                opened.set()
            # Every connection is open before any generation starts: 1,000 at once, for real.
            await opened.wait()
            rid = f"load-{i}"
            await ws.send(gen_msg(rid, TOKENS))
            texts = []
            while True:
                m = await recv_json(ws)
                assert m["id"] == rid, m
                if m["type"] == "done":
                    assert m["seq"] == TOKENS + 1 and m["finish_reason"] == "length", m
                    assert m["usage"]["completion_tokens"] == TOKENS
                    break
                assert m["type"] == "delta" and m["seq"] == len(texts) + 1, m
                texts.append(m["text"])
            assert texts == expected, f"connection {i}: stream differs"
            return len(texts)

    async def main():
        t0 = time.monotonic()
        counts = await asyncio.gather(*(one(i) for i in range(CONNECTIONS)))
        return counts, time.monotonic() - t0

    counts, elapsed = run(main(), timeout=300)
    assert counts == [TOKENS] * CONNECTIONS
    print(f"\n{CONNECTIONS} connections x {TOKENS} tokens: {elapsed:.1f} s "
          f"({CONNECTIONS * TOKENS / elapsed:.0f} deltas/s through the Python client)")
    text = srv.metrics()
    assert metric_value(text, 'seedance_requests_total{tenant="",model="null",outcome="length"}') == CONNECTIONS
    assert metric_value(text, "seedance_generated_tokens_total") == CONNECTIONS * TOKENS
    assert srv.terminate(timeout=30) == 0, srv.stderr
