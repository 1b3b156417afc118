"""Shared fixtures for the end-to-end tests: start `seedance-server --model null` on
127.0.0.1:0, read the real address from its `listening on ADDR` line, stop it at teardown.

The binary comes from $SEEDANCE_BIN (default: target/debug/seedance-server, relative to the
repository root). Every server a test starts is killed at teardown even when the test fails.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SEEDANCE_BIN", "target/debug/seedance-server"))
if not BIN.is_absolute():
    BIN = REPO / BIN

# The text the null model streams, one whitespace-separated word per token
# (mirrors NULL_TEXT in src/engine/null.rs; test_full_text_then_stop checks the two agree).
NULL_TEXT = (
    "The river town woke slowly that autumn morning, and the baker was the "
    "first to open his shutters. Steam rose from the loaves he set on the sill, and the smell drifted "
    "down the lane toward the harbour where the fishing boats were coming in. A boy ran along the quay "
    "with a basket of rope, calling to his father, who waved from the deck of a blue boat with a patched "
    "sail. Up the hill, the schoolteacher unlocked the door of the single classroom and opened every "
    "window, because the stove had smoked all night and the room still smelled of ash. She wrote the "
    "date on the board in careful letters, then a question for the older children: why does a river "
    "always find the sea? By nine the market square was full. Farmers had brought apples, late plums, "
    "cheese wrapped in cloth, and jars of honey that glowed in the low sun. An old woman sold knitted "
    "hats from a folding table and told anyone who stopped that winter would come early this year. "
    "Nobody argued with her; she had been right for forty years. At noon the church bell rang twice, "
    "once for the hour and once, people said, for the sailors who had not come home. The fishermen "
    "took off their caps when they heard it. In the afternoon clouds gathered over the western hills, "
    "grey at first and then nearly purple, and the wind turned cold. Shopkeepers carried their "
    "baskets inside. The schoolteacher closed the windows one by one and told the children to hurry "
    "home before the rain. The boy with the rope basket helped his father tie the blue boat to the "
    "iron rings of the quay, doubling every knot. When the first drops fell, the whole town seemed to "
    "pause and listen. Then the rain came properly, drumming on roofs and rushing down the gutters "
    "into the river, which carried it patiently, as it always had, all the way to the sea."
)
WORDS = NULL_TEXT.split()
MODEL = "null"


def expected_text(n: int) -> str:
    """What a null-model generation with max_tokens n streams, concatenated: the text's words,
    starting over after the last one."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


_raise_nofile()


class Server:
    """One seedance-server process."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None, cores: int = 2, model: str = "null"):
        if not BIN.exists():
            pytest.fail(f"server binary {BIN} not found: run `cargo build` or set SEEDANCE_BIN")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.args = [str(BIN), "--model", model, "--listen", "127.0.0.1:0", "--cores", str(cores), *extra]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        self.stderr_lines: list[str] = []
        self._termed = False
        self._ready = threading.Event()
        self.addr: str | None = None
        self.tls_addr: str | None = None
        self._tls_ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._ready.wait(30) or self.addr is None:
            self.kill()
            pytest.fail(f"server did not print `listening on`; stderr:\n{self.stderr}")
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_lines.append(line)
            m = re.match(r"^listening on (\S+)$", line)
            if m and self.addr is None:
                self.addr = m.group(1)
                self._ready.set()
            m = re.match(r"^tls listening on (\S+)$", line)
            if m and self.tls_addr is None:
                self.tls_addr = m.group(1)
                self._tls_ready.set()
        self._ready.set()
        self._tls_ready.set()

    @property
    def tls_port(self) -> int:
        """Port of the TLS listener (`--tls-listen`), printed right after the plain one."""
        self._tls_ready.wait(10)
        assert self.tls_addr is not None, f"no `tls listening on` line:\n{self.stderr}"
        return int(self.tls_addr.rsplit(":", 1)[1])

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.addr}/v1/chat"

    def http(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        c = self.http()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def metrics(self) -> str:
        status, _, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def sigterm(self) -> None:
        """Sends SIGTERM once (a second signal makes the server exit at once with 130)."""
        if not self._termed and self.proc.poll() is None:
            self._termed = True
            self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM (unless already sent), then wait for the exit status."""
        self.sigterm()
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture(scope="session")
def server():
    """A full-speed null model server shared by the tests that do not stop it."""
    s = Server()
    yield s
    s.kill()


@pytest.fixture(scope="session")
def slow_server():
    """A paced null model (100 tokens/s per sequence): generations last long enough to cancel,
    interleave and exercise the chunk latency cap."""
    s = Server("--null-tokens-per-s", "100")
    yield s
    s.kill()


@pytest.fixture
def start_server():
    """Factory for servers a test owns (stopped or killed at teardown)."""
    started: list[Server] = []

    def start(*extra: str, **kw) -> Server:
        s = Server(*extra, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def run(coro, timeout: float = 60):
    """Runs a coroutine to completion with a hard time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def metric_value(text: str, name: str) -> float:
    """The value of one sample line `name value` (name includes labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found in:\n{text}")


def loads(msg) -> dict:
    assert isinstance(msg, str), f"expected a text frame, got {msg!r}"
    return json.loads(msg)
