"""Process-level behaviour: graceful shutdown on SIGTERM, the legacy (epoll) driver."""

from __future__ import annotations

import asyncio
import json
import pytest
from websockets.exceptions import ConnectionClosed

from conftest import expected_text, metric_value, run
from wsclient import collect, gen_msg, generate, open_ws, recv_json, session_of


def test_sigterm_idle_session_closes_1001(start_server):
    """SIGTERM: an idle session gets a `session` note with closing:true (its session id and
    resume token), then close 1001; the process exits 0."""
    srv = start_server()

    async def main():
        async with open_ws(srv) as a, open_ws(srv) as b:
            sa, sb = await session_of(a), await session_of(b)
            srv.sigterm()
            for ws, s in ((a, sa), (b, sb)):
                note = await recv_json(ws)
                assert note["type"] == "session" and note["closing"] is True, note
                assert note["session"] == s["session"] and note["token"] == s["token"]
                try:
                    extra = await asyncio.wait_for(ws.recv(), 10)
                    raise AssertionError(f"expected a close after the note, got {extra!r}")
                except ConnectionClosed as e:
                    assert e.rcvd is not None and e.rcvd.code == 1001, e

    run(main(), timeout=60)
    rc = srv.terminate(timeout=30)
    assert rc == 0, f"exit status {rc}; stderr:\n{srv.stderr}"


async def _drain_after_sigterm(srv, mode: str):
    """Starts a 40-token paced generation, sends SIGTERM after its first message, and returns
    (messages after SIGTERM, the close frame received)."""
    async with open_ws(srv, f"?stream_mode={mode}") as busy:
        s_busy = await session_of(busy)
        await busy.send(gen_msg("g", 40))
        msgs = []
        if mode == "token":
            msgs.append(await recv_json(busy))
        else:
            await asyncio.sleep(0.05)
        srv.sigterm()
        rcvd = None
        try:
            while True:
                msgs.append(json.loads(await asyncio.wait_for(busy.recv(), 10)))
        except ConnectionClosed as e:
            rcvd = e.rcvd
        notes = [m for m in msgs if m["type"] == "session"]
        assert len(notes) == 1 and notes[0]["closing"] is True
        assert notes[0]["session"] == s_busy["session"]
        return msgs, rcvd


def test_sigterm_busy_session_stream_continues_then_1001(start_server):
    """A generation in flight at SIGTERM runs to its end; the session closes with 1001 after."""
    srv = start_server("--null-tokens-per-s", "100")
    msgs, rcvd = run(_drain_after_sigterm(srv, "token"), timeout=60)
    assert rcvd is not None and rcvd.code == 1001, rcvd
    deltas = [m for m in msgs if m["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, 41))
    assert "".join(d["text"] for d in deltas) == expected_text(40)
    assert srv.terminate(timeout=30) == 0, srv.stderr


@pytest.mark.parametrize("mode", ["token", "full"])
def test_sigterm_busy_session_gets_done_before_1001(start_server, mode):
    srv = start_server("--null-tokens-per-s", "100")
    msgs, rcvd = run(_drain_after_sigterm(srv, mode), timeout=60)
    srv.terminate(timeout=30)
    assert rcvd is not None and rcvd.code == 1001, rcvd
    deltas = [m for m in msgs if m["type"] == "delta"]
    dones = [m for m in msgs if m["type"] == "done"]
    assert "".join(d["text"] for d in deltas) == expected_text(40)
    assert len(dones) == 1 and dones[0]["finish_reason"] == "length", msgs[-3:]
    assert dones[0]["seq"] == len(deltas) + 1
    assert msgs[-1]["type"] == "done"


def test_sigterm_with_no_connections_exits_0(start_server):
    srv = start_server()
    assert srv.get("/health")[0] == 200
    rc = srv.terminate(timeout=20)
    assert rc == 0, srv.stderr


def test_sigterm_ready_goes_503_while_drain_delay_keeps_accepting(start_server):
    """With --drain-delay-ms, SIGTERM turns /ready into 503 `draining` at once while the
    instance still accepts (a balancer with health checks takes it out of the pool first); then
    the listener closes and the process exits 0."""
    import socket
    import time

    srv = start_server("--drain-delay-ms", "1500")
    status, _, body = srv.get("/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    t0 = time.monotonic()
    srv.sigterm()
    time.sleep(0.2)
    status, _, body = srv.get("/ready")  # a new connection: still accepted
    assert status == 503, (status, body)
    assert json.loads(body)["error"]["code"] == "draining", body
    assert srv.get("/health")[0] == 200
    rc = srv.proc.wait(20)
    assert rc == 0, srv.stderr
    assert time.monotonic() - t0 >= 1.4, "exited before the drain delay"
    with pytest.raises(OSError):
        socket.create_connection((srv.host, srv.port), 1).close()


def test_legacy_driver(start_server):
    """MONOIO_FORCE_LEGACY_DRIVER=1: every shard runs on epoll, and streaming still works."""
    srv = start_server(env={"MONOIO_FORCE_LEGACY_DRIVER": "1"})
    text = srv.metrics()
    assert metric_value(text, 'seedance_io_driver{driver="epoll"}') == 2
    assert metric_value(text, 'seedance_io_driver{driver="io_uring"}') == 0

    async def main():
        async with open_ws(srv) as ws:
            await session_of(ws)
            for mode in ("token", "chunk", "full"):
                s = await generate(ws, f"l-{mode}", 64, mode)
                s.check_order()
                assert s.text == expected_text(64)
            ids = [f"c{i}" for i in range(8)]
            for i in ids:
                await ws.send(gen_msg(i, 32, "token"))
            streams = await collect(ws, ids)
            for s in streams.values():
                s.check_order()
                assert s.text == expected_text(32)
            await ws.close()
            assert ws.protocol.close_rcvd.code == 1000

    run(main())
    assert srv.get("/health")[0] == 200
    rc = srv.terminate(timeout=20)
    assert rc == 0, srv.stderr


def test_startup_error_is_one_line_nonzero(start_server):
    """SPEC 8: a start-up failure is one line on stderr and a non-zero exit."""
    import subprocess

    from conftest import BIN

    p = subprocess.run([str(BIN), "--model", "null", "--listen", "not-an-address", "--cores", "1"],
                       capture_output=True, timeout=30)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.decode().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("seedance-server:"), p.stderr
