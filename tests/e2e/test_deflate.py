"""permessage-deflate (RFC 7692, issue 10): Python `websockets` with its default offer, and raw
sockets whose frames are checked bit by bit and inflated by Python's own `zlib` (a decompressor
with the negotiated window, so a server that used a larger one fails); negotiation cases; a
decompression bomb; corrupt and fuzzed compressed frames. Node `ws` is in ws_node.test.mjs,
Chromium in test_page.py."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import zlib

import pytest

from conftest import expected_text, metric_value, run
from test_robustness import wait_until
from wsclient import gen_msg, open_ws, session_of

TAIL = b"\x00\x00\xff\xff"
OFFER = "permessage-deflate; client_max_window_bits"


def handshake(server, offer: str | None, query: str = "?stream_mode=token"):
    """A WebSocket upgrade by hand with `offer` in Sec-WebSocket-Extensions. Returns (socket,
    status, lower-cased headers, rest of the bytes read)."""
    s = socket.create_connection((server.host, server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    ext = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer is not None else ""
    s.sendall((f"GET /v1/chat{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, buf
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return s, status, headers, rest


def frame(op: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | op
    n = len(payload)
    if n < 126:
        hdr = bytes([b0, 0x80 | n])
    elif n < 65536:
        hdr = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        hdr = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def deflate(msg: bytes, obj=None, wbits: int = 15) -> bytes:
    """A compressed message payload as RFC 7692 sends it (sync flush, tail stripped)."""
    c = obj or zlib.compressobj(wbits=-wbits)
    out = c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


class Reader:
    """Server frames of one raw connection: (fin, rsv1, opcode, payload); data messages
    inflated with one `zlib` decompressor of the negotiated window (or a fresh one per message
    without context takeover)."""

    def __init__(self, s: socket.socket, rest: bytes, wbits: int, takeover: bool = True):
        self.s, self.buf, self.wbits, self.takeover = s, rest, wbits, takeover
        self.inflater = zlib.decompressobj(wbits=-wbits)
        self.wire = 0  # payload bytes of data frames as sent
        self.plain = 0
        self.compressed = 0
        self.uncompressed = 0

    def frame(self, timeout: float = 10):
        self.s.settimeout(timeout)
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                assert b1 & 0x80 == 0, "server frames are not masked"
                n, i = b1 & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, i = struct.unpack(">H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, i = struct.unpack(">Q", self.buf[2:10])[0], 10
                if n < 126 or i > 2:
                    if len(self.buf) >= i + n:
                        payload = self.buf[i:i + n]
                        self.buf = self.buf[i + n:]
                        assert b0 & 0x30 == 0, f"RSV2/RSV3 set: {b0:#x}"
                        return bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, payload
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def message(self, timeout: float = 10):
        """The next data message as JSON (control frames: returned as (opcode, payload))."""
        fin, rsv1, op, payload = self.frame(timeout)
        if op >= 0x8:
            assert not rsv1, "RSV1 on a control frame"
            return op, payload
        assert fin and op == 0x1, (fin, op)
        self.wire += len(payload)
        if rsv1:
            self.compressed += 1
            if not self.takeover:
                self.inflater = zlib.decompressobj(wbits=-self.wbits)
            body = self.inflater.decompress(payload + TAIL)
        else:
            self.uncompressed += 1
            body = payload
        self.plain += len(body)
        return json.loads(body)

    def send(self, msg: str, compress=None):
        data = msg.encode()
        if compress is None:
            self.s.sendall(frame(0x1, data))
        else:
            self.s.sendall(frame(0x1, deflate(data, compress), rsv1=True))

    def close_code(self, timeout: float = 10) -> int:
        """Reads until the server's close frame; returns its code."""
        while True:
            try:
                fin, rsv1, op, payload = self.frame(timeout)
            except (EOFError, ConnectionResetError):
                raise AssertionError("connection ended without a close frame")
            if op == 0x8:
                return struct.unpack(">H", payload[:2])[0]


def stream(r: Reader, rid: str, n: int) -> str:
    """Runs one generation on a raw connection; returns its text."""
    text, seq = "", 0
    while True:
        m = r.message()
        if isinstance(m, tuple):
            continue
        assert m.get("id") == rid, m
        if m["type"] == "done":
            assert m["finish_reason"] == "length", m
            return text
        assert m["type"] == "delta" and m["seq"] == seq + 1, m
        seq = m["seq"]
        text += m["text"]


def test_websockets_negotiates_deflate_and_streams_both_ways(server):
    """Python `websockets` offers permessage-deflate by default and compresses what it sends."""

    async def main():
        async with open_ws(server, "?stream_mode=token") as ws:
            s = await session_of(ws)
            assert s["compression"] == "permessage-deflate", s
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            answer = ws.response.headers["Sec-WebSocket-Extensions"]
            assert answer == "permessage-deflate; client_no_context_takeover", answer
            for rid, n in (("a", 300), ("b", 1)):
                await ws.send(gen_msg(rid, n))  # compressed by websockets (RSV1)
                text = ""
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "done":
                        break
                    text += m["text"]
                assert text == expected_text(n), rid

    before = server.metrics()
    run(main())
    after = server.metrics()
    key = 'seedance_compression_input_bytes_total{codec="deflate"}'
    saved = 'seedance_compression_bytes_saved_total{codec="deflate"}'
    assert metric_value(after, key) > metric_value(before, key)
    assert metric_value(after, saved) > metric_value(before, saved)
    # Idle again: no deflater is kept.
    assert wait_until(lambda: metric_value(server.metrics(), "seedance_compression_contexts") == 0)


def test_wire_format_rsv1_window_and_ratio(server):
    """Every data frame has RSV1 and inflates with a 2^12 window (the server's default) across
    messages; a compressed client message fragmented over three frames (RSV1 on the first only)
    is understood; deltas cost less than half their plain size."""
    s, status, headers, rest = handshake(server, OFFER)
    assert status == 101
    assert headers["sec-websocket-extensions"] == "permessage-deflate; client_no_context_takeover"
    r = Reader(s, rest, wbits=12)
    session = r.message()
    assert session["type"] == "session" and session["compression"] == "permessage-deflate"
    body = gen_msg("a", 500).encode()
    z = deflate(body)
    third = len(z) // 3
    s.sendall(frame(0x1, z[:third], fin=False, rsv1=True)
              + frame(0x9, b"between")  # a ping between fragments
              + frame(0x0, z[third:2 * third], fin=False)
              + frame(0x0, z[2 * third:]))
    pong = r.message()
    assert pong == (0xA, b"between")
    assert stream(r, "a", 500) == expected_text(500)
    assert r.compressed >= 500 and r.uncompressed == 0
    print(f"\npermessage-deflate: {r.wire} bytes for {r.plain} bytes of JSON ({r.wire / r.plain:.0%})")
    assert r.wire < 0.5 * r.plain
    s.close()


@pytest.mark.parametrize("bits", range(8, 16))
def test_server_max_window_bits(server, bits):
    s, status, headers, rest = handshake(server, f"permessage-deflate; server_max_window_bits={bits}")
    assert status == 101
    if bits == 8:
        # zlib has no 256-byte raw deflate window: declined, plain frames, and said so.
        assert "sec-websocket-extensions" not in headers
        r = Reader(s, rest, wbits=15)
        m = r.message()
        assert m["compression"] == "none" and "server_max_window_bits=8" in m["compression_declined"], m
        r.send(gen_msg("a", 50))
        assert stream(r, "a", 50) == expected_text(50)
        assert r.compressed == 0
    else:
        used = min(bits, 12)
        assert headers["sec-websocket-extensions"] == (
            f"permessage-deflate; client_no_context_takeover; server_max_window_bits={used}")
        r = Reader(s, rest, wbits=used)
        r.message()
        r.send(gen_msg("a", 400))
        assert stream(r, "a", 400) == expected_text(400)
        assert r.compressed > 400
    s.close()


@pytest.mark.parametrize("bits", [None, *range(8, 16)])
def test_client_max_window_bits(server, bits):
    """The client's deflater may use any window it offered; the server inflates each message."""
    offer = "permessage-deflate; client_max_window_bits" + ("" if bits is None else f"={bits}")
    s, status, headers, rest = handshake(server, offer)
    assert status == 101 and "permessage-deflate" in headers["sec-websocket-extensions"]
    r = Reader(s, rest, wbits=12)
    r.message()
    # zlib refuses a raw deflate window of 8; 9 produces distances within 2^9 either way.
    wbits = max(bits or 15, 9)
    r.send(gen_msg("a", 20, prompt="long prompt " * 200), compress=zlib.compressobj(wbits=-wbits))
    assert stream(r, "a", 20) == expected_text(20)
    s.close()


def test_no_context_takeover_both_ways(server):
    offer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    s, status, headers, rest = handshake(server, offer, "?stream_mode=chunk")
    assert status == 101
    assert headers["sec-websocket-extensions"] == (
        "permessage-deflate; client_no_context_takeover; server_no_context_takeover")
    # Each message must inflate with a fresh decompressor.
    r = Reader(s, rest, wbits=12, takeover=False)
    r.message()
    for rid in ("a", "b"):
        r.send(gen_msg(rid, 120), compress=zlib.compressobj(wbits=-15))
        assert stream(r, rid, 120) == expected_text(120)
    assert r.compressed > 2
    s.close()


@pytest.mark.parametrize("offer,needle", [
    ("permessage-deflate; server_max_window_bits=16", "server_max_window_bits"),
    ("permessage-deflate; server_max_window_bits", "needs a value"),
    ("permessage-deflate; client_max_window_bits=0", "client_max_window_bits"),
    ("permessage-deflate; server_no_context_takeover=yes", "takes no value"),
    ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", "given twice"),
    ("permessage-deflate; mystery", "unknown permessage-deflate parameter `mystery`"),
    ("permessage-deflate;;", "expected a parameter name"),
])
def test_bad_offers_refuse_the_handshake(server, offer, needle):
    before = metric_value(server.metrics(), 'seedance_handshake_failures_total{reason="bad_extension"}')
    s, status, headers, rest = handshake(server, offer)
    body = rest
    while len(body) < int(headers["content-length"]):
        body += s.recv(4096)
    s.close()
    assert status == 400 and headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["code"] == "bad_extension" and needle in err["message"], err
    after = metric_value(server.metrics(), 'seedance_handshake_failures_total{reason="bad_extension"}')
    assert after == before + 1


def test_other_extensions_are_ignored(server):
    s, status, headers, rest = handshake(server, "x-webkit-deflate-frame, foo; bar=\"1\"")
    assert status == 101 and "sec-websocket-extensions" not in headers
    r = Reader(s, rest, wbits=15)
    assert r.message()["compression"] == "none"
    s.close()


def test_decompression_bomb_closes_1009_before_inflating_it(server):
    """4 MiB is the message limit: a 6 MiB message that compresses to a few KB is refused with
    1009, and the server goes on serving."""
    s, status, headers, rest = handshake(server, OFFER)
    r = Reader(s, rest, wbits=12)
    r.message()
    bomb = json.dumps({"type": "generate", "id": "x", "prompt": " " * (6 << 20)}).encode()
    z = deflate(bomb)
    assert len(z) < 64 << 10
    s.sendall(frame(0x1, z, rsv1=True))
    assert r.close_code() == 1009
    s.close()
    t, status, headers, rest = handshake(server, OFFER)
    r = Reader(t, rest, wbits=12)
    r.message()
    r.send(gen_msg("a", 30), compress=zlib.compressobj(wbits=-15))
    assert stream(r, "a", 30) == expected_text(30)
    t.close()


@pytest.mark.parametrize("case,code", [
    ("corrupt", 1007),
    ("rsv1_continuation", 1002),
    ("rsv1_control", 1002),
    ("not_utf8", 1007),
])
def test_protocol_violations_close_with_the_rfc_code(server, case, code):
    s, status, headers, rest = handshake(server, OFFER)
    r = Reader(s, rest, wbits=12)
    r.message()
    if case == "corrupt":
        s.sendall(frame(0x1, b"\xff\xff\xff\xff", rsv1=True))
    elif case == "rsv1_continuation":
        z = deflate(gen_msg("a", 5).encode())
        s.sendall(frame(0x1, z[:3], fin=False, rsv1=True) + frame(0x0, z[3:], rsv1=True))
    elif case == "rsv1_control":
        s.sendall(frame(0x9, b"", rsv1=True))
    else:
        s.sendall(frame(0x1, deflate(b"\xff\xfe not text"), rsv1=True))
    assert r.close_code() == code
    s.close()


def test_rsv1_without_the_extension_is_a_protocol_error(server):
    s, status, headers, rest = handshake(server, None)
    r = Reader(s, rest, wbits=15)
    r.message()
    s.sendall(frame(0x1, deflate(gen_msg("a", 5).encode()), rsv1=True))
    assert r.close_code() == 1002
    s.close()


def test_fuzzed_compressed_messages_never_hurt_the_server(server):
    """Random and mangled compressed payloads: each connection gets an answer (an error message
    or a close with an RFC code), never a crash; the server serves normally afterwards."""
    rng = random.Random(7)
    valid = deflate(gen_msg("f", 3).encode())
    for i in range(60):
        s, status, headers, rest = handshake(server, OFFER)
        r = Reader(s, rest, wbits=12)
        r.message()
        kind = i % 3
        if kind == 0:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == 1:
            payload = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
            payload = bytes(payload)
        else:
            payload = valid[: rng.randrange(1, len(valid))]
        s.sendall(frame(0x1, payload, rsv1=True))
        try:
            m = r.message(timeout=5)
        except (EOFError, ConnectionResetError):
            raise AssertionError(f"case {i}: connection dropped without a close frame")
        except socket.timeout:
            # A cut-short stream can inflate to a valid prefix that is not JSON yet... but the
            # message is complete at FIN: the server must have answered.
            raise AssertionError(f"case {i}: no answer to {payload!r}")
        if isinstance(m, tuple):
            op, body = m
            assert op == 0x8 and struct.unpack(">H", body[:2])[0] in (1002, 1007, 1009), (i, m)
        else:
            assert m["type"] in ("error", "delta", "done"), (i, m)
        s.close()
    t, status, headers, rest = handshake(server, OFFER)
    r = Reader(t, rest, wbits=12)
    r.message()
    r.send(gen_msg("ok", 40), compress=zlib.compressobj(wbits=-15))
    assert stream(r, "ok", 40) == expected_text(40)
    t.close()


def test_credit_counts_compressed_bytes(server):
    """With a credit window, what is spent is the payload as sent (after deflate)."""
    window = 2048
    s, status, headers, rest = handshake(server, OFFER, f"?stream_mode=token&initial_window={window}")
    r = Reader(s, rest, wbits=12)
    r.message()
    r.send(gen_msg("w", 600))
    granted, text = window, ""
    while True:
        try:
            m = r.message(timeout=0.3)
        except socket.timeout:
            r.send(json.dumps({"type": "window_update", "bytes": r.wire - (granted - window)}))
            granted = r.wire + window
            continue
        assert r.wire <= granted, (r.wire, granted)
        if m["type"] == "done":
            break
        text += m["text"]
        if granted - r.wire < 512:
            r.send(json.dumps({"type": "window_update", "bytes": r.wire - (granted - window)}))
            granted = r.wire + window
    assert text == expected_text(600)
    # Compressed deltas spend less credit than their JSON would have.
    assert r.wire < 0.5 * r.plain
    s.close()
