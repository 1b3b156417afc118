#!/usr/bin/env bash
# Serving overhead: tokens received by clients per second vs tokens the engine generated per
# second over the same window, at concurrency 64 on a CPU synthetic model (default tiny, where
# the engine is fast and the serving path's share is largest).
# Usage: perf/serving_overhead.sh [model=synthetic:tiny] [connections=64] [seconds=10]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-synthetic:tiny}
C=${2:-64}
SECS=${3:-10}
PORT=${PORT:-18192}
cargo build --release --bins -q
target/release/seedance-server --model "$MODEL" --listen 127.0.0.1:$PORT --cores 1 --log warn 2>/tmp/ovh_srv.log &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 600); do grep -q "listening on" /tmp/ovh_srv.log && break; sleep 0.1; done
engine_tokens() { curl -s 127.0.0.1:$PORT/metrics | awk '/^seedance_engine_tokens_total/ {print $2}'; }
# Warm up, then measure the engine counter around a measured run without warm-up.
target/release/seedance-bench ws --addr 127.0.0.1:$PORT --connections "$C" --output-len 64 --input-len 16 --duration 2 --warmup 0 >/dev/null
E0=$(engine_tokens); T0=$(date +%s.%N)
OUT=$(target/release/seedance-bench ws --addr 127.0.0.1:$PORT --connections "$C" --output-len 64 --input-len 16 \
  --duration "$SECS" --warmup 0 --json)
E1=$(engine_tokens); T1=$(date +%s.%N)
echo "$OUT" | sed -n '1,2p'
CLIENT=$(echo "$OUT" | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["output_throughput"])')
python3 - "$E0" "$E1" "$T0" "$T1" "$CLIENT" <<'PY'
import sys
e0, e1, t0, t1, client = map(float, sys.argv[1:])
engine = (e1 - e0) / (t1 - t0)
print(f"engine generated {engine:.1f} tok/s, clients received {client:.1f} tok/s: {100 * client / engine:.1f}%")
PY
