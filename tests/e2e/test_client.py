"""seedance-client (SPEC 7) against a server behind a fault-injecting TCP proxy that cuts every
connection after a random lifetime (both sockets reset, no close frame): every run must print
the complete text, once."""

from __future__ import annotations

import subprocess

import pytest

from conftest import BIN, expected_text
from resumelib import CuttingProxy

CLIENT = BIN.parent / "seedance-client"


@pytest.mark.parametrize("mode", ["token", "chunk"])
def test_client_survives_a_cutting_proxy(start_server, mode):
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} not built: run `cargo build`")
    s = start_server("--null-tokens-per-s", "100")
    proxy = CuttingProxy((s.host, s.port), 0.15, 0.5, seed=7 if mode == "token" else 8)
    n = 250
    try:
        procs = [
            subprocess.Popen(
                [str(CLIENT), "chat", "--url", f"ws://127.0.0.1:{proxy.port}/v1/chat", "--raw",
                 "--max-tokens", str(n), "--stream-mode", mode, "--backoff-ms", "20",
                 "--backoff-max-ms", "200", "--retries", "50", f"story {i}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(4)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        proxy.close()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out == expected_text(n) + "\n", (out[:300], err[-2000:])
    resumed = sum(err.count("resuming after seq") for _, err in outs)
    assert proxy.cuts >= 8 and resumed >= 8, (proxy.cuts, resumed)


def test_client_reports_a_refusal(start_server):
    s = start_server()
    r = subprocess.run([str(CLIENT), "chat", "--url", f"ws://{s.addr}/v1/chat", "--max-tokens", "0", "hi"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "max_tokens" in r.stderr, r.stderr
