#!/usr/bin/env bash
# Responses SSE (POST /v1/responses, stream: true, stored: every delta is logged) next to
# completions SSE (POST /v1/completions, stream: true, not logged) on the null model, at 64 and
# 1,000 connections: ROUNDS alternating rounds, medians of deltas/s printed side by side.
# The server gets CPU 0 (one shard; the engine and state threads share the host), the load
# generator CPU 1.  Usage: bash perf/responses_compare.sh   (env: ROUNDS=3 DURATION=5)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
PORT=${PORT:-18431}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet --bin seedance-server --bin seedance-bench
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')  ($(nproc) vCPUs)"
taskset -c 0 target/release/seedance-server --model null --cores 1 --listen "127.0.0.1:$PORT" \
  >/dev/null 2>/tmp/responses_compare.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.1; done
declare -A RES
for conns in 64 1000; do
  for r in $(seq "$ROUNDS"); do
    for proto in sse responses; do
      out=$(target/release/seedance-bench "$proto" --addr "127.0.0.1:$PORT" --model null \
        --connections "$conns" --output-len 256 --duration "$DURATION" --warmup 1 --cpu 1)
      d=$(echo "$out" | sed -n 's/.*deltas\/s \([0-9.]*\).*/\1/p')
      e=$(echo "$out" | sed -n 's/.*errors \([0-9]*\).*/\1/p')
      echo "round $r  $proto  connections $conns  deltas/s $d  errors $e"
      RES[$proto-$conns]+="$d "
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "| connections | completions SSE deltas/s | Responses SSE deltas/s | ratio |"
echo "|---|---|---|---|"
for conns in 64 1000; do
  s=$(echo "${RES[sse-$conns]}" | median); p=$(echo "${RES[responses-$conns]}" | median)
  echo "| $conns | $s | $p | $(awk -v a="$p" -v b="$s" 'BEGIN {printf "%.2f", a/b}') |"
done
