#!/usr/bin/env bash
# Null-model delta messages/s over loopback: server pinned to CPU 0 (one shard + the engine
# thread), load generator pinned to CPU 1, 256-token streams, at 1, 64 and 1,000 connections.
# Usage: perf/null_throughput.sh [seconds=10] [stream_mode=token]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
MODE=${2:-token}
PORT=${PORT:-18190}
cargo build --release --bins -q
ulimit -n "$(ulimit -Hn)"
taskset -c 0 target/release/seedance-server --model null --null-tokens-per-s 0 \
  --listen 127.0.0.1:$PORT --cores 1 --log warn 2>/tmp/null_srv.log &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" /tmp/null_srv.log && break; sleep 0.1; done
for C in 1 64 1000; do
  target/release/seedance-bench ws --addr 127.0.0.1:$PORT --connections $C --output-len 256 \
    --stream-mode "$MODE" --duration "$SECS" --warmup 2 --cpu 1 | sed -n '1,3p;6,7p'
  echo
done
