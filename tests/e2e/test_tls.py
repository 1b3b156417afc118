"""TLS 1.3 on the shards (issue 11, SPEC 6), checked with clients nobody here wrote: Python
`ssl` + `websockets`, the official `openai` client over https, `openssl s_client` (ALPN, TLS 1.2
refused, resumption by ticket across two instances sharing a ticket key), plain HTTP on the TLS
port, a TLS slow-loris, and a certificate reload under live streams."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Server, expected_text, metric_value, run
from test_robustness import wait_until
from wsclient import gen_msg, session_of

from websockets.asyncio.client import connect


def openssl(*args: str, input: bytes | None = None, timeout: float = 20) -> str:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl not found: scripts/test.sh installs it")
    r = subprocess.run([exe, *args], input=input, capture_output=True, timeout=timeout)
    return (r.stdout + r.stderr).decode("utf-8", "replace")


def make_cert(dir: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 / localhost (its own CA)."""
    cert, key = dir / f"{name}.pem", dir / f"{name}.key"
    out = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                  "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    assert cert.exists() and key.exists(), out
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return {name: make_cert(d, name) for name in ("seedance-1", "seedance-2")} | {"dir": d}


def tls_args(cert: Path, key: Path, *extra: str) -> list[str]:
    return ["--tls-listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key), *extra]


@pytest.fixture(scope="module")
def tls_server(certs):
    s = Server(*tls_args(*certs["seedance-1"]))
    yield s
    s.kill()


def client_ctx(*cafiles: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for f in cafiles:
        ctx.load_verify_locations(cafile=str(f))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def stream(ws, rid: str, n: int) -> str:
    await ws.send(gen_msg(rid, n))
    text = ""
    while True:
        m = json.loads(await ws.recv())
        if m["type"] == "done":
            assert m["finish_reason"] == "length", m
            return text
        assert m["type"] == "delta", m
        text += m["text"]


def test_websockets_streams_over_tls_13(tls_server, certs):
    ctx = client_ctx(certs["seedance-1"][0])

    async def main():
        url = f"wss://127.0.0.1:{tls_server.tls_port}/v1/chat?stream_mode=token"
        async with connect(url, ssl=ctx, proxy=None, open_timeout=30) as ws:
            tls = ws.transport.get_extra_info("ssl_object")
            assert tls.version() == "TLSv1.3"
            assert tls.selected_alpn_protocol() == "http/1.1"
            s = await session_of(ws)
            assert s["compression"] == "permessage-deflate"
            assert await stream(ws, "a", 500) == expected_text(500)
            assert await stream(ws, "b", 3) == expected_text(3)

    run(main())


def test_openai_client_over_https(tls_server, certs):
    import httpx2 as httpx  # the HTTP client the openai package itself uses
    from openai import OpenAI

    with httpx.Client(verify=client_ctx(certs["seedance-1"][0])) as h:
        c = OpenAI(base_url=f"https://127.0.0.1:{tls_server.tls_port}/v1", api_key="-", http_client=h)
        text = "".join(chunk.choices[0].text for chunk in c.completions.create(
            model="null", prompt="Tell me a story", max_tokens=120, stream=True))
        assert text == expected_text(120)
        chat = c.chat.completions.create(model="null", max_tokens=20,
                                         messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == expected_text(20)


def test_an_untrusted_certificate_is_refused_by_the_client(tls_server, certs):
    """Verification is real: a client that trusts only the other certificate refuses ours."""
    ctx = client_ctx(certs["seedance-2"][0])
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")
    assert wait_until(lambda: metric_value(
        tls_server.metrics(), 'seedance_handshake_failures_total{reason="tls_bad_certificate"}') >= 1)


def test_s_client_alpn_and_tls12_refused(tls_server, certs):
    cert = str(certs["seedance-1"][0])
    addr = f"127.0.0.1:{tls_server.tls_port}"
    out = openssl("s_client", "-connect", addr, "-alpn", "http/1.1", "-CAfile", cert, input=b"")
    assert "ALPN protocol: http/1.1" in out, out
    assert "New, TLSv1.3" in out and "Verify return code: 0 (ok)" in out, out
    key = 'seedance_handshake_failures_total{reason="tls_no_shared_version"}'
    before = metric_value(tls_server.metrics(), key)
    out = openssl("s_client", "-connect", addr, "-tls1_2", input=b"")
    assert "alert protocol version" in out, out
    assert wait_until(lambda: metric_value(tls_server.metrics(), key) == before + 1)


def test_plain_http_on_the_tls_port_is_answered_and_classified(tls_server):
    key = 'seedance_handshake_failures_total{reason="tls_plain_http"}'
    before = metric_value(tls_server.metrics(), key)
    c = http.client.HTTPConnection("127.0.0.1", tls_server.tls_port, timeout=10)
    c.request("GET", "/v1/models")
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    assert r.status == 400 and body["error"]["code"] == "tls_required", body
    assert metric_value(tls_server.metrics(), key) == before + 1


def test_tls_slow_loris_is_closed_at_the_handshake_timeout(start_server, certs):
    s = start_server(*tls_args(*certs["seedance-1"]), "--handshake-timeout-ms", "500")
    socks = [socket.create_connection(("127.0.0.1", s.tls_port), timeout=10) for _ in range(20)]
    # Half a ClientHello on some, nothing on the others.
    for i, k in enumerate(socks):
        if i % 2:
            k.sendall(b"\x16\x03\x01\x02\x00\x01")
    t0 = time.monotonic()
    for k in socks:
        assert k.recv(100) == b""  # closed by the server
        k.close()
    assert time.monotonic() - t0 < 5
    assert metric_value(s.metrics(), 'seedance_handshake_failures_total{reason="tls_timeout"}') == 20
    # The listener still serves.
    out = openssl("s_client", "-connect", f"127.0.0.1:{s.tls_port}", input=b"")
    assert "New, TLSv1.3" in out


def resumption(addr_a: int, addr_b: int, tmp: Path) -> str:
    """Gets a ticket from the server on port A, then resumes with it on port B."""
    sess = tmp / f"sess-{addr_a}-{addr_b}.pem"
    sess.unlink(missing_ok=True)
    # Keep stdin open a moment: the ticket arrives after the handshake.
    p = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{addr_a}", "-sess_out", str(sess)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    p.communicate(b"", timeout=20)
    assert sess.exists(), "no session ticket received"
    return openssl("s_client", "-connect", f"127.0.0.1:{addr_b}", "-sess_in", str(sess), input=b"")


def test_resumption_by_ticket_across_instances_sharing_a_key(start_server, certs, tls_server):
    d = certs["dir"]
    keys = d / "ticket-keys"
    keys.write_text("# shared by every instance\n" + os.urandom(32).hex() + "\n")
    cert = certs["seedance-1"]
    a = start_server(*tls_args(*cert, "--tls-ticket-keys", str(keys)))
    b = start_server(*tls_args(*cert, "--tls-ticket-keys", str(keys)))
    out = resumption(a.tls_port, b.tls_port, d)
    assert "Reused, TLSv1.3" in out, out
    assert metric_value(b.metrics(), 'seedance_tls_handshakes_total{kind="resumed"}') == 1
    # An instance with its own per-process keys cannot open that ticket: a full handshake.
    out = resumption(a.tls_port, tls_server.tls_port, d)
    assert "New, TLSv1.3" in out, out


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def served_cert(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as t:
            return t.getpeercert(binary_form=True)


def test_certificate_reload_on_sighup_under_live_streams(start_server, certs, tmp_path):
    (c1, k1), (c2, k2) = certs["seedance-1"], certs["seedance-2"]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(c1, cert)
    shutil.copy(k1, key)
    s = start_server(*tls_args(cert, key), "--null-tokens-per-s", "300")
    ctx = client_ctx(c1, c2)
    assert served_cert(s.tls_port, ctx) == der_of(c1)

    async def main():
        url = f"wss://127.0.0.1:{s.tls_port}/v1/chat?stream_mode=token"
        async with connect(url, ssl=ctx, proxy=None, open_timeout=30) as ws:
            await session_of(ws)
            live = asyncio.create_task(stream(ws, "live", 900))  # ~3 s at 300 tokens/s
            await asyncio.sleep(0.5)
            # A broken file first: the reload fails and the old certificate stays.
            cert.write_text("not a certificate\n")
            s.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert await asyncio.to_thread(served_cert, s.tls_port, ctx) == der_of(c1)
            shutil.copy(c2, cert)
            shutil.copy(k2, key)
            s.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert await asyncio.to_thread(served_cert, s.tls_port, ctx) == der_of(c2)
            assert not live.done(), "the stream should still be running across the reload"
            assert await live == expected_text(900)

    run(main(), timeout=60)
    assert "TLS reload failed, keeping the old ones" in s.stderr
    assert "TLS certificate and ticket keys reloaded" in s.stderr
