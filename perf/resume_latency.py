#!/usr/bin/env python3
"""Resume latency and takeover time (issue 9 "Must show"), measured from a real client (Python
`websockets`) against release servers and a real redis-server on loopback.

- Resume latency: a stream is live (null model, 50 tokens/s), the client aborts its TCP
  connection (no close frame) and at once opens a new WebSocket and sends `resume`; the time
  from starting the reconnect to the first replayed delta. Three cases: the embedded store on
  the same instance, Redis on the same instance, Redis on the other instance. Background
  streams (`--background 64`: 32 on each of the three instances) keep them busy meanwhile.
- Takeover: a greedy generation on synthetic:tiny; the owner gets `kill -9`; the client resumes
  on the other instance at once; the time from the kill to the first delta past the last one
  the client had (lease expiry + claim + re-prefill + first decode step), for the lease given.

Usage: python3 perf/resume_latency.py [--samples 200] [--takeovers 5] [--lease-ms 1000]
Needs: cargo build --release; redis-server; pip install websockets (tests/e2e/requirements.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.chdir(ROOT)
os.environ.setdefault("SEEDANCE_BIN", "target/release/seedance-server")
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from conftest import Server  # noqa: E402
from resumelib import Redis, Resumed, connect, recv_until, resume  # noqa: E402


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def background(url: str, n: int, stop: asyncio.Event) -> None:
    async def one(i: int) -> None:
        while not stop.is_set():
            ws, _ = await connect(url)
            await ws.send(json.dumps({"type": "generate", "id": f"bg{i}", "max_tokens": 200,
                                      "ignore_eos": True, "messages": [{"role": "user", "content": "hi"}]}))
            r = Resumed()
            while not stop.is_set() and not await recv_until(ws, r, 0.5):
                pass
            await ws.close()
    await asyncio.gather(*(one(i) for i in range(n)))


async def resume_samples(start_url: str, resume_url: str, samples: int) -> list[float]:
    out = []
    for k in range(samples):
        ws, hello = await connect(start_url)
        await ws.send(json.dumps({"type": "generate", "id": f"r{k}", "max_tokens": 400, "ignore_eos": True,
                                  "messages": [{"role": "user", "content": "hello"}]}))
        r = Resumed()
        await recv_until(ws, r, 10, stop_after=5)
        ws.transport.abort()
        # Let the log catch up with what this client saw (the owner journals per dispatch);
        # otherwise the resume measures the wait for writes in flight, not the resume path.
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        ws2 = await resume(resume_url, hello, f"r{k}", r.msgs[-1]["seq"])
        await recv_until(ws2, r, 10, stop_after=1)
        out.append(time.perf_counter() - t0)
        assert r.msgs[-1]["type"] == "delta", r.msgs[-1]
        await ws2.send(json.dumps({"type": "cancel", "id": f"r{k}"}))
        await ws2.close()
    return out


async def takeover_once(tmp: Path, redis: Redis, lease_ms: int) -> float:
    common = ("--redis-url", redis.url, "--lease-ms", str(lease_ms), "--null-tokens-per-s", "0")
    a = Server(*common, "--instance-id", "A", model="synthetic:tiny")
    b = Server(*common, "--instance-id", "B", model="synthetic:tiny")
    try:
        ws, hello = await connect(a.ws_url)
        await ws.send(json.dumps({"type": "generate", "id": "t", "max_tokens": 400, "temperature": 0,
                                  "ignore_eos": True, "messages": [{"role": "user", "content": "tell me"}]}))
        r = Resumed()
        await recv_until(ws, r, 10, stop_after=20)
        a.proc.kill()
        t0 = time.perf_counter()
        a.proc.wait(10)
        ws2 = await resume(b.ws_url, hello, "t", r.msgs[-1]["seq"])
        # Deltas the dead owner had logged replay at once; then nothing comes until B claims
        # the generation and decodes again. The first delta after that stall is the takeover.
        arrivals = []
        while True:
            before = len(r.msgs)
            finished = await recv_until(ws2, r, 30, stop_after=1)
            assert len(r.msgs) > before, "no delta within 30 s"
            arrivals.append(time.perf_counter())
            if finished:
                break
        r.assert_exact()
        gaps = [arrivals[0] - t0] + [y - x for x, y in zip(arrivals, arrivals[1:])]
        took = arrivals[max(range(len(gaps)), key=gaps.__getitem__)] - t0
        await ws2.close()
        return took
    finally:
        a.kill()
        b.kill()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--takeovers", type=int, default=5)
    ap.add_argument("--lease-ms", type=int, default=1000)
    ap.add_argument("--background", type=int, default=64)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(Path(tmp))
        try:
            pace = ("--null-tokens-per-s", "50")
            emb = Server(*pace, "--instance-id", "E")
            a = Server(*pace, "--redis-url", redis.url, "--instance-id", "A")
            b = Server(*pace, "--redis-url", redis.url, "--instance-id", "B")
            stop = asyncio.Event()
            bg = [asyncio.create_task(background(u, args.background // 2, stop))
                  for u in (a.ws_url, b.ws_url)]
            bg.append(asyncio.create_task(background(emb.ws_url, args.background // 2, stop)))
            await asyncio.sleep(1)
            rows = []
            for label, s, r in (("embedded, same instance", emb.ws_url, emb.ws_url),
                                ("Redis, same instance", a.ws_url, a.ws_url),
                                ("Redis, other instance", a.ws_url, b.ws_url)):
                xs = await resume_samples(s, r, args.samples)
                rows.append((label, xs))
                print(f"resume latency, {label}: p50 {statistics.median(xs) * 1e3:.2f} ms, "
                      f"p99 {pct(xs, 99) * 1e3:.2f} ms  ({len(xs)} resumes)", flush=True)
            stop.set()
            await asyncio.gather(*bg, return_exceptions=True)
            for s in (emb, a, b):
                s.kill()
            takes = [await takeover_once(Path(tmp), redis, args.lease_ms) for _ in range(args.takeovers)]
            print(f"takeover after kill -9 (lease {args.lease_ms} ms, synthetic:tiny): "
                  f"median {statistics.median(takes):.3f} s, max {max(takes):.3f} s "
                  f"({', '.join(f'{t:.3f}' for t in takes)})")
        finally:
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
