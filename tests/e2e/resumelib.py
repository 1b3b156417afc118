"""Helpers for the resume tests: a real `redis-server` on a free port (AOF on), and a client
that cuts its own TCP connection at random moments and resumes with Python `websockets`."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """One redis-server process (Debian's package; scripts/test.sh installs it), AOF with
    `appendfsync everysec`, restartable on the same port and data directory."""

    def __init__(self, data_dir: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not found: scripts/test.sh installs the Debian package")
        self.exe = exe
        self.port = free_port()
        self.dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", "", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Resumed:
    """Everything one logical stream received across its connections."""

    msgs: list[dict] = field(default_factory=list)
    cuts: int = 0
    resumes_on: list[str] = field(default_factory=list)

    @property
    def deltas(self) -> list[dict]:
        return [m for m in self.msgs if m["type"] == "delta"]

    @property
    def done(self) -> dict:
        assert self.msgs and self.msgs[-1]["type"] == "done", self.msgs[-3:]
        return self.msgs[-1]

    @property
    def text(self) -> str:
        return "".join(m["text"] for m in self.deltas)

    def assert_exact(self) -> None:
        """Zero lost, zero duplicated: seqs are 1..n with the done at n + 1."""
        seqs = [m["seq"] for m in self.msgs]
        assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate in {seqs}"


async def connect(url: str, mode: str = "token"):
    ws = await websockets.connect(f"{url}?stream_mode={mode}", max_queue=None, open_timeout=10)
    hello = json.loads(await ws.recv())
    assert hello["type"] == "session", hello
    return ws, hello


async def recv_until(ws, r: Resumed, seconds: float, stop_after: int | None = None) -> bool:
    """Receives for up to `seconds` (or `stop_after` messages); True once the done arrived."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return False
        try:
            raw = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            return False
        m = json.loads(raw)
        if m["type"] == "error":
            raise AssertionError(f"error while streaming: {m}")
        r.msgs.append(m)
        if m["type"] == "done":
            return True
        if stop_after is not None:
            stop_after -= 1
            if stop_after <= 0:
                return False


async def resume(url: str, hello: dict, id: str, after: int, mode: str = "token"):
    ws, _ = await connect(url, mode)
    await ws.send(json.dumps({"type": "resume", "session": hello["session"], "token": hello["token"],
                              "id": id, "after": after}))
    return ws


async def stream_with_cuts(urls: list[str], gen: dict, rng: random.Random, max_gap: float = 0.08,
                           max_pause: float = 0.1, max_cuts: int = 10_000) -> Resumed:
    """Starts `gen` on urls[0]; cuts the TCP connection (no close frame) after a random time,
    waits a random pause, resumes on the next url (round robin) after the last seq it saw;
    repeats until the done."""
    r = Resumed()
    mode = gen.get("stream_mode", "token")
    ws, hello = await connect(urls[0], mode)
    await ws.send(json.dumps(gen))
    # The first cut only after the first delta: before it the generate may not have arrived.
    while not r.msgs:
        if await recv_until(ws, r, 5.0, stop_after=1):
            await ws.close()
            return r
    i = 0
    while True:
        if await recv_until(ws, r, rng.uniform(0, max_gap)) and r.msgs[-1]["type"] == "done":
            await ws.close()
            return r
        if r.cuts >= max_cuts:
            done = await recv_until(ws, r, 60)
            assert done, "no done within 60 s"
            await ws.close()
            return r
        ws.transport.abort()
        r.cuts += 1
        await asyncio.sleep(rng.uniform(0, max_pause))
        i += 1
        url = urls[i % len(urls)]
        r.resumes_on.append(url)
        ws = await resume(url, hello, gen["id"], r.msgs[-1]["seq"], mode)


class CuttingProxy:
    """127.0.0.1:<port> → target; each connection is aborted (both sockets reset, no close
    frame) after uniform(lo, hi) seconds, or when `cut_all()` is called (lo = None)."""

    def __init__(self, target: tuple[str, int], lo: float | None = None, hi: float | None = None,
                 seed: int = 0):
        self.target, self.lo, self.hi = target, lo, hi
        self.rng = random.Random(seed)
        self.cuts = 0
        self.connections = 0
        self.live: set = set()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, cr, cw):
        self.connections += 1
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass

        tasks = [asyncio.create_task(pipe(cr, uw)), asyncio.create_task(pipe(ur, cw))]
        life = None if self.lo is None else self.rng.uniform(self.lo, self.hi)
        self.live.add((cw, uw))
        _, pending = await asyncio.wait(tasks, timeout=life, return_when=asyncio.FIRST_COMPLETED)
        self.live.discard((cw, uw))
        if pending:
            self.cuts += 1
        for t in pending:
            t.cancel()
        cw.transport.abort()
        uw.transport.abort()

    def cut_all(self) -> int:
        """Resets every open connection now; returns how many."""
        def cut():
            n = 0
            for cw, uw in list(self.live):
                cw.transport.abort()
                uw.transport.abort()
                n += 1
            self.cuts += n
            return n
        done = threading.Event()
        box = []
        self.loop.call_soon_threadsafe(lambda: (box.append(cut()), done.set()))
        assert done.wait(5)
        return box[0]

    def close(self) -> None:
        async def shutdown():
            self.server.close()
            for cw, uw in list(self.live):
                cw.transport.abort()
                uw.transport.abort()
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            self.loop.stop()
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(shutdown()))
        self.thread.join(5)
