"""Real processes for the scale-out stage: a Redis Cluster (3 masters, 3 replicas), seedance
instances on fixed ports (restartable), nginx in front of them and Prometheus scraping them.
Everything binds 127.0.0.1 on free ports and lives in one temporary directory."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SEEDANCE_BIN", "target/debug/seedance-server"))
if not BIN.is_absolute():
    BIN = REPO / BIN
CLIENT = BIN.with_name("seedance-client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (+10000) is free too."""
    rng = random.Random()
    while True:
        p = rng.randrange(20000, 55535)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def missing_tools() -> list[str]:
    """The Debian packages this stage needs that are not installed."""
    need = {"redis-server": "redis-server", "redis-cli": "redis-tools", "nginx": "nginx",
            "prometheus": "prometheus"}
    return [pkg for exe, pkg in need.items() if shutil.which(exe) is None]


class RedisCluster:
    """`redis-server --cluster-enabled yes` × 6 (AOF on, `cluster-node-timeout` 1 s), joined by
    `redis-cli --cluster create --cluster-replicas 1`: 3 masters, each with a replica."""

    def __init__(self, root: Path, nodes: int = 6, node_timeout_ms: int = 1000):
        self.root = root
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_cluster_port() for _ in range(nodes)]
        self.procs: dict[int, subprocess.Popen] = {}
        for p in self.ports:
            self.start(p)
        out = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait_ok()

    @property
    def urls(self) -> str:
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)

    def start(self, port: int) -> None:
        d = self.root / f"redis-{port}"
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", str(d)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self.cli(port, "PING") == "PONG", 10, f"redis {port} to answer")

    def cli(self, port: int, *args: str) -> str:
        try:
            out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                                 text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def alive(self) -> list[int]:
        return [p for p, pr in self.procs.items() if pr.poll() is None]

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots, as a live node sees the cluster."""
        for p in self.alive():
            nodes = self.cli(p, "CLUSTER", "NODES")
            if not nodes:
                continue
            out = []
            for line in nodes.splitlines():
                f = line.split()
                if "master" in f[2] and "fail" not in f[2] and len(f) > 8:
                    out.append(int(f[1].split("@")[0].rsplit(":", 1)[1]))
            return out
        return []

    def node_id(self, port: int) -> str:
        return self.cli(port, "CLUSTER", "MYID")

    def reshard(self, src: int, dst: int, slots: int) -> None:
        """Moves `slots` slots from master `src` to master `dst` while the cluster serves
        (clients see ASK during each slot's migration, MOVED after)."""
        out = subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from", self.node_id(src),
             "--cluster-to", self.node_id(dst), "--cluster-slots", str(slots), "--cluster-yes",
             "--cluster-pipeline", "100"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def used_memory(self) -> int:
        """Bytes the masters hold (INFO memory), replicas not counted."""
        total = 0
        for p in self.masters():
            m = re.search(r"^used_memory:(\d+)", self.cli(p, "INFO", "memory"), re.M)
            total += int(m.group(1)) if m else 0
        return total

    def wait_ok(self, timeout: float = 30) -> None:
        def ok():
            return all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO") for p in self.alive()) \
                and len(self.masters()) >= 3
        wait_for(ok, timeout, "cluster_state:ok on every node", interval=0.1)

    def wait_failed_over(self, dead: int, timeout: float) -> None:
        """Until a replica replaced the dead master and every live node says the cluster is ok."""
        def ok():
            m = self.masters()
            return dead not in m and len(m) >= 3 and \
                all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO") for p in self.alive())
        wait_for(ok, timeout, f"a replica to replace master {dead}", interval=0.05)

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(10)

    def stop(self) -> None:
        for pr in self.procs.values():
            if pr.poll() is None:
                pr.kill()
                pr.wait(10)


class Instance:
    """One seedance-server on a fixed port, so that it can be restarted behind nginx."""

    def __init__(self, name: str, root: Path, *args: str):
        self.name = name
        self.port = free_port()
        self.args = [str(BIN), "--listen", f"127.0.0.1:{self.port}", "--instance-id", name, *args]
        self.log_dir = root
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"{self.name}.{self.starts}.log", "wb")
        ready = threading.Event()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        proc = self.proc

        def pump():
            assert proc.stderr is not None
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if line.startswith(b"listening on "):
                    ready.set()
            ready.set()
            log.close()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(30) or proc.poll() is not None:
            raise AssertionError(f"{self.name} did not start: see {self.log_dir}/{self.name}.{self.starts}.log")

    def log(self) -> str:
        return (self.log_dir / f"{self.name}.{self.starts}.log").read_text(errors="replace")

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def metrics(self) -> str:
        status, body = http_get(f"http://{self.addr}/metrics")
        assert status == 200
        return body.decode()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


NGINX_CONF = """
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
{body}
    server {{
        listen 127.0.0.1:{port};
{location}
    }}
}}
"""


DEPLOY_MD = REPO / "docs" / "deploy.md"


def deploy_block(name: str) -> str:
    """The fenced block docs/deploy.md marks `<!-- deploy:NAME (tested) -->`."""
    text = DEPLOY_MD.read_text()
    m = re.search(rf"<!-- deploy:{re.escape(name)} \(tested\) -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"docs/deploy.md has no tested block {name!r}"
    return m.group(1)


def nginx_http_block(upstreams: list[str]) -> tuple[str, str]:
    """The `http` and `location` blocks of docs/deploy.md, with its example upstream servers
    replaced by `upstreams` (each keeps the parameters the doc gives them)."""
    lines = deploy_block("nginx-http").splitlines()
    servers = [i for i, l in enumerate(lines) if re.match(r"^\s*server \S+.*;$", l)]
    assert servers, "no upstream servers in the nginx-http block"
    indent, _, rest = re.match(r"^(\s*)server (\S+)(.*)$", lines[servers[0]]).groups()
    ours = [f"{indent}server {a}{rest}" for a in upstreams]
    lines = lines[:servers[0]] + ours + [l for i, l in enumerate(lines) if i > servers[0] and i not in servers]
    return "\n".join(lines), deploy_block("nginx-location")


class Nginx:
    def __init__(self, root: Path, upstreams: list[str], cpu: int | None = None):
        self.port = free_port()
        body, location = nginx_http_block(upstreams)
        user = "user root;" if os.geteuid() == 0 else ""
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, dir=root, body=body, port=self.port,
                                          location=location))
        self.root = root
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.proc = subprocess.Popen([*pin, "nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False
        wait_for(up, 10, "nginx to listen")

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/chat"

    def stop(self) -> None:
        terminate(self.proc)


def prometheus_config(targets: list[str]) -> str:
    """docs/deploy.md's prometheus.yml, scraping `targets` every second (rules evaluated every
    second too) so that a run of a minute has data."""
    conf = deploy_block("prometheus")
    conf, n = re.subn(r"targets: \[.*\]", "targets: [" + ", ".join(f"'{t}'" for t in targets) + "]", conf)
    assert n == 1, conf
    conf, n = re.subn(r"scrape_interval: \S+",
                      "scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s", conf)
    assert n == 1, conf
    return conf


class Prometheus:
    def __init__(self, root: Path, targets: list[str]):
        self.port = free_port()
        conf = root / "prometheus.yml"
        conf.write_text(prometheus_config(targets))
        rules = root / "seedance-alerts.yml"
        rules.write_text(deploy_block("alerts"))
        check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.rules = sum(1 for l in rules.read_text().splitlines() if l.strip().startswith("- alert:"))
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(root / "prometheus.log", "wb"),
            start_new_session=True)
        wait_for(lambda: self._ready(), 30, "prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("prometheus exited (see prometheus.log)")
        try:
            return http_get(f"http://127.0.0.1:{self.port}/-/ready", 1)[0] == 200
        except OSError:
            return False

    def query(self, q: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        status, body = http_get(url)
        assert status == 200, body
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def rule_health(self) -> dict[str, str]:
        """Each loaded rule's name and health ("ok" once it evaluated without error)."""
        status, body = http_get(f"http://127.0.0.1:{self.port}/api/v1/rules")
        assert status == 200, body
        groups = json.loads(body)["data"]["groups"]
        return {r["name"]: r["health"] for g in groups for r in g["rules"]}

    def scalar(self, q: str) -> float | None:
        r = self.query(q)
        return float(r[0]["value"][1]) if r else None

    def stop(self) -> None:
        terminate(self.proc)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            total += float(m.group(2))
    return total
