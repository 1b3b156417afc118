"""Scale-out: 3 seedance instances behind nginx on a 3-master Redis Cluster, with Prometheus
scraping them (the recipe of docs/deploy.md, generated here on loopback).

300 concurrent streams go through nginx: 30 through `seedance-client` processes, 270 through
Python `websockets` resuming by hand. Meanwhile the instances restart one by one (SIGTERM, the
rolling restart), 200 slots move between Redis masters (ASK and MOVED redirections under
load), one instance is killed with `kill -9`, and one Redis master is killed (its replica takes
over). Every stream must end with its complete text, with zero lost and zero duplicated deltas.
The figures (resume latency, takeover time, failover, store ops) are printed and written to
$SEEDANCE_SCALEOUT_REPORT (default target/scaleout-report.json)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import expected_text  # noqa: E402  (the null model's text)

from scaleoutlib import (  # noqa: E402
    CLIENT, REPO, Instance, Nginx, Prometheus, RedisCluster, http_get, metric_sum, missing_tools,
    percentile, wait_for,
)

STREAMS = 300
CLIENT_STREAMS = 30
TOKENS = 400
TOKENS_PER_S = 20
LEASE_MS = 1500

missing = missing_tools()
if missing:
    # The only reason to skip: a Debian package that could not be installed here.
    pytest.skip(f"SKIPPED the scale-out stage: Debian packages not installed: {' '.join(missing)}",
                allow_module_level=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("scaleout")


@pytest.fixture(scope="module")
def cluster(root):
    c = RedisCluster(root)
    yield c
    c.stop()


def test_store_contract_on_the_cluster(cluster):
    """tests/store.rs's contract, run on this cluster (keys of one generation in one slot, the
    session key in another, pipelines split per node)."""
    env = dict(os.environ, SEEDANCE_TEST_REDIS_CLUSTER=cluster.urls)
    r = subprocess.run(["cargo", "test", "--locked", "-q", "--test", "store", "redis_cluster"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "1 passed" in r.stdout, r.stdout


@dataclass
class Stream:
    id: str
    msgs: list[dict] = field(default_factory=list)
    reconnects: list[tuple[float, float]] = field(default_factory=list)  # (dropped, resumed)
    duplicates: int = 0
    gaps: int = 0

    @property
    def last_seq(self) -> int:
        return self.msgs[-1]["seq"] if self.msgs else 0

    def add(self, m: dict) -> bool:
        """Takes a delta or the done; True at the done."""
        seq = m["seq"]
        if seq <= self.last_seq:
            self.duplicates += 1
            return False
        if seq != self.last_seq + 1:
            self.gaps += 1
        self.msgs.append(m)
        return m["type"] == "done"

    @property
    def text(self) -> str:
        return "".join(m["text"] for m in self.msgs if m["type"] == "delta")


TRANSIENT = {"store_unavailable", "overloaded", "shutting_down", "moved"}


async def python_stream(url: str, s: Stream, rng: random.Random) -> Stream:
    """Generate, then on every drop reconnect (through nginx: any instance) and resume after the
    last seq received; a resume of a generation that never reached the store starts over."""
    gen = {"type": "generate", "id": s.id, "prompt": "Tell me a story", "max_tokens": TOKENS}
    session = None
    dropped: float | None = None
    attempt = 0
    while True:
        try:
            ws = await websockets.connect(url, max_queue=None, open_timeout=5, ping_interval=None)
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException):
            attempt += 1
            assert attempt < 100, f"{s.id}: cannot reconnect"
            dropped = dropped or time.monotonic()
            await asyncio.sleep(rng.uniform(0, min(1.0, 0.05 * 2 ** min(attempt, 5))))
            continue
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if session is None:
                session = (hello["session"], hello["token"])
                await ws.send(json.dumps(gen))
            else:
                await ws.send(json.dumps({"type": "resume", "session": session[0], "token": session[1],
                                          "id": s.id, "after": s.last_seq}))
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 30))
                t = m.get("type")
                if t in ("delta", "done") and m.get("id") == s.id:
                    if dropped is not None:
                        s.reconnects.append((dropped, time.monotonic()))
                        dropped, attempt = None, 0
                    if s.add(m):
                        await ws.close()
                        return s
                elif t == "error":
                    code = m.get("code")
                    if code in ("unknown_session", "unknown_id") and s.last_seq == 0:
                        session = None  # never logged: start over
                    elif code not in TRANSIENT:
                        raise AssertionError(f"{s.id}: {m}")
                    await ws.close()
                    break
        except (websockets.exceptions.ConnectionClosed, OSError, asyncio.TimeoutError):
            pass
        dropped = dropped or time.monotonic()
        attempt += 1
        assert attempt < 100, f"{s.id}: gave up"
        await asyncio.sleep(rng.uniform(0, 0.05))


async def client_stream(url: str, s: Stream) -> Stream:
    """seedance-client (reconnect with backoff, resume, gap check) as a separate process."""
    p = await asyncio.create_subprocess_exec(
        str(CLIENT), "chat", "Tell me a story", "--url", url, "--raw", "--json", "--id", s.id,
        "--max-tokens", str(TOKENS), "--retries", "40", "--backoff-ms", "50", "--backoff-max-ms", "1000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert p.stdout is not None
    async for line in p.stdout:
        m = json.loads(line)
        if m.get("type") in ("delta", "done") and m.get("id") == s.id:
            s.add(m)
    err = (await p.stderr.read()).decode() if p.stderr else ""
    rc = await p.wait()
    assert rc == 0, f"seedance-client {s.id} exited {rc}: {err[-2000:]}"
    s.reconnects.extend((0.0, 0.0) for _ in range(err.count("connection lost")))
    return s


def test_rolling_restart_kill9_and_redis_failover_lose_nothing(root, cluster):
    common = ("--model", "null", "--cores", "1", "--redis-cluster", cluster.urls,
              "--lease-ms", str(LEASE_MS), "--null-tokens-per-s", str(TOKENS_PER_S),
              "--shutdown-timeout-ms", "5000", "--heartbeat-interval-ms", "5000",
              "--log", os.environ.get("SEEDANCE_SCALEOUT_LOG", "info"))
    instances = [Instance(f"s{i}", root, *common) for i in range(3)]
    nginx = Nginx(root, [i.addr for i in instances])
    prom = Prometheus(root, [i.addr for i in instances])
    events: dict[str, float] = {}
    report: dict = {}
    try:
        for i in instances:
            status, body = http_get(f"http://{i.addr}/ready")
            assert status == 200 and json.loads(body)["store"]["kind"] == "redis-cluster", body
        # Prometheus scrapes every instance before the run starts.
        wait_for(lambda: prom.scalar("count(up == 1)") == 3, 30, "prometheus to scrape 3 instances")

        redis_before = cluster.used_memory()

        async def chaos():
            await asyncio.sleep(2.0)
            t0 = time.monotonic()
            for inst in instances:  # the rolling restart
                inst.sigterm()
                rc = await asyncio.to_thread(inst.wait, 30)
                assert rc == 0, f"{inst.name} exited {rc} after SIGTERM:\n{inst.log()[-3000:]}"
                await asyncio.to_thread(inst.start)
                await asyncio.sleep(1.0)
            events["rolling_restart_s"] = time.monotonic() - t0
            # Resharding under load: 200 slots move between masters (ASK, then MOVED).
            src, dst = cluster.masters()[:2]
            t1 = time.monotonic()
            await asyncio.to_thread(cluster.reshard, src, dst, 200)
            events["reshard_s"] = time.monotonic() - t1
            # kill -9 the instance holding the most streams now.
            def held(i):
                return metric_sum(i.metrics(), "seedance_active_connections")
            victim = max(instances, key=held)
            events["kill9_connections"] = held(victim)
            events["kill9"] = time.monotonic()
            victim.kill9()
            await asyncio.sleep(LEASE_MS / 1000 + 2.0)
            await asyncio.to_thread(victim.start)
            await asyncio.sleep(1.0)
            live = sum(metric_sum(i.metrics(), "seedance_active_connections") for i in instances)
            assert live >= STREAMS // 4, f"streams ended before the Redis failover ({live} left)"
            master = cluster.masters()[0]
            events["redis_kill"] = time.monotonic()
            cluster.kill(master)
            await asyncio.to_thread(cluster.wait_failed_over, master, 30)
            events["failover_s"] = time.monotonic() - events["redis_kill"]
            await asyncio.to_thread(cluster.start, master)  # comes back as a replica

        async def run():
            rng = random.Random(13)
            streams = [Stream(f"c{i}") for i in range(CLIENT_STREAMS)] + \
                      [Stream(f"p{i}") for i in range(STREAMS - CLIENT_STREAMS)]
            tasks = []
            for i, s in enumerate(streams):
                if i < CLIENT_STREAMS:
                    tasks.append(client_stream(nginx.ws_url, s))
                else:
                    tasks.append(python_stream(nginx.ws_url, s, random.Random(rng.random())))
                if i % 50 == 49:
                    await asyncio.sleep(0.1)
            t0 = time.monotonic()
            done = await asyncio.wait_for(asyncio.gather(chaos(), *tasks), 180)
            return done[1:], time.monotonic() - t0

        streams, took = asyncio.run(run())
        redis_after = cluster.used_memory()
        want = expected_text(TOKENS)
        bad = [s.id for s in streams if s.text.strip() != want or not s.msgs or s.msgs[-1]["type"] != "done"]
        lost = sum(s.gaps for s in streams)
        dup = sum(s.duplicates for s in streams)
        assert not bad, f"{len(bad)} streams incomplete or wrong, e.g. {bad[:5]}"
        assert lost == 0 and dup == 0, (lost, dup)
        for s in streams:
            assert [m["seq"] for m in s.msgs] == list(range(1, len(s.msgs) + 1)), s.id
            assert s.msgs[-1]["usage"]["completion_tokens"] == TOKENS, s.msgs[-1]
        reconnected = [s for s in streams if s.reconnects]
        # Every stream lived through at least one restart of the instance it was on.
        assert len(reconnected) >= STREAMS // 2, len(reconnected)

        lat = [b - a for s in streams for a, b in s.reconnects if a > 0]
        kill9 = events["kill9"]
        takeover = [b - kill9 for s in streams for a, b in s.reconnects
                    if a > 0 and kill9 <= a < kill9 + 1.0]
        drops = sorted(round(a - kill9, 1) for s in streams for a, _ in s.reconnects if a > 0)
        assert takeover, f"no stream resumed after the kill -9: {events}, drops at {drops}"

        # Prometheus scraped all of it: the TTFT histogram, the takeovers, the store outage.
        wait_for(lambda: prom.scalar("sum(seedance_time_to_first_token_seconds_count)"), 10,
                 "TTFT samples in prometheus")
        assert prom.query("histogram_quantile(0.99, sum by (le) "
                          "(rate(seedance_time_to_first_token_seconds_bucket[2m])))"), "no TTFT p99"
        health = prom.rule_health()
        assert len(health) == prom.rules and set(health.values()) == {"ok"}, health
        takeovers = prom.scalar("sum(max_over_time(seedance_takeovers_total[5m]))") or 0
        assert takeovers >= 1, takeovers
        retries = prom.scalar("sum(max_over_time(seedance_store_retries_total[5m]))") or 0
        assert retries >= 1, "the Redis failover left no trace in seedance_store_retries_total"
        window = f"{int(took) + 5}s"
        ops = prom.scalar(f"sum(increase(seedance_store_round_trip_seconds_count[{window}]))") or 0
        msgs = prom.scalar(f"sum(increase(seedance_store_appended_messages_total[{window}]))") or 0
        def server_q(q: float) -> float:
            v = prom.scalar(f"histogram_quantile({q}, sum by (le) "
                            f"(increase(seedance_resume_latency_seconds_bucket[{window}])))")
            return round((v or float("nan")) * 1000, 1)
        report = {
            "streams": len(streams), "seedance_client_streams": CLIENT_STREAMS,
            "tokens_per_stream": TOKENS, "tokens_per_s_per_stream": TOKENS_PER_S,
            "rolling_restarts": len(instances), "kill9": 1, "redis_master_kills": 1,
            "lost_deltas": lost, "duplicated_deltas": dup,
            "streams_reconnected": len(reconnected),
            "reconnects": sum(len(s.reconnects) for s in streams),
            "resume_latency_ms_p50": round(percentile(lat, 0.5) * 1000, 1),
            "resume_latency_ms_p99": round(percentile(lat, 0.99) * 1000, 1),
            "server_resume_latency_ms_p50": server_q(0.5),
            "server_resume_latency_ms_p99": server_q(0.99),
            # Streams whose generation the dead instance owned wait for its lease to run out;
            # those it only relayed (it followed a generation owned elsewhere) resume at once.
            "resumed_after_kill9": len(takeover),
            "resumed_after_kill9_under_500ms": sum(1 for t in takeover if t < 0.5),
            "resume_after_kill9_ms_p50": round(percentile(takeover, 0.5) * 1000, 1),
            "resume_after_kill9_ms_max": round(max(takeover) * 1000, 1),
            "kill9_connections": events["kill9_connections"],
            "lease_ms": LEASE_MS,
            "redis_failover_s": round(events["failover_s"], 2),
            "rolling_restart_s": round(events["rolling_restart_s"], 2),
            "slots_resharded": 200, "reshard_s": round(events["reshard_s"], 2),
            "store_retries": retries, "takeovers": takeovers,
            "store_calls_per_s": round(ops / took, 1),
            "store_messages_per_s": round(msgs / took, 1),
            "redis_bytes_per_logged_message": round((redis_after - redis_before) / msgs) if msgs else None,
            "run_s": round(took, 1),
        }
    finally:
        for i in instances:
            i.stop()
        nginx.stop()
        prom.stop()
    out = Path(os.environ.get("SEEDANCE_SCALEOUT_REPORT", REPO / "target" / "scaleout-report.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nscale-out report:", json.dumps(report, indent=2))
