#!/usr/bin/env python3
"""Result lines for the llama.cpp comparisons (perf/llamacpp_compare.sh, perf/gguf_compare.sh).

    llama-bench ... -o json | perf/bench_parse.py llama LABEL
        -> "meta commit <build_commit> <model_type>" and "LABEL llama pp|tg <t/s>" per sample
           (pp: 512 prompt tokens from an empty context; tg: 128 generated, at any depth)
    seedance-server generate ... 2>&1 >/dev/null | perf/bench_parse.py seedance LABEL
        -> "LABEL seedance pp <prompt/prefill>" and "LABEL seedance tg <(gen-1)/decode>"
           from its GenerateStats log line (a 512-token prompt and 128 tokens are asserted)
    llama-batched-bench ... --output-format jsonl | perf/bench_parse.py batched LABEL
        -> "LABEL llama b<B> <speed_tg>" per line (all B sequences' tokens / decode time)
    seedance-server generate --parallel B ... 2>&1 >/dev/null | perf/bench_parse.py parallel LABEL
        -> "LABEL seedance b<B> <B*(128-1)/decode>" from its ParallelStats log line
"""

import json
import re
import sys


def llama(label: str) -> None:
    for x in json.load(sys.stdin):
        print("meta", "commit", x["build_commit"], x.get("model_type", "").replace(" ", "_"))
        if x["n_prompt"] == 512 and x["n_gen"] == 0 and x.get("n_depth", 0) == 0:
            kind = "pp"
        elif x["n_prompt"] == 0 and x["n_gen"] == 128:
            kind = "tg"
        else:
            sys.exit(f"bench_parse.py: unexpected llama-bench test {x['n_prompt']}/{x['n_gen']}")
        for v in x["samples_ts"]:
            print(label, "llama", kind, v)


def dur(line: str, name: str) -> float:
    """A Rust Debug-printed Duration field of `line`, in seconds."""
    v, u = re.search(name + r": ([0-9.]+)(ns|µs|us|ms|s)\b", line).groups()
    return float(v) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[u]


def batched(label: str) -> None:
    for l in sys.stdin:
        if l.startswith("{"):
            x = json.loads(l)
            print(label, "llama", f"b{x['pl']}", x["speed_tg"])


def parallel(label: str) -> None:
    line = next((l for l in sys.stdin if "ParallelStats" in l), "")
    if not line:
        sys.exit("bench_parse.py: no ParallelStats line from seedance-server generate --parallel")
    b = int(re.search(r"sequences: (\d+)", line).group(1))
    g = int(re.search(r"generated_tokens: (\d+)", line).group(1))
    # The first token of each sequence comes from its prefill; the decode steps make the rest.
    print(label, "seedance", f"b{b}", (g - b) / dur(line, "decode"))


def seedance(label: str) -> None:
    line = next((l for l in sys.stdin if "GenerateStats" in l), "")
    if not line:
        sys.exit("bench_parse.py: no GenerateStats line from seedance-server generate")

    p = int(re.search(r"prompt_tokens: (\d+)", line).group(1))
    g = int(re.search(r"generated_tokens: (\d+)", line).group(1))
    assert p == 512 and g == 128, (p, g)
    print(label, "seedance", "pp", p / dur(line, "prefill"))
    print(label, "seedance", "tg", (g - 1) / dur(line, "decode"))


if __name__ == "__main__":
    {"llama": llama, "seedance": seedance, "batched": batched, "parallel": parallel}[sys.argv[1]](
        sys.argv[2])
