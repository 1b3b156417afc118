"""Resumable streams (SPEC 4 "Resume from last offset"; issue 9), end to end with Python
`websockets` against real servers and a real `redis-server`:

- random TCP cuts (no close frame) and resumes, on the same instance (embedded store) and
  alternating between two instances sharing Redis: zero lost, zero duplicated deltas;
- `kill -9` of the owner mid-generation: the other instance takes over, greedy text identical
  to an uninterrupted run;
- SIGTERM: the generation is handed over at once (the lease is released, not left to expire);
- Redis stopped and restarted under live streams;
- every refusal of a `resume` with its error code;
- a replay is byte for byte the frames the live client got (plain deltas, logprobs, done).
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from conftest import Server, expected_text, metric_value, run
from resumelib import Redis, Resumed, connect, recv_until, resume, stream_with_cuts
from servinglib import wait_for

PACED = ("--null-tokens-per-s", "100")


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()


def gen(id: str, n: int, mode: str = "token", **extra) -> dict:
    return {"type": "generate", "id": id, "prompt": "Tell me a story", "max_tokens": n,
            "stream_mode": mode, **extra}


async def many_cut_streams(urls, streams: int, n: int, seed: int, modes=("token",), **kw):
    rng = random.Random(seed)
    return await asyncio.gather(*[
        stream_with_cuts(urls, gen(f"r{i}", n, modes[i % len(modes)]), random.Random(rng.random()), **kw)
        for i in range(streams)
    ])


def check_exact(results: list[Resumed], n: int) -> int:
    for r in results:
        r.assert_exact()
        assert r.text == expected_text(n), (r.cuts, r.text[:200])
        assert r.done["finish_reason"] == "length" and r.done["resumable"] is True, r.done
    return sum(r.cuts for r in results)


def test_thousand_random_cuts_same_instance(start_server):
    """1,000+ cuts at random moments, random pauses, resumed on the same instance (its shards
    differ from cut to cut: SO_REUSEPORT spreads the new connections)."""
    s = start_server(*PACED)
    n = 600
    results = run(many_cut_streams([s.ws_url], 32, n, seed=9, modes=("token", "chunk")), 120)
    for r in results:
        r.assert_exact()
        assert r.text == expected_text(n) or r.text.rstrip() == expected_text(n), r.text[:200]
    cuts = sum(r.cuts for r in results)
    assert cuts >= 1000, f"only {cuts} cuts"
    m = s.metrics()
    # A resume cut before the server read it is not counted.
    assert metric_value(m, 'seedance_resumes_total{outcome="ok"}') >= cuts * 0.9
    assert metric_value(m, "seedance_takeovers_total") == 0


def test_random_cuts_across_two_instances_sharing_redis(start_server, redis):
    a = start_server(*PACED, "--redis-url", redis.url, "--instance-id", "A")
    b = start_server(*PACED, "--redis-url", redis.url, "--instance-id", "B")
    n = 300
    results = run(many_cut_streams([a.ws_url, b.ws_url], 12, n, seed=4), 120)
    cuts = check_exact(results, n)
    assert cuts >= 200, cuts
    # Every other resume landed on B, which served it from Redis.
    assert metric_value(b.metrics(), 'seedance_resumes_total{outcome="ok"}') >= cuts // 2 - 1
    status, _, body = b.get("/ready")
    assert status == 200 and json.loads(body)["store"] == {"kind": "redis", "status": "ok", "instance": "B"}


def greedy(id: str, n: int) -> dict:
    return gen(id, n, temperature=0, ignore_eos=True)


async def full_run(url: str, g: dict) -> Resumed:
    ws, _ = await connect(url)
    await ws.send(json.dumps(g))
    r = Resumed()
    assert await recv_until(ws, r, 60)
    await ws.close()
    return r


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_replay_is_byte_for_byte_what_was_sent(start_server, redis, store):
    """Plain deltas are logged as their text and rebuilt on replay, deltas with logprobs and
    the done as their JSON: a resume after an early seq gets exactly the frames the live client
    got, on the same instance (embedded) and on another one (Redis)."""
    common = ("--null-tokens-per-s", "0")
    if store == "redis":
        common += ("--redis-url", redis.url)
    a = start_server(*common, model="synthetic:tiny")
    b = start_server(*common, model="synthetic:tiny") if store == "redis" else a
    n = 24

    async def frames(ws) -> list[str]:
        out = []
        while True:
            raw = await asyncio.wait_for(ws.recv(), 30)
            m = json.loads(raw)
            if m["type"] in ("delta", "done"):
                out.append(raw)
                if m["type"] == "done":
                    return out

    async def go():
        got = {}
        ws, hello = await connect(a.ws_url)
        for id, extra in (("plain", {}), ("lp", {"logprobs": True, "top_logprobs": 2})):
            await ws.send(json.dumps(greedy(id, n) | extra))
            got[id] = await frames(ws)
        await ws.close()
        replayed = {}
        for id in got:
            ws2 = await resume(b.ws_url, hello, id, 2)
            replayed[id] = await frames(ws2)
            await ws2.close()
        return got, replayed

    got, replayed = run(go(), 60)
    for id in got:
        assert len(got[id]) == n + 1, got[id]
        assert replayed[id] == got[id][2:], id
    assert "top_logprobs" in json.loads(got["lp"][0])["logprobs"][0], got["lp"][0]


def test_kill9_takeover_is_identical_to_an_uninterrupted_run(start_server, redis):
    """The owner dies mid-generation; the client resumes on the other instance, which claims
    the generation once the lease (1 s) ran out, re-prefills prompt + logged tokens and goes
    on: the greedy text equals a run that was never interrupted."""
    common = ("--redis-url", redis.url, "--lease-ms", "1000", "--null-tokens-per-s", "0")
    a = start_server(*common, "--instance-id", "A", model="synthetic:tiny")
    b = start_server(*common, "--instance-id", "B", model="synthetic:tiny")
    n = 160

    async def go():
        want = await full_run(b.ws_url, greedy("ref", n))
        ws, hello = await connect(a.ws_url)
        await ws.send(json.dumps(greedy("g", n)))
        r = Resumed()
        while len(r.deltas) < 12:
            assert not await recv_until(ws, r, 10, stop_after=1), "finished before the kill"
        a.proc.kill()  # SIGKILL: no drain, no release
        a.proc.wait(10)
        t0 = time.monotonic()
        ws2 = await resume(b.ws_url, hello, "g", r.msgs[-1]["seq"])
        assert await recv_until(ws2, r, 60)
        took = time.monotonic() - t0
        await ws2.close()
        return want, r, took

    want, got, took = run(go(), 120)
    got.assert_exact()
    assert got.text == want.text, f"takeover diverged:\n{got.text!r}\n!=\n{want.text!r}"
    assert got.done["usage"]["completion_tokens"] == n
    assert 0.5 < took < 30, took
    m = b.metrics()
    assert metric_value(m, "seedance_takeovers_total") == 1


def test_sigterm_hands_generations_over_at_once(start_server, redis):
    """A draining instance releases its leases: the instance the client resumes on claims at
    once (well before the 20 s lease would run out) and the text is complete."""
    common = ("--redis-url", redis.url, "--lease-ms", "20000", "--null-tokens-per-s", "50")
    a = start_server(*common, "--instance-id", "A")
    b = start_server(*common, "--instance-id", "B")
    n = 120

    async def go():
        ws, hello = await connect(a.ws_url)
        await ws.send(json.dumps(gen("h", n)))
        await ws.send(json.dumps(gen("h2", n, "chunk")))
        r = {"h": Resumed(), "h2": Resumed()}
        while len(r["h"].deltas) < 8 or not r["h2"].deltas:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            r[m["id"]].msgs.append(m)
        a.sigterm()
        note = None
        async for raw in ws:  # until the server's 1001 close
            m = json.loads(raw)
            if m["type"] == "session":
                note = m
            else:
                r[m["id"]].msgs.append(m)
        assert ws.close_code == 1001, ws.close_code
        assert note and note["closing"] is True, note
        after = {x["id"]: x["after"] for x in note["resume"]}
        assert set(after) == {"h", "h2"}, note
        t0 = time.monotonic()
        firsts = []
        for id in ("h", "h2"):
            last = r[id].msgs[-1]["seq"]
            assert after[id] >= last
            ws2 = await resume(b.ws_url, hello, id, last, "chunk" if id == "h2" else "token")
            assert await recv_until(ws2, r[id], 30)
            firsts.append(time.monotonic() - t0)
            await ws2.close()
        return r, firsts

    r, firsts = run(go(), 60)
    for res in r.values():
        res.assert_exact()
        assert res.text.strip() == expected_text(n)
    assert max(firsts) < 15, f"hand-over waited for the lease: {firsts}"
    assert a.proc.wait(20) == 0
    assert metric_value(b.metrics(), "seedance_takeovers_total") == 2


def test_redis_outage_leaves_live_streams_alone(start_server, redis):
    s = start_server("--redis-url", redis.url, "--null-tokens-per-s", "40")
    n = 200

    async def live(id):
        return await full_run(s.ws_url, gen(id, n))

    async def go():
        tasks = [asyncio.create_task(live(f"l{i}")) for i in range(4)]
        await asyncio.sleep(0.5)
        redis.stop()
        await asyncio.sleep(0.5)
        # While it is down: /ready says so, and a resume is refused cleanly.
        status, _, body = await asyncio.to_thread(s.get, "/ready")
        ready = json.loads(body)
        ws, hello = await connect(s.ws_url)
        await ws.send(json.dumps(gen("x", 5)))
        r = Resumed()
        assert await recv_until(ws, r, 10)
        assert r.done["resumable"] is False, r.done
        await ws.send(json.dumps({"type": "resume", "session": hello["session"], "token": hello["token"],
                                  "id": "x", "after": 0}))
        refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
        await ws.close()
        results = await asyncio.gather(*tasks)
        return status, ready, refused, results

    status, ready, refused, results = run(go(), 60)
    assert status == 200 and ready["store"]["status"] == "unavailable", ready
    assert refused["type"] == "error" and refused["code"] == "store_unavailable", refused
    for r in results:
        r.assert_exact()
        assert r.text == expected_text(n)
        assert r.done["resumable"] is False  # their log has a hole now
    assert metric_value(s.metrics(), 'seedance_store_up{store="redis"}') == 0

    redis.start()
    wait_for(lambda: json.loads(s.get("/ready")[2])["store"]["status"] == "ok", 15, what="store back")
    results = run(many_cut_streams([s.ws_url], 3, 100, seed=1), 60)
    check_exact(results, 100)
    assert metric_value(s.metrics(), "seedance_store_errors_total") >= 1


def test_bad_resume_messages_get_their_codes(start_server):
    s = start_server("--null-tokens-per-s", "50", "--resume-grace-ms", "60000")

    async def go():
        ws, hello = await connect(s.ws_url)
        await ws.send(json.dumps(gen("a", 200)))
        r = Resumed()
        while len(r.deltas) < 3:
            await recv_until(ws, r, 5, stop_after=1)
        codes = {}

        async def ask(label, **fields):
            body = {"type": "resume", "session": hello["session"], "token": hello["token"], "id": "a",
                    "after": 0, **fields}
            w2, _ = await connect(s.ws_url)
            await w2.send(json.dumps(body))
            m = json.loads(await asyncio.wait_for(w2.recv(), 10))
            await w2.close()
            codes[label] = m.get("code") if m["type"] == "error" else m["type"]

        await ask("wrong token", token="0" * 32)
        await ask("unknown session", session="s-0000000000000000")
        await ask("unknown id", id="nope")
        await ask("after too large", after=10_000)
        await ask("missing id", id=None)
        # Two resumes of one generation on one connection.
        w3, _ = await connect(s.ws_url)
        body = {"type": "resume", "session": hello["session"], "token": hello["token"], "id": "a", "after": 0}
        await w3.send(json.dumps(body))
        await w3.send(json.dumps(body))
        seen = []
        while "duplicate_id" not in seen:
            m = json.loads(await asyncio.wait_for(w3.recv(), 10))
            seen.append(m.get("code", m["type"]))
        # Cancel through the resumed connection: the owner stops, the done comes through the log.
        await w3.send(json.dumps({"type": "cancel", "id": "a"}))
        follower = Resumed()
        while True:
            m = json.loads(await asyncio.wait_for(w3.recv(), 10))
            if m["type"] == "done":
                follower.msgs.append(m)
                break
        await w3.close()
        await ws.close()
        # A finished request resumed after its done: already_finished; before it: replay + done.
        await ask("replayed finished", after=follower.done["seq"])
        w4 = await resume(s.ws_url, hello, "a", 0)
        replay = Resumed()
        assert await recv_until(w4, replay, 10)
        await w4.close()
        return codes, replay, follower

    codes, replay, follower = run(go(), 60)
    assert codes == {
        "wrong token": "bad_token",
        "unknown session": "unknown_session",
        "unknown id": "unknown_id",
        "after too large": "bad_offset",
        "missing id": "missing_field",
        "replayed finished": "already_finished",
    }, codes
    replay.assert_exact()
    assert replay.done["finish_reason"] == "cancelled"
    assert replay.done == follower.done


def test_ack_trims_and_resume_off(start_server):
    s = start_server("--null-tokens-per-s", "200")
    off = start_server("--resume", "false")

    async def go():
        ws, hello = await connect(s.ws_url)
        await ws.send(json.dumps(gen("k", 30)))
        r = Resumed()
        assert await recv_until(ws, r, 10)
        await ws.send(json.dumps({"type": "ack", "id": "k", "seq": 20}))
        await asyncio.sleep(0.2)
        await ws.close()
        w2, _ = await connect(s.ws_url)
        out = {}
        for after in (10, 25):
            await w2.send(json.dumps({"type": "resume", "session": hello["session"], "token": hello["token"],
                                      "id": "k", "after": after}))
            m = json.loads(await asyncio.wait_for(w2.recv(), 10))
            out[after] = m.get("code", m["type"])
            while m["type"] == "delta":
                m = json.loads(await asyncio.wait_for(w2.recv(), 10))
        await w2.close()
        w3, hello3 = await connect(off.ws_url)
        await w3.send(json.dumps({"type": "resume", "session": hello3["session"], "token": hello3["token"],
                                  "id": "k", "after": 0}))
        off_code = json.loads(await asyncio.wait_for(w3.recv(), 10))
        await w3.close()
        return out, off_code, hello3

    out, off_code, hello3 = run(go(), 30)
    assert out == {10: "bad_offset", 25: "delta"}, out
    assert off_code["code"] == "not_resumable", off_code
    assert hello3["resumable"] is False
