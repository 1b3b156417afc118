"""What real clients do that the happy path does not: read slowly, vanish without a close,
stay idle, stop answering PINGs, send many messages at once."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time

from conftest import expected_text, metric_value, run
from wsclient import collect, gen_msg, generate, open_ws, recv_json, session_of


def active_connections(server) -> float:
    text = server.metrics()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("seedance_active_connections{"))


def wait_until(pred, timeout: float = 10, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def raw_ws(server, query: str = "", rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket opened by hand; returns the socket positioned after the 101 head. `rcvbuf`:
    its receive buffer, set before it connects (a small one keeps the kernel from buffering
    megabytes of what the server sends)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((server.host, server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /v1/chat{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def client_frame(op: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        hdr = bytes([(0x80 if fin else 0) | op, 0x80 | n])
    elif n < 65536:
        hdr = bytes([(0x80 if fin else 0) | op, 0x80 | 126]) + struct.pack(">H", n)
    else:
        hdr = bytes([(0x80 if fin else 0) | op, 0x80 | 127]) + struct.pack(">Q", n)
    return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frames(s: socket.socket, until_close: bool = True, timeout: float = 10):
    """Yields (opcode, payload) of server frames until EOF (or a close frame)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            assert b1 & 0x80 == 0, "server frames must not be masked"
            n, i = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, i = struct.unpack(">H", buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, i = struct.unpack(">Q", buf[2:10])[0], 10
            if len(buf) < i + n:
                break
            yield b0 & 0x0F, buf[i:i + n]
            if b0 & 0x0F == 0x8 and until_close:
                return
            buf = buf[i + n:]
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return
        if not chunk:
            return
        buf += chunk


def test_slow_reader_loses_nothing(server):
    """64 generations on one connection whose client stops reading for a while: when it reads
    again every stream is complete and in order (backpressure, not loss)."""

    async def main():
        async with open_ws(server, "?stream_mode=token", max_queue=1) as ws:
            await session_of(ws)
            ids = [f"s{i}" for i in range(64)]
            for rid in ids:
                await ws.send(gen_msg(rid, 1000))
            await asyncio.sleep(1.5)  # not reading: the socket and the server's backlog fill up
            streams = await collect(ws, ids)
            for s in streams.values():
                s.check_order()
                assert s.text == expected_text(1000), f"{s.id}: {len(s.deltas)} deltas"
                assert s.done["finish_reason"] == "length"

    run(main(), timeout=120)


def test_many_messages_in_one_burst(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            for _ in range(500):
                await ws.send('{"type":"ping"}')
            for _ in range(500):
                assert await recv_json(ws) == {"type": "pong"}

    run(main())


def test_client_vanishes_without_close(server):
    """TCP closed mid-stream without a close frame: the server forgets the connection and its
    generation, and keeps serving."""
    before = active_connections(server)
    for _ in range(5):
        s = raw_ws(server, "?stream_mode=token")
        s.sendall(client_frame(0x1, gen_msg("v", 300).encode()))
        s.recv(1024)
        s.close()
    assert wait_until(lambda: active_connections(server) <= before), "connections leaked"

    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            assert (await generate(ws, "ok", 8, "token")).text == expected_text(8)

    run(main())


def test_half_open_handshake_then_close(server):
    """A client that sends half a request head and leaves does not hurt anyone."""
    before = active_connections(server)
    for _ in range(5):
        s = socket.create_connection((server.host, server.port), timeout=5)
        s.sendall(b"GET /v1/chat HTTP/1.1\r\nUpgrade: websocket\r\n")
        s.close()
    assert wait_until(lambda: active_connections(server) <= before)
    assert server.get("/health")[0] == 200


def test_idle_timeout_closes_idle_session_only(start_server):
    srv = start_server("--idle-timeout-ms", "400", "--null-tokens-per-s", "50")

    async def main():
        async with open_ws(srv) as idle, open_ws(srv, "?stream_mode=token") as busy:
            await session_of(idle)
            await session_of(busy)
            await busy.send(gen_msg("long", 60))  # 1.2 s, longer than the idle timeout
            t0 = time.monotonic()
            try:
                m = await asyncio.wait_for(idle.recv(), 5)
                raise AssertionError(f"idle session got {m!r} instead of a close")
            except Exception as e:  # ConnectionClosed
                rcvd = getattr(e, "rcvd", None)
                assert rcvd is not None and rcvd.code == 1000, e
            assert 0.3 < time.monotonic() - t0 < 3
            s = (await collect(busy, ["long"]))["long"]
            s.check_order()
            assert s.text == expected_text(60)

    run(main())


def test_heartbeat_pings_and_dead_peer(start_server):
    """The server PINGs every heartbeat interval; a peer that never answers is dropped after a
    few RTOs, one that answers stays."""
    srv = start_server("--heartbeat-interval-ms", "200")
    s = raw_ws(srv)
    t0 = time.monotonic()
    pings = 0
    for op, payload in read_frames(s, timeout=15):
        if op == 0x9:
            pings += 1
            assert len(payload) <= 125
    elapsed = time.monotonic() - t0
    s.close()
    assert pings >= 1, "no heartbeat PING"
    assert elapsed < 14, f"a silent peer was kept {elapsed:.1f} s"

    async def main():
        async with open_ws(srv, ping_interval=None) as ws:  # websockets answers PINGs itself
            await session_of(ws)
            await asyncio.sleep(2.5)
            await ws.send('{"type":"ping"}')
            assert await recv_json(ws) == {"type": "pong"}

    run(main())
    text = srv.metrics()
    assert metric_value(text, "seedance_ws_rtt_seconds_count") >= 1, "no PONG was counted as an RTT sample"
    assert metric_value(text, 'seedance_ws_closes_total{reason="dead_peer"}') >= 1


def test_percent_encoded_query(server):
    async def main():
        async with open_ws(server, "?model=nu%6Cl&stream_mode=tok%65n") as ws:
            m = await session_of(ws)
            assert m["model"] == "null" and m["stream_mode"] == "token"

    run(main())


def test_connections_are_released(server):
    async def main():
        for _ in range(3):
            conns = [await open_ws(server).__aenter__() for _ in range(20)]
            for ws in conns:
                await session_of(ws)
            for ws in conns:
                await ws.close()

    base = active_connections(server)
    run(main())
    assert wait_until(lambda: active_connections(server) <= base), "connections still counted"
    assert metric_value(server.metrics(), 'seedance_io_driver{driver="io_uring"}') == 2
