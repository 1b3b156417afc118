#!/usr/bin/env python3
"""Regenerates docs/configuration.md from the keys! table in src/config.rs."""
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
s = (root / "src/config.rs").read_text()
block = s[s.index("keys! {\n") + 8 : s.index("}\n\n/// Sub-commands")]
rows, doc = [], []
for line in block.splitlines():
    line = line.strip()
    if line.startswith("///"):
        doc.append(line[3:].strip())
        continue
    m = re.match(r"(\w+): (.+?) = (.+), \"(SEEDANCE_\w+)\";", line)
    if m:
        name, _ty, default, env = m.groups()
        for a, b in ((".into()", ""), ("String::new()", '""'), ("Mode::All", "all"), ("Device::Auto", "auto")):
            default = default.replace(a, b)
        rows.append(f"| `{name}` | `--{name.replace('_', '-')}` | `{env}` | `{default}` | {' '.join(doc)} |")
        doc = []
out = """# Configuration

Every key is a YAML key (`--config FILE`), a flag and an environment variable. Precedence:
built-in defaults < file < `SEEDANCE_*` environment < flags. Unknown file keys are an error that
names the key; `--print-config` prints the resolved configuration as YAML and exits. The keys are
defined once, in the `keys!` table of `src/config.rs`, which generates the flags, the file schema
and the defaults; this page is generated from it by `scripts/gen_config_doc.py` (a unit test
checks that it lists every key).

| key | flag | environment | default | meaning |
|---|---|---|---|---|
""" + "\n".join(rows) + """

Also: `--config FILE` (`SEEDANCE_CONFIG`), `--print-config`.

Example `config.yaml`:

```yaml
listen: 0.0.0.0:8080
mode: all
cores: 4
model: "null"
null_tokens_per_s: 50
heartbeat_interval_ms: 15000
```

## TLS

`tls_listen` with `tls_cert` and `tls_key` (PEM; the chain leaf first; PKCS#8, PKCS#1 or SEC1
key) adds a TLS 1.3 listener beside `listen` (`wss://`, `https://`; ALPN `http/1.1`; no 0-RTT;
`tls12` to allow TLS 1.2). `tls_ticket_keys` names a file of session-ticket keys that every
instance behind one load balancer reads, so a client resumes on any of them:

```
# first line seals new tickets; every line opens them
6f0c3f1e...64 hex digits...
```

Make a key with `openssl rand -hex 32`. Rotate: put a new key first, keep the old one for a
ticket lifetime (6 h), then drop it; `kill -HUP <pid>` rereads the file, the certificate and its
key (a file that does not parse is logged and the old one stays; open connections keep theirs).

## Tenants

`tenants_file` turns authentication on for the WebSocket and the OpenAI routes alike:

```yaml
tenants:
  - id: acme                      # routing: subprotocol `acme.v1`; 1-64 token chars, no dot
    key_sha256:                   # SHA-256 (hex) of each accepted key: several, for rotation
      - 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
    models: [qwen2.5-0.5b]        # optional; absent: every served model
    requests_per_minute: 600      # each limit optional; absent: unlimited
    tokens_per_minute: 200000     # prompt + max_tokens charged up front, unused part refunded
    max_concurrent_streams: 32    # generations running at once
    max_connections: 64           # WebSocket connections open at once
```

`printf %s "$KEY" | sha256sum` gives a key's hash; keys themselves never appear in the file,
logs or metrics. A client presents its key as `Authorization: Bearer <key>`, a
`bearer.<key>` subprotocol (browsers), or `?api_key=`. Limits hold across the shards of one
instance (one shared atomic per check, per request — never per token); rates allow a burst of a
whole minute's allowance, then refill evenly. Over a limit: HTTP `429` with `Retry-After` and an
OpenAI error body (`code` `rate_limited`, `type` `rate_limit_error`), or a WebSocket `error` with
`code`, `limit` and `retry_after_ms` (docs/protocol.md); a request asking for more tokens than a
minute allows is `request_too_large` (no retry helps). Counters: `seedance_tenant_*` metrics
(this instance's). `max_connections` counts WebSocket connections only: an HTTP connection
behind a balancer is one of its pooled upstream connections, carrying whichever clients' requests
it is given, so it is no measure of a tenant; `max_concurrent_streams` bounds a tenant's HTTP
work (every OpenAI request holds a stream slot while it runs).

With a shared store (`redis_url` or `redis_cluster`) the limits hold across every instance
using it: each instance publishes its usage of each tenant every `tenant_sync_ms` (250 ms; one
Redis call per tenant, in one pipeline) and applies what the others admitted since to its own
buckets, and what they hold open to its concurrency caps. Within one instance a limit is exact;
across instances, requests admitted on different instances within the same interval do not see
each other, so a limit can be exceeded by what the other instances admit in that interval (at
most what was left of it, once per other instance). An instance that stops publishing (killed)
stops counting after 4 intervals (at least 1 s). An instance that starts (or restarts) learns
what the others hold open at its first sync, but not what they used of a per-minute rate before
it: in its first minute it may admit up to one more minute's allowance.
`tenant_sync_ms: 0` makes every instance enforce the limits alone.

`kill -HUP <pid>` (`systemctl reload`) rereads the file: keys added or removed take effect for
new connections and requests at once (rotate by listing the new key next to the old, moving
clients over, then dropping the old one); open connections and running requests keep the
tenant they were admitted under. A tenant whose limits are unchanged keeps its counters; one
whose limits changed starts new counters (what it holds open is released against the old). A
file that does not parse, or that lists no tenant (authentication cannot be turned off this
way), is logged and ignored: the tenants in force stay.

Start-up errors (bad key, bad value, port taken, model missing) print one line
`seedance-server: <reason>` and exit non-zero (2 for configuration, 1 for start-up).
"""
(root / "docs/configuration.md").write_text(out)
