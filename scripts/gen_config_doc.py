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

Start-up errors (bad key, bad value, port taken, model missing) print one line
`seedance-server: <reason>` and exit non-zero (2 for configuration, 1 for start-up).
"""
(root / "docs/configuration.md").write_text(out)
