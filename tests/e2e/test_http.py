"""Plain HTTP on the shared port (SPEC 5) and the WebSocket handshake's HTTP refusals (SPEC 4),
through `http.client` and raw sockets."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket

import pytest

from conftest import metric_value, run
from wsclient import generate, open_ws, session_of

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def raw_exchange(server, request: bytes, timeout: float = 10) -> bytes:
    """Sends raw bytes, reads until the server closes (or the head + content-length arrived)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            if b"\r\n\r\n" in data:
                head, body = data.split(b"\r\n\r\n", 1)
                if head.startswith(b"HTTP/1.1 101"):
                    return data
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length" and len(body) >= int(v):
                        return data
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def upgrade(path="/v1/chat", key=None, version="13", extra="", method="GET", upgrade_hdr="websocket",
            connection_hdr="Upgrade") -> bytes:
    key = key if key is not None else new_key()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if upgrade_hdr is not None:
        lines.append(f"Upgrade: {upgrade_hdr}")
    if connection_hdr is not None:
        lines.append(f"Connection: {connection_hdr}")
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    req = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return req.encode()


# ---------------------------------------------------------------- handshake


def test_upgrade_101_with_correct_accept(server):
    key = new_key()
    status, headers, _ = parse_response(raw_exchange(server, upgrade(key=key)))
    assert status == 101
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-accept"] == accept_for(key)
    assert "sec-websocket-protocol" not in headers


def test_upgrade_tokens_are_case_insensitive(server):
    key = new_key()
    req = upgrade(key=key, upgrade_hdr="WebSocket", connection_hdr="keep-alive, UPGRADE")
    status, headers, _ = parse_response(raw_exchange(server, req))
    assert status == 101
    assert headers["sec-websocket-accept"] == accept_for(key)


@pytest.mark.parametrize("version", ["8", "12", "14", "", None])
def test_bad_version_426(server, version):
    status, headers, body = parse_response(raw_exchange(server, upgrade(version=version)))
    assert status == 426
    assert headers["sec-websocket-version"] == "13"
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "bad_version"


def test_bad_version_via_http_client(server):
    c = server.http()
    c.request("GET", "/v1/chat", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                          "Sec-WebSocket-Key": new_key(), "Sec-WebSocket-Version": "7"})
    r = c.getresponse()
    assert r.status == 426
    assert r.getheader("Sec-WebSocket-Version") == "13"
    assert json.loads(r.read())["error"]["code"] == "bad_version"
    c.close()


@pytest.mark.parametrize(
    "req,status,code",
    [
        (upgrade(extra="X-Model-ID: bad model\r\n"), 400, "bad_model_id"),
        (upgrade(extra="X-Model-ID: a/b\r\n"), 400, "bad_model_id"),
        (upgrade(extra="X-Model-ID: " + "m" * 65 + "\r\n"), 400, "bad_model_id"),
        (upgrade(path="/v1/chat?model=%2Fetc"), 400, "bad_model_id"),
        (upgrade(extra="X-Model-ID: gpt-4o\r\n"), 404, "model_not_found"),
        (upgrade(path="/v1/chat?model=llama-3.1-8b"), 404, "model_not_found"),
        (upgrade(extra="X-Stream-Mode: sentence\r\n"), 400, "bad_stream_mode"),
        (upgrade(path="/v1/chat?stream_mode="), 400, "bad_stream_mode"),
        (upgrade(key="short"), 400, "bad_key"),
        (upgrade(key=""), 400, "bad_key"),
        (upgrade(upgrade_hdr=None), 400, "missing_upgrade"),
        (upgrade(connection_hdr="keep-alive"), 400, "missing_connection"),
        (upgrade(method="POST"), 405, "bad_method"),
    ],
)
def test_handshake_refusals(server, req, status, code):
    got, headers, body = parse_response(raw_exchange(server, req))
    assert got == status, body
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["code"] == code and err["message"]
    assert int(headers["content-length"]) == len(body)


def test_handshake_failures_are_counted(server):
    before = metric_value(server.metrics(), 'seedance_handshake_failures_total{reason="bad_stream_mode"}')
    raw_exchange(server, upgrade(extra="X-Stream-Mode: nope\r\n"))
    after = metric_value(server.metrics(), 'seedance_handshake_failures_total{reason="bad_stream_mode"}')
    assert after == before + 1


# ---------------------------------------------------------------- routes


def test_health(server):
    status, headers, body = server.get("/health")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


def test_ready(server):
    status, _, body = server.get("/ready")
    assert status == 200
    v = json.loads(body)
    assert v["status"] == "ready" and v["model"] == "null"


def test_models_openai_shape(server):
    status, headers, body = server.get("/v1/models")
    assert status == 200 and headers["content-type"].startswith("application/json")
    v = json.loads(body)
    assert v["object"] == "list"
    assert [m["id"] for m in v["data"]] == ["null"]
    m = v["data"][0]
    assert m["object"] == "model" and isinstance(m["created"], int) and isinstance(m["owned_by"], str)


def test_metrics(server):
    async def one():
        async with open_ws(server) as ws:
            await session_of(ws)
            await generate(ws, "m", 10, "token")

    run(one())
    status, headers, body = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert metric_value(text, 'seedance_io_driver{driver="io_uring"}') == 2
    assert metric_value(text, 'seedance_io_driver{driver="epoll"}') == 0
    assert "# TYPE seedance_io_driver gauge" in text
    assert metric_value(text, 'seedance_requests_total{tenant="",model="null",outcome="length"}') >= 1
    assert metric_value(text, "seedance_generated_tokens_total") >= 10
    # Prometheus text format: every sample line is `name{labels} value`.
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert name and float(value) == float(value), line


def test_404_json(server):
    status, headers, body = server.get("/v2/nothing")
    assert status == 404 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "not_found"


def test_405_json_with_allow(server):
    c = server.http()
    c.request("POST", "/health", body=b"{}", headers={"Content-Type": "application/json"})
    r = c.getresponse()
    body = r.read()
    assert r.status == 405
    assert "GET" in r.getheader("Allow")
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    # 405 keeps the connection usable.
    c.request("GET", "/health")
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    c.close()


def test_head(server):
    c = server.http()
    c.request("HEAD", "/health")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Length") == "15"
    assert r.read() == b""
    c.close()


def test_keep_alive_two_requests_one_connection(server):
    c = server.http()
    c.request("GET", "/health")
    r1 = c.getresponse()
    assert r1.status == 200 and json.loads(r1.read()) == {"status": "ok"}
    sock = c.sock
    assert sock is not None
    c.request("GET", "/v1/models")
    r2 = c.getresponse()
    assert r2.status == 200 and json.loads(r2.read())["object"] == "list"
    assert c.sock is sock, "the server closed a keep-alive connection"
    c.request("GET", "/nope")
    r3 = c.getresponse()
    assert r3.status == 404
    r3.read()
    assert c.sock is sock
    c.close()


def test_pipelined_requests(server):
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n" \
          b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    bodies = []
    rest = data
    for _ in range(3):
        status, headers, after = parse_response(rest)
        assert status == 200
        n = int(headers["content-length"])
        bodies.append(json.loads(after[:n]))
        rest = after[n:]
    assert rest == b""
    assert bodies[0] == {"status": "ok"}
    assert bodies[1]["status"] == "ready"
    assert bodies[2]["object"] == "list"


def test_http10_closes(server):
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status, _, body = parse_response(data)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_head_too_large_431(server):
    big = "X-Filler: " + "a" * 20000 + "\r\n"
    status, _, body = parse_response(raw_exchange(server, f"GET /health HTTP/1.1\r\nHost: x\r\n{big}\r\n".encode()))
    assert status == 431
    assert json.loads(body)["error"]["code"] == "head_too_large"


def test_garbage_request_400(server):
    status, _, body = parse_response(raw_exchange(server, b"\x16\x03\x01 not http at all\r\n\r\n"))
    assert status == 400
    assert json.loads(body)["error"]["code"]


def read_to_eof(server, request: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):  # a timeout here fails the test: the server kept it open
            data += chunk
    return data


def test_connection_close_is_honoured(server):
    data = read_to_eof(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, body = parse_response(data)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_absolute_form_target(server):
    data = read_to_eof(server, b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    status, _, body = parse_response(data)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_query_string_on_plain_routes(server):
    status, _, body = server.get("/health?probe=1")
    assert status == 200 and json.loads(body) == {"status": "ok"}
