#!/usr/bin/env bash
# Null-model delta messages/s over loopback: server pinned to CPU 0 (one shard + the engine
# thread), load generator pinned to CPU 1, 256-token streams, at 1, 64 and 1,000 connections.
# Usage: perf/null_throughput.sh [seconds=10] [stream_mode=token] [protocols="ws sse"]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
MODE=${2:-token}
PROTOCOLS=${3:-ws sse}
PORT=${PORT:-18190}
cargo build --release --bins -q
ulimit -n "$(ulimit -Hn)"
taskset -c 0 target/release/seedance-server --model null --null-tokens-per-s 0 \
  --max-running 1024 --listen 127.0.0.1:$PORT --cores 1 --log warn 2>/tmp/null_srv.log &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" /tmp/null_srv.log && break; sleep 0.1; done
for P in $PROTOCOLS; do
  for C in 1 64 1000; do
    target/release/seedance-bench "$P" --addr 127.0.0.1:$PORT --connections $C --output-len 256 \
      --model null --stream-mode "$MODE" --duration "$SECS" --warmup 2 --cpu 1 | sed -n '1,2p;4p;7p'
    echo
  done
done
