#!/usr/bin/env bash
# Plain vs zstd vs permessage-deflate WebSocket streams side by side (issue 10): null model, token
# mode, server pinned to CPU 0 (one shard + engine), load generator pinned to CPU 1; rounds
# alternate the three so drift on a shared machine hits all. Then server RSS per idle connection
# with each.
# Usage: perf/flow_compare.sh [connections=1000] [seconds=8] [rounds=3] [idle=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-1000}
SECS=${2:-8}
ROUNDS=${3:-3}
IDLE=${4:-10000}
PORT=${PORT:-18192}
cargo build --release --bins -q
ulimit -n "$(ulimit -Hn)"
start() {
  taskset -c 0 target/release/seedance-server --model null --max-running 1024 \
    --listen 127.0.0.1:$PORT --cores 1 --log warn "$@" 2>/tmp/flow_srv.log &
  SRV=$!
  for _ in $(seq 50); do grep -q "listening on" /tmp/flow_srv.log && break; sleep 0.1; done
}
trap 'kill $SRV 2>/dev/null || true' EXIT
start
for R in $(seq "$ROUNDS"); do
  for Z in none zstd deflate; do
    echo "round $R compression $Z"
    target/release/seedance-bench ws --addr 127.0.0.1:$PORT --connections "$C" --output-len 256 \
      --stream-mode token --compression $Z --duration "$SECS" --warmup 2 --cpu 1 | sed -n '2,3p'
  done
done
curl -s 127.0.0.1:$PORT/metrics | grep -E '^seedance_compression_(ratio|level|contexts)'
kill $SRV; wait $SRV 2>/dev/null || true
rss() { awk '/VmRSS/ {print $2}' /proc/$SRV/status; }
open_conns() { curl -s 127.0.0.1:$PORT/metrics | awk '/^seedance_active_connections/ {s+=$2} END {print s-1}'; }
for Z in none zstd deflate; do
  start
  target/release/seedance-bench idle --addr 127.0.0.1:$PORT --connections 100 --hold 0.5 --cpu 1 --compression $Z >/dev/null
  sleep 0.5
  BEFORE=$(rss)
  target/release/seedance-bench idle --addr 127.0.0.1:$PORT --connections "$IDLE" --hold 20 --cpu 1 --compression $Z &
  BENCH=$!
  for _ in $(seq 300); do [ "$(open_conns)" -ge "$IDLE" ] && break; sleep 0.1; done
  sleep 1
  AFTER=$(rss)
  kill $BENCH 2>/dev/null || true; wait $BENCH 2>/dev/null || true
  awk -v a="$AFTER" -v b="$BEFORE" -v n="$IDLE" -v z="$Z" \
    'BEGIN { printf "idle connections, compression %s: %.2f KiB each (RSS %d -> %d KiB)\n", z, (a-b)/n, b, a }'
  kill $SRV; wait $SRV 2>/dev/null || true
done
