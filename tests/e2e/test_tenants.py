"""Tenants from a file (issue 11, SPEC 4): every credential form on the WebSocket and the OpenAI
routes, refusals with their codes, and the limits — requests and tokens per minute (with the
refund at `done`), concurrent streams, connections — answered with 429 / `Retry-After` or a WS
`error` with `retry_after_ms`, shared by the shards of one instance."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import Server, expected_text, metric_value, run
from wsclient import gen_msg

KEYS = {"acme": "acme-secret", "limited": "lim-secret", "tok": "tok-secret", "other": "other-secret"}


def sha(k: str) -> str:
    return hashlib.sha256(k.encode()).hexdigest()


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory):
    f = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    f.write_text(f"""
tenants:
  - id: acme
    key_sha256: ["{sha('old-acme-key')}", "{sha(KEYS['acme'])}"]
    max_concurrent_streams: 2
    max_connections: 3
  - id: limited
    key_sha256: ["{sha(KEYS['limited'])}"]
    requests_per_minute: 3
  - id: tok
    key_sha256: ["{sha(KEYS['tok'])}"]
    tokens_per_minute: 500
  - id: other
    key_sha256: ["{sha(KEYS['other'])}"]
    models: ["some-other-model"]
""")
    s = Server("--tenants-file", str(f), "--null-tokens-per-s", "200", cores=2)
    yield s
    s.kill()


def ws(server, query: str = "", headers: dict | None = None, subprotocols=None):
    return connect(server.ws_url + query, additional_headers=headers, subprotocols=subprotocols,
                   proxy=None, open_timeout=30, compression=None)


async def generate(w, rid: str, n: int, **extra) -> dict:
    """Runs one generation; returns its `done` (or the `error`)."""
    await w.send(gen_msg(rid, n, **extra))
    while True:
        m = json.loads(await w.recv())
        if m.get("id") == rid and m["type"] in ("done", "error"):
            return m


def post(server, path: str, body: dict, key: str | None = None, query: str = ""):
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    c.request("POST", path + query, json.dumps(body), headers)
    r = c.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())
    c.close()
    return out


def status_of(exc: InvalidStatus) -> tuple[int, dict, dict]:
    r = exc.response
    return r.status_code, {k.lower(): v for k, v in r.headers.raw_items()}, json.loads(r.body)


def test_websocket_credentials(tenants_server):
    s = tenants_server

    async def main():
        accepted = [
            ({"Authorization": f"Bearer {KEYS['acme']}"}, ["acme.v1"], ""),
            (None, ["acme.v1", f"bearer.{KEYS['acme']}"], ""),  # browsers: key as a subprotocol
            (None, ["acme.v2"], f"?api_key={KEYS['acme']}"),
            ({"Authorization": "Bearer old-acme-key"}, None, ""),  # key alone, a rotated one
        ]
        for headers, protos, q in accepted:
            async with ws(s, q, headers, protos) as w:
                if protos:
                    assert w.subprotocol == protos[0], w.subprotocol  # `bearer.` never echoed
                m = json.loads(await w.recv())
                assert m["type"] == "session"
                done = await generate(w, "a", 5)
                assert done["type"] == "done", done
        refused = [
            (None, None, "", 403, "unknown_tenant"),
            ({"Authorization": "Bearer nope"}, ["acme.v1"], "", 401, "bad_credentials"),
            ({"Authorization": "Bearer nope"}, None, "", 401, "bad_credentials"),
            ({"Authorization": f"Bearer {KEYS['acme']}"}, ["initech.v1"], "", 403, "unknown_tenant"),
            ({"Authorization": f"Bearer {KEYS['other']}"}, ["other.v1"], "", 403, "model_not_allowed"),
        ]
        for headers, protos, q, status, code in refused:
            with pytest.raises(InvalidStatus) as e:
                async with ws(s, q, headers, protos):
                    pass
            st, _, body = status_of(e.value)
            assert (st, body["error"]["code"]) == (status, code), (headers, protos, body)

    run(main())


def test_openai_routes_take_the_same_keys(tenants_server):
    s = tenants_server
    body = {"model": "null", "prompt": "hi", "max_tokens": 5}
    st, _, b = post(s, "/v1/completions", body)
    assert st == 401 and b["error"]["code"] == "invalid_api_key", b
    st, _, b = post(s, "/v1/completions", body, key="wrong")
    assert st == 401 and b["error"]["code"] == "invalid_api_key", b
    st, _, b = post(s, "/v1/completions", body, key=KEYS["acme"])
    assert st == 200 and b["choices"][0]["text"] == expected_text(5), b
    st, _, b = post(s, "/v1/completions", body, query=f"?api_key={KEYS['acme']}")
    assert st == 200, b
    st, _, b = post(s, "/v1/completions", body, key=KEYS["other"])
    assert st == 403 and b["error"]["code"] == "model_not_allowed", b

    from openai import AuthenticationError, OpenAI
    c = OpenAI(base_url=f"http://{s.addr}/v1", api_key=KEYS["acme"])
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="null", prompt="hi", max_tokens=30, stream=True))
    assert text == expected_text(30)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"http://{s.addr}/v1", api_key="wrong").completions.create(
            model="null", prompt="hi", max_tokens=3)


def test_requests_per_minute_shared_by_the_shards(tenants_server):
    """`limited` may make 3 requests a minute: over HTTP and WebSocket, on new connections (which
    SO_REUSEPORT hands to either of the two shards), the fourth and later are refused with 429 /
    `rate_limited`."""
    s = tenants_server
    before = metric_value(s.metrics(), 'seedance_tenant_rate_limited_total{tenant="limited",limit="requests_per_minute"}')
    outcomes = []
    for i in range(3):
        st, h, b = post(s, "/v1/completions", {"model": "null", "prompt": "x", "max_tokens": 2},
                        key=KEYS["limited"])
        outcomes.append(st)
    assert outcomes == [200, 200, 200]
    st, h, b = post(s, "/v1/completions", {"model": "null", "prompt": "x", "max_tokens": 2},
                    key=KEYS["limited"])
    assert st == 429 and b["error"]["code"] == "rate_limited", b
    assert b["error"]["type"] == "rate_limit_error"
    assert 1 <= int(h["retry-after"]) <= 20, h

    async def main():
        errors = []
        for i in range(4):  # new connections land on either shard
            async with ws(s, "", {"Authorization": f"Bearer {KEYS['limited']}"}) as w:
                await w.recv()
                errors.append(await generate(w, f"r{i}", 2))
        return errors

    for e in run(main()):
        assert e["type"] == "error" and e["code"] == "rate_limited", e
        assert e["limit"] == "requests_per_minute" and 0 < e["retry_after_ms"] <= 20_000, e
    m = s.metrics()
    assert metric_value(m, 'seedance_tenant_requests_total{tenant="limited"}') == 3
    # The request counter carries the tenant too.
    assert metric_value(m, 'seedance_requests_total{tenant="limited",model="null",outcome="length"}') == 3
    assert metric_value(m, 'seedance_tenant_rate_limited_total{tenant="limited",limit="requests_per_minute"}') == before + 5


def test_tokens_per_minute_with_the_refund_at_done(tenants_server):
    """`tok` may use 500 tokens a minute, charged as prompt + max_tokens up front: a generation
    cancelled after a few tokens gives the rest back, so the next one fits."""
    s = tenants_server

    async def main():
        async with ws(s, "?stream_mode=token", {"Authorization": f"Bearer {KEYS['tok']}"}) as w:
            await w.recv()
            too_big = await generate(w, "big", 600)
            assert too_big["code"] == "request_too_large" and "retry_after_ms" not in too_big, too_big
            # 1 prompt token + 400: charged 401; cancelled after ~10 tokens.
            await w.send(gen_msg("c", 400, prompt="hi"))
            for _ in range(10):
                m = json.loads(await w.recv())
                assert m["type"] == "delta", m
            await w.send(json.dumps({"type": "cancel", "id": "c"}))
            while (m := json.loads(await w.recv()))["type"] != "done":
                pass
            assert m["finish_reason"] == "cancelled"
            used = m["usage"]["total_tokens"]
            assert used < 100, m
            # Without the refund 401 + 401 > 500.
            done = await generate(w, "d", 400, prompt="hi")
            assert done["type"] == "done" and done["usage"]["completion_tokens"] == 400, done
            # Now the minute's tokens are spent: refused with the time to wait.
            e = await generate(w, "e", 200, prompt="hi")
            assert e["code"] == "rate_limited" and e["limit"] == "tokens_per_minute", e
            assert e["retry_after_ms"] > 0
            return used

    used = run(main())
    charged = metric_value(s.metrics(), 'seedance_tenant_tokens_charged_total{tenant="tok"}')
    assert charged == used + 401, (charged, used)


def test_concurrent_streams_and_connections(tenants_server):
    s = tenants_server
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}

    async def main():
        async with ws(s, "?stream_mode=token", auth) as w:
            await w.recv()
            for rid in ("s1", "s2", "s3"):
                await w.send(gen_msg(rid, 300))  # 1.5 s each at 200 tokens/s
            third = None
            while third is None:
                m = json.loads(await w.recv())
                if m.get("id") == "s3":
                    third = m
            assert third["type"] == "error" and third["limit"] == "max_concurrent_streams", third
            assert third["retry_after_ms"] == 1000
            assert metric_value(s.metrics(), 'seedance_tenant_streams{tenant="acme"}') == 2
            # When one ends a new one is admitted.
            while not ((m := json.loads(await w.recv()))["type"] == "done" and m["id"] == "s1"):
                pass
            done = await generate(w, "s4", 3)
            assert done["type"] == "done", done
            # Connections: this one plus two more is the limit; a fourth is refused.
            async with ws(s, "", auth) as w2, ws(s, "", auth) as w3:
                await w2.recv()
                await w3.recv()
                with pytest.raises(InvalidStatus) as e:
                    async with ws(s, "", auth):
                        pass
                st, h, b = status_of(e.value)
                assert st == 429 and b["error"]["code"] == "rate_limited", b
                assert h["retry-after"] == "1"
            # Two closed: room again.
            await asyncio.sleep(0.3)
            async with ws(s, "", auth) as w4:
                assert json.loads(await w4.recv())["type"] == "session"

    run(main())
    m = s.metrics()
    assert metric_value(m, 'seedance_tenant_rate_limited_total{tenant="acme",limit="max_connections"}') == 1
    assert metric_value(m, 'seedance_handshake_failures_total{reason="rate_limited"}') == 1


@pytest.mark.parametrize("body,needle", [
    ("tenants:\n  - id: a\n    key_sha256: [abc]\n", "64 hex digits"),
    ("tenants:\n  - id: a.b\n    key_sha256: []\n", "no dot"),
    ("tenants:\n  - id: a\n    key_sha256: [" + "0" * 64 + "]\n    rpm: 5\n", "unknown field"),
    ("tenants:\n  - id: a\n    key_sha256: []\n", "no key"),
])
def test_bad_tenants_files_stop_the_server_with_a_reason(tmp_path, body, needle):
    import subprocess
    from conftest import BIN
    f = tmp_path / "t.yaml"
    f.write_text(body)
    r = subprocess.run([str(BIN), "--model", "null", "--listen", "127.0.0.1:0", "--tenants-file", str(f)],
                       capture_output=True, timeout=30)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "tenants file" in err and needle in err, err


def test_limits_hold_across_instances_sharing_redis(tmp_path):
    """Two instances on one Redis share each tenant's limits (`tenant_sync_ms`, 100 ms here):
    streams open on A count against B's cap, and requests admitted on either count against
    the per-minute allowance of both — with the same 429 / `rate_limited` answers as on one
    instance. Without the store each instance would admit the whole limit again."""
    import time

    from resumelib import Redis

    f = tmp_path / "tenants.yaml"
    f.write_text(f"""
tenants:
  - id: acme
    key_sha256: ["{sha(KEYS['acme'])}"]
    max_concurrent_streams: 2
  - id: limited
    key_sha256: ["{sha(KEYS['limited'])}"]
    requests_per_minute: 4
""")
    redis = Redis(tmp_path)
    common = ("--tenants-file", str(f), "--null-tokens-per-s", "100", "--redis-url", redis.url,
              "--tenant-sync-ms", "100")
    a = Server(*common, "--instance-id", "A", cores=1)
    b = Server(*common, "--instance-id", "B", cores=1)
    try:
        auth = {"Authorization": f"Bearer {KEYS['acme']}"}

        async def streams():
            async with ws(a, "", auth) as wa, ws(b, "", auth) as wb:
                await wa.recv()
                await wb.recv()
                await wa.send(gen_msg("a1", 400))  # 4 s each at 100 tokens/s
                await wa.send(gen_msg("a2", 400))
                assert json.loads(await wa.recv())["type"] == "delta"
                await asyncio.sleep(0.5)  # a few syncs
                refused = await generate(wb, "b1", 5)
                assert refused["type"] == "error" and refused["limit"] == "max_concurrent_streams", refused
                # A's streams end (cancelled): B has room again after the next sync.
                await wa.send(json.dumps({"type": "cancel", "id": "a1"}))
                await wa.send(json.dumps({"type": "cancel", "id": "a2"}))
                await asyncio.sleep(0.5)
                done = await generate(wb, "b2", 5)
                assert done["type"] == "done", done

        run(streams())

        def complete(server):
            return post(server, "/v1/completions", {"model": "null", "prompt": "x", "max_tokens": 2},
                        key=KEYS["limited"])

        assert [complete(a)[0], complete(a)[0], complete(a)[0]] == [200, 200, 200]
        time.sleep(0.5)
        assert complete(b)[0] == 200  # the fourth of the minute
        time.sleep(0.5)
        for server in (b, a):
            st, h, body = complete(server)
            assert st == 429 and body["error"]["code"] == "rate_limited", (st, body)
            assert int(h["retry-after"]) >= 1, h
        assert metric_value(b.metrics(), 'seedance_tenant_requests_total{tenant="limited"}') == 1
    finally:
        a.kill()
        b.kill()
        redis.stop()


def test_sighup_reloads_the_tenants_file(tmp_path):
    """Key rotation without a restart: SIGHUP rereads the tenants file. A new key works at once,
    a removed key gets 401, a stream admitted before goes on to its end; a file that does not
    parse, or lists no tenant, is refused with a log line and the tenants in force stay."""
    import signal
    import time

    f = tmp_path / "tenants.yaml"

    def write(keys: list[str], extra: str = "") -> None:
        f.write_text("tenants:\n  - id: acme\n    key_sha256: [" +
                     ", ".join(f'"{sha(k)}"' for k in keys) + "]\n" + extra)

    def reloads(srv) -> int:
        return sum(1 for line in srv.stderr_lines if "tenants reloaded" in line)

    def refused(srv) -> int:
        return sum(1 for line in srv.stderr_lines if "not reloaded" in line)

    def status(srv, key: str) -> int:
        return post(srv, "/v1/completions", {"model": "null", "prompt": "x", "max_tokens": 2}, key=key)[0]

    write(["key-old"])
    srv = Server("--tenants-file", str(f), "--null-tokens-per-s", "100", cores=1)
    try:
        assert status(srv, "key-old") == 200 and status(srv, "key-new") == 401

        async def rotate():
            async with ws(srv, "", {"Authorization": "Bearer key-old"}) as w:
                await w.recv()
                await w.send(gen_msg("long", 150))  # 1.5 s
                assert json.loads(await w.recv())["type"] == "delta"
                write(["key-new"], "    max_concurrent_streams: 4\n")
                srv.proc.send_signal(signal.SIGHUP)
                await asyncio.to_thread(lambda: wait_for_count(lambda: reloads(srv), 1))
                assert await asyncio.to_thread(status, srv, "key-new") == 200
                assert await asyncio.to_thread(status, srv, "key-old") == 401
                text = ""
                while (m := json.loads(await w.recv()))["type"] != "done":
                    text += m["text"]
                assert m["finish_reason"] == "length" and m["usage"]["completion_tokens"] == 150

        def wait_for_count(count, n: int) -> None:
            deadline = time.monotonic() + 10
            while count() < n:
                assert time.monotonic() < deadline, srv.stderr
                time.sleep(0.05)

        run(rotate())
        for bad in ("tenants: [", "tenants: []\n"):
            f.write_text(bad)
            before = refused(srv)
            srv.proc.send_signal(signal.SIGHUP)
            wait_for_count(lambda: refused(srv), before + 1)
            assert status(srv, "key-new") == 200, bad
            assert status(srv, "nobody") == 401, "authentication must stay on"
    finally:
        srv.kill()

