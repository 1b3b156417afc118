#!/usr/bin/env python3
"""Deltas/s through nginx (docs/deploy.md's tested config) against the same server direct, at
1,000 WebSocket connections (and 64), null model, in alternating rounds; medians printed side by
side. The server gets CPU 0 (`--cores 1`); nginx (one worker) and seedance-bench share CPU 1 —
on a 2-vCPU machine the proxied rounds therefore measure nginx and the load generator competing
for one core, which is what a client on the balancer's host would see.

    python3 perf/nginx_compare.py            (env: ROUNDS=3 DURATION=5 CONNS="64 1000")
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scaleout"))
os.environ.setdefault("SEEDANCE_BIN", str(REPO / "target" / "release" / "seedance-server"))
import scaleoutlib  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "5")
CONNS = [int(c) for c in os.environ.get("CONNS", "64 1000").split()]
BENCH = REPO / "target" / "release" / "seedance-bench"


def bench(addr: str, conns: int) -> tuple[float, int]:
    out = subprocess.run(
        ["taskset", "-c", "1", str(BENCH), "ws", "--addr", addr, "--connections", str(conns),
         "--output-len", "256", "--duration", DURATION, "--warmup", "1"],
        capture_output=True, text=True, timeout=120).stdout
    d = re.search(r"deltas/s ([0-9.]+)", out)
    e = re.search(r"errors (\d+)", out)
    return (float(d.group(1)) if d else 0.0), (int(e.group(1)) if e else -1)


def main() -> None:
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "seedance-server",
                    "--bin", "seedance-bench"], cwd=REPO, check=True)
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    print(f"cpu: {cpu.group(1) if cpu else '?'} ({os.cpu_count()} vCPUs); nginx "
          f"{subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}")
    root = Path(tempfile.mkdtemp(prefix="nginx_compare."))
    port = scaleoutlib.free_port()
    server = subprocess.Popen(
        ["taskset", "-c", "0", os.environ["SEEDANCE_BIN"], "--model", "null", "--cores", "1",
         "--listen", f"127.0.0.1:{port}", "--resume", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx = None
    try:
        def up() -> bool:
            if server.poll() is not None:
                raise SystemExit("the server exited")
            try:
                return scaleoutlib.http_get(f"http://127.0.0.1:{port}/ready", 1)[0] == 200
            except OSError:
                return False
        scaleoutlib.wait_for(up, 20, "the server")
        nginx = scaleoutlib.Nginx(root, [f"127.0.0.1:{port}"], cpu=1)
        res: dict[tuple[str, int], list[float]] = {}
        for conns in CONNS:
            for r in range(ROUNDS):
                for via, addr in (("direct", f"127.0.0.1:{port}"), ("nginx", f"127.0.0.1:{nginx.port}")):
                    d, e = bench(addr, conns)
                    print(f"round {r + 1}  {via:6}  connections {conns}  deltas/s {d:.0f}  errors {e}")
                    res.setdefault((via, conns), []).append(d)
                    time.sleep(0.5)
        print("\n| connections | direct deltas/s | through nginx deltas/s | ratio |\n|---|---|---|---|")
        for conns in CONNS:
            a = statistics.median(res[("direct", conns)])
            b = statistics.median(res[("nginx", conns)])
            print(f"| {conns} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
    finally:
        if nginx:
            nginx.stop()
        server.kill()


if __name__ == "__main__":
    main()
