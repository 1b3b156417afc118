"""Backpressure and compression (issue 10, SPEC 3 "Backpressure reaches the engine", SPEC 4
"Flow control", "Compression"): zstd streams decoded by Python `zstandard`, the opt-in credit
window checked byte by byte, slow readers over WebSocket and SSE, `max_pause`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import zstandard

from conftest import BIN, expected_text, metric_value, run
from servinglib import wait_for
from test_robustness import client_frame, raw_ws, read_frames
from wsclient import gen_msg, open_ws


# The load generator sits next to the server binary (same profile).
BENCH = Path(os.environ.get("SEEDANCE_BENCH_BIN", BIN.parent / "seedance-bench"))


class ZstdClient:
    """Decodes a seedance connection's messages: binary frames are one zstd stream (fed frame by
    frame, across zstd frames), text frames plain JSON."""

    def __init__(self):
        self.d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        self.wire = 0
        self.plain = 0
        self.binary = 0
        self.text = 0

    def decode(self, frame) -> list[dict]:
        """The messages of one frame: a binary frame holds one or more, `\n`-separated."""
        if isinstance(frame, bytes):
            self.binary += 1
            self.wire += len(frame)
            body = self.d.decompress(frame)
        else:
            self.text += 1
            body = frame.encode()
            self.wire += len(body)
        self.plain += len(body)
        # Each frame decodes on its own: its messages are whole, nothing waits for later frames.
        return [json.loads(line) for line in body.split(b"\n")]

    def one(self, frame) -> dict:
        msgs = self.decode(frame)
        assert len(msgs) == 1, msgs
        return msgs[0]


async def zstd_streams(srv, ids_n: dict[str, int], query: str = "?stream_mode=token&compression=zstd"):
    """Runs generations on one zstd connection; returns (client, texts by id, session)."""
    z = ZstdClient()
    async with open_ws(srv, query, compression=None) as ws:
        assert ws.response.headers.get("x-compression") == "zstd"
        session = z.one(await ws.recv())
        texts = {}
        for rid, n in ids_n.items():
            await ws.send(gen_msg(rid, n))
        pending = set(ids_n)
        deltas = {rid: [] for rid in ids_n}
        while pending:
            for m in z.decode(await ws.recv()):
                if m["type"] == "delta":
                    assert m["seq"] == len(deltas[m["id"]]) + 1, m
                    deltas[m["id"]].append(m["text"])
                elif m["type"] == "done":
                    assert m["finish_reason"] == "length", m
                    pending.discard(m["id"])
                else:
                    raise AssertionError(m)
        for rid in ids_n:
            texts[rid] = "".join(deltas[rid])
    return z, texts, session


def test_zstd_frames_decode_one_by_one_and_halve_the_bytes(server):
    async def main():
        z, texts, session = await zstd_streams(server, {"a": 400, "b": 150, "c": 1})
        assert session["compression"] == "zstd"
        for rid, n in {"a": 400, "b": 150, "c": 1}.items():
            assert texts[rid] == expected_text(n), rid
        assert z.binary >= 2 and z.text == 0
        return z

    z = run(main())
    print(f"\nzstd: {z.wire} bytes on the wire for {z.plain} bytes of JSON ({z.wire / z.plain:.0%})")
    assert z.wire <= 0.5 * z.plain, (z.wire, z.plain)


def test_zstd_after_idle_starts_a_new_frame(server):
    async def main():
        z = ZstdClient()
        async with open_ws(server, "?stream_mode=chunk&compression=zstd", compression=None) as ws:
            z.one(await ws.recv())
            for round_ in range(3):
                await ws.send(gen_msg(f"r{round_}", 60))
                text, done = "", False
                while not done:
                    for m in z.decode(await ws.recv()):
                        assert not done, m
                        if m["type"] == "done":
                            done = True
                        else:
                            text += m["text"]
                assert text == expected_text(60)
                await ws.send('{"type":"ping"}')
                assert z.one(await ws.recv()) == {"type": "pong"}
        # Idle between rounds: no zstd context is kept for this connection.
        assert metric_value(server.metrics(), "seedance_compression_contexts") == 0

    run(main())


def test_zstd_breaker_and_level_changes_under_load_keep_the_stream_intact(start_server):
    """seedance-bench saturates a one-shard server with zstd connections for 3 s while Python
    clients stream beside it and on after it: the shard's breaker opens under the load (plain text
    frames) and closes after it (binary frames, levels changing as the load falls), and every
    Python stream decodes exactly, binary and text frames interleaved."""
    srv = start_server("--zstd-load-light", "0.2", "--zstd-load-heavy", "0.4",
                       "--zstd-load-breaker", "0.6", "--max-running", "1024",
                       "--null-tokens-per-s", "2000", cores=1)
    bench = subprocess.Popen(
        [str(BENCH), "ws", "--addr", srv.addr, "--connections", "300", "--output-len", "2000",
         "--compression", "zstd", "--duration", "3", "--warmup", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.5)

        async def main():
            # 8,000 tokens at 2,000/s: from inside the load to 2 s past it.
            return await asyncio.gather(*(zstd_streams(srv, {f"x{i}": 8000}) for i in range(8)))

        clients = run(main(), timeout=120)
    finally:
        out = bench.communicate(timeout=60)[0].decode()
    assert bench.returncode == 0, out
    for z, texts, _ in clients:
        (text,) = texts.values()
        assert text == expected_text(8000)
    binary = sum(z.binary for z, _, _ in clients)
    text = sum(z.text for z, _, _ in clients)
    print(f"\nunder load: {binary} binary and {text} plain frames; bench: {out.splitlines()[1]}")
    m = srv.metrics()
    assert binary > 0
    assert text > 0, "the breaker never opened under a saturating load"
    assert metric_value(m, "seedance_compression_plain_messages_total") >= text


def test_zstd_refused_when_off_is_said_in_session(start_server):
    srv = start_server("--compression", "false")

    async def main():
        async with open_ws(srv, "?compression=zstd", compression=None) as ws:
            assert "x-compression" not in ws.response.headers
            s = json.loads(await ws.recv())
            assert s["compression"] == "none" and s["compression_declined"]
            await ws.send(gen_msg("p", 5))
            while json.loads(m := await ws.recv())["type"] != "done":
                assert isinstance(m, str)

    run(main())


# ---------------------------------------------------------------- credit window


async def credit_client(srv, window: int, n: int, grant_every: int, query_extra: str = "",
                        mode: str = "token") -> tuple[str, int, dict]:
    """Streams one generation under a credit window; checks after every message that the bytes
    received never exceed the credit granted; gives credit back in `grant_every`-byte steps."""
    q = f"?stream_mode={mode}&initial_window={window}{query_extra}"
    async with open_ws(srv, q, compression=None) as ws:
        s = json.loads(await ws.recv())
        assert s["flow_control"] == "credit" and s["window"] == window
        await ws.send(gen_msg("w", n))
        granted, received, owed = window, 0, 0
        text = ""
        idle = 0.0
        while True:
            try:
                frame = await asyncio.wait_for(ws.recv(), 0.2)
                idle = 0.0
            except asyncio.TimeoutError:
                # Nothing comes: give back what we owe. With nothing owed the server has credit
                # and must send (allowing for a slow machine).
                idle += 0.2
                assert owed > 0 or idle < 10, f"stalled with {granted - received} bytes of credit left"
                if owed:
                    await ws.send(json.dumps({"type": "window_update", "bytes": owed}))
                    granted += owed
                    owed = 0
                continue
            size = len(frame if isinstance(frame, bytes) else frame.encode())
            received += size
            oversized = size > window
            assert received <= granted or oversized, f"{received} bytes received, {granted} granted"
            if oversized:
                # Sent alone, once every earlier byte was credited back.
                assert received - size == granted - window, (received, size, granted)
            owed += size
            m = json.loads(frame)
            if owed >= grant_every:
                await ws.send(json.dumps({"type": "window_update", "bytes": owed}))
                granted += owed
                owed = 0
            if m["type"] == "done":
                return text, received, m
            assert m["type"] == "delta", m
            text += m["text"]


def test_credit_window_is_never_exceeded(server):
    async def main():
        for window, grant in [(2048, 1024), (16384, 4096), (100_000, 50_000)]:
            text, received, done = await credit_client(server, window, 800, grant)
            assert text == expected_text(800), window
            assert done["finish_reason"] == "length"

    before = server.metrics()
    run(main())
    after = server.metrics()
    flushes = metric_value(after, "seedance_flow_flushes_total") - metric_value(before, "seedance_flow_flushes_total")
    held = (metric_value(after, 'seedance_flow_messages_total{tier="held"}')
            - metric_value(before, 'seedance_flow_messages_total{tier="held"}'))
    now = (metric_value(after, 'seedance_flow_messages_total{tier="now"}')
           - metric_value(before, 'seedance_flow_messages_total{tier="now"}'))
    # Small windows held messages and flushed them in groups (coalescing); the large one sent at once.
    assert held > 0 and 0 < flushes < held and now > 0, (held, flushes, now)


def test_message_larger_than_the_window_does_not_deadlock(server):
    async def main():
        # full mode: one delta with the whole text (several KiB) through a 1 KiB window.
        text, received, done = await credit_client(server, 1024, 1500, 512, mode="full")
        assert text == expected_text(1500)
        assert received > 1024

    run(main())


def test_bad_window_values_get_errors(server):
    async def main():
        async with open_ws(server, "?initial_window=65536", compression=None) as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "window_update", "bytes": 2**31}))
            e = json.loads(await ws.recv())
            assert e["type"] == "error" and e["code"] == "flow_control_error", e
            for bad in (-1, 0, 1.5, "10"):
                await ws.send(json.dumps({"type": "window_update", "bytes": bad}))
                e = json.loads(await ws.recv())
                assert e["type"] == "error" and e["code"] == "invalid_field", (bad, e)
            # The connection is fine afterwards.
            await ws.send(gen_msg("ok", 3))
            while json.loads(await ws.recv())["type"] != "done":
                pass

    run(main())


# ---------------------------------------------------------------- slow readers


BOUND = 64 * 1024
# Long enough to fill the kernel's socket buffers (megabytes on loopback) before our own queue.
LONG = 150_000
# A raw socket that reads nothing answers no PING either: keep the heartbeat out of the way.
LIMIT = ("--max-tokens-limit", "200000", "--heartbeat-interval-ms", "600000",
         "--event-queue-capacity", "1024")


def held_max(event_bytes: int) -> int:
    """What a paused reader may hold: the backlog bound, one write in flight (at most the bound
    plus a dispatch slice of 1,024 events), and what the unpaced null model generated before the
    pause reached it (the event queue: 1,024 events), at `event_bytes` per event."""
    return 2 * BOUND + 2 * 1024 * event_bytes


# A WebSocket delta of the null model's words; an OpenAI completion chunk over SSE.
WS_DELTA, SSE_CHUNK = 64, 320


def slow_socket(srv, query: str) -> socket.socket:
    # The kernel's buffers take a few MiB of a reader that does not read (the server's send
    # buffer grows, the receive window does not); LONG generations go past them.
    return raw_ws(srv, query)


def read_ws_stream(s: socket.socket, rid: str, sip: int = 1 << 20, pause: float = 0.0) -> list[dict]:
    """Reads server text frames until request `rid`'s done (a parser that keeps up with
    megabytes: it walks the buffer by offset instead of re-slicing it per frame), `sip` bytes
    at a time with `pause` seconds between reads."""
    s.settimeout(30)
    msgs, buf, pos = [], bytearray(), 0
    while True:
        chunk = s.recv(sip)
        assert chunk, f"connection closed after {len(msgs)} messages"
        if pause:
            time.sleep(pause)
        buf += chunk
        while len(buf) - pos >= 2:
            b0, n, i = buf[pos], buf[pos + 1] & 0x7F, pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, i = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, i = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if len(buf) < i + n:
                break
            if b0 & 0x0F == 0x1:
                m = json.loads(buf[i:i + n])
                if m.get("id") == rid:
                    msgs.append(m)
                    if m["type"] == "done":
                        return msgs
            pos = i + n
        del buf[:pos]
        pos = 0


def test_slow_reader_is_paused_bounded_and_loses_nothing(start_server):
    srv = start_server("--max-send-backlog-bytes", str(BOUND), *LIMIT, cores=1)
    slow = slow_socket(srv, "?stream_mode=token")
    slow.sendall(client_frame(0x1, gen_msg("slow", LONG).encode()))
    wait_for(lambda: metric_value(srv.metrics(), "seedance_paused_connections") == 1, 10,
             what="the slow reader paused")
    peak = 0

    async def others():
        async def one(i):
            async with open_ws(srv, "?stream_mode=token", compression=None) as ws:
                await ws.recv()
                await ws.send(gen_msg(f"o{i}", 2000))
                text = ""
                while (m := json.loads(await ws.recv()))["type"] != "done":
                    text += m["text"]
                assert text == expected_text(2000)

        await asyncio.gather(*(one(i) for i in range(63)))

    t0 = time.monotonic()
    run(others(), timeout=120)
    print(f"\n63 streams x 2000 tokens beside a paused reader: {time.monotonic() - t0:.1f} s")
    # The 63 finished while the slow reader stayed paused, its output held within the bound.
    m = srv.metrics()
    assert metric_value(m, "seedance_paused_connections") == 1
    peak = metric_value(m, "seedance_queued_output_bytes")
    assert peak <= held_max(WS_DELTA), peak
    t0 = time.monotonic()
    msgs = read_ws_stream(slow, "slow")
    print(f"slow reader drained {len(msgs)} messages in {time.monotonic() - t0:.1f} s")
    deltas = [x for x in msgs if x["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == expected_text(LONG)
    assert msgs[-1]["finish_reason"] == "length"
    slow.close()


def test_a_reader_slower_than_its_stream_gets_coalesced_writes(start_server):
    """No credit window: a client that reads slower than it is sent to (4 KiB every 5 ms, with a
    small receive buffer so that the kernel does not absorb the stream) gets its deltas in
    writes held back for the throttle delay once its backlog nears the bound (the socket's own
    tiers), and every delta in order."""
    srv = start_server("--max-send-backlog-bytes", str(BOUND), *LIMIT, cores=1)
    s = raw_ws(srv, "?stream_mode=token", rcvbuf=4096)
    n = 30_000
    s.sendall(client_frame(0x1, gen_msg("sip", n).encode()))
    msgs = read_ws_stream(s, "sip", sip=4096, pause=0.005)
    deltas = [x for x in msgs if x["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == expected_text(n)
    throttles = metric_value(srv.metrics(), "seedance_socket_throttles_total")
    print(f"\n{len(msgs)} messages read in 4 KiB sips; {throttles:.0f} writes held back")
    assert throttles > 0, "the slow reader's writes were never held back"
    s.close()


def test_slow_sse_reader_is_paused_and_loses_nothing(start_server):
    srv = start_server("--max-send-backlog-bytes", str(BOUND), *LIMIT, cores=1)
    s = socket.create_connection((srv.host, srv.port), timeout=30)
    body = json.dumps({"model": "null", "prompt": "hi", "max_tokens": LONG, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: metric_value(srv.metrics(), "seedance_paused_connections") == 1, 10,
             what="the SSE reader paused")
    time.sleep(0.5)
    assert metric_value(srv.metrics(), "seedance_queued_output_bytes") <= held_max(SSE_CHUNK)
    data = b""
    while b"data: [DONE]" not in data[-64:]:
        chunk = s.recv(65536)
        assert chunk, "connection closed early"
        data += chunk
    s.close()
    text = ""
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            text += json.loads(line[6:])["choices"][0]["text"]
    assert text == expected_text(LONG)


def test_reader_that_never_reads_is_ended_after_max_pause(start_server):
    srv = start_server("--max-send-backlog-bytes", str(BOUND), *LIMIT, "--max-pause-ms", "1500",
                       "--resume", "false", cores=1)
    s = slow_socket(srv, "?stream_mode=token")
    s.sendall(client_frame(0x1, gen_msg("gone", LONG).encode()))
    wait_for(lambda: metric_value(srv.metrics(), "seedance_paused_connections") == 1, 10,
             what="paused")
    wait_for(lambda: metric_value(srv.metrics(), 'seedance_ws_closes_total{reason="slow_reader"}') == 1,
             10, what="the slow reader disconnected")
    m = srv.metrics()
    wait_for(lambda: metric_value(srv.metrics(), "seedance_engine_running") == 0, 5, what="sequence freed")
    assert metric_value(m, "seedance_paused_connections") == 0
    wait_for(lambda: metric_value(srv.metrics(), "seedance_queued_output_bytes") == 0, 5,
             what="its output freed")
    s.close()


def test_slow_resumed_reader_is_fed_no_faster_than_it_reads(start_server):
    """A client resumes a long logged generation after 0 and does not read: the replay from the
    log stops at the connection's backlog bound (the state thread pauses the follow), instead of
    queueing the whole log in the server; once it reads, every delta arrives, in order."""
    srv = start_server("--max-send-backlog-bytes", str(BOUND), *LIMIT, cores=1)
    first = raw_ws(srv, "?stream_mode=token")
    hello = json.loads(next(read_frames(first, until_close=False))[1])
    first.sendall(client_frame(0x1, gen_msg("long", LONG).encode()))
    time.sleep(0.2)
    first.close()  # no close frame: a dropped client, the generation runs on into the log
    wait_for(lambda: metric_value(srv.metrics(), "seedance_engine_running") == 0, 60,
             what="the detached generation to finish")
    slow = slow_socket(srv, "?stream_mode=token")
    resume = {"type": "resume", "session": hello["session"], "token": hello["token"], "id": "long",
              "after": 0}
    slow.sendall(client_frame(0x1, json.dumps(resume).encode()))
    wait_for(lambda: metric_value(srv.metrics(), "seedance_paused_connections") == 1, 10,
             what="the resumed reader paused")
    time.sleep(1.0)  # the state thread would have replayed the whole log by now
    m = srv.metrics()
    assert metric_value(m, "seedance_paused_connections") == 1
    held = metric_value(m, "seedance_queued_output_bytes")
    assert held <= held_max(WS_DELTA), f"{held} bytes queued for a reader that does not read"
    msgs = read_ws_stream(slow, "long")
    deltas = [x for x in msgs if x["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == expected_text(LONG)
    assert msgs[-1]["type"] == "done" and msgs[-1]["finish_reason"] == "length"
    slow.close()
