#!/usr/bin/env bash
# Resident memory per idle WebSocket connection: server RSS before and while N connections
# (handshake done, `session` message received) are held open; (after - before) / N.
# Usage: perf/idle_memory.sh [N=10000]   (builds release binaries first)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
PORT=${PORT:-18191}
cargo build --release --bins -q
ulimit -n "$(ulimit -Hn)"
taskset -c 0 target/release/seedance-server --model null --listen 127.0.0.1:$PORT --cores 1 --log warn 2>/tmp/idle_srv.log &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" /tmp/idle_srv.log && break; sleep 0.1; done
# Warm the allocator and the code paths with a few connections first.
target/release/seedance-bench idle --addr 127.0.0.1:$PORT --connections 100 --hold 0.5 --cpu 1 >/dev/null
sleep 0.5
rss() { awk '/VmRSS/ {print $2}' /proc/$SRV/status; }
BEFORE=$(rss)
target/release/seedance-bench idle --addr 127.0.0.1:$PORT --connections "$N" --hold 30 --cpu 1 &
BENCH=$!
open_conns() { curl -s 127.0.0.1:$PORT/metrics | awk '/^seedance_active_connections/ {s+=$2} END {print s-1}'; }
for _ in $(seq 300); do [ "$(open_conns)" -ge "$N" ] && break; sleep 0.1; done
sleep 1
AFTER=$(rss)
OPEN=$(open_conns)
kill $BENCH 2>/dev/null || true
wait $BENCH 2>/dev/null || true
echo "connections open (server view): $OPEN"
echo "RSS before: ${BEFORE} KiB, with $N idle connections: ${AFTER} KiB"
awk -v a="$AFTER" -v b="$BEFORE" -v n="$N" 'BEGIN { printf "per idle connection: %.2f KiB\n", (a-b)/n }'
