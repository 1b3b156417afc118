#!/usr/bin/env bash
# TLS 1.3 against plain TCP, side by side on one server process (issue 11): null model, token
# mode, 256-token streams, server pinned to CPU 0 (one shard + engine, plain and TLS listeners),
# `seedance-bench` pinned to CPU 1; rounds alternate plain and TLS at 64 and 1,000 connections.
# Then TLS handshakes per second (full, and resumed with tickets; each with one GET /v1/models)
# and server RSS per idle connection, plain and TLS.
# Usage: perf/tls_compare.sh [seconds=8] [rounds=3] [idle=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
ROUNDS=${2:-3}
IDLE=${3:-10000}
PORT=${PORT:-18194}
TPORT=${TPORT:-18195}
cargo build --release --bins -q
ulimit -n "$(ulimit -Hn)"
DIR=$(mktemp -d)
# A CA and a P-256 leaf for 127.0.0.1 (webpki refuses a CA certificate as the end entity).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$DIR/ca.key" \
  -out "$DIR/ca.pem" -days 2 -subj /CN=seedance-bench-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$DIR/key.pem" \
  -out "$DIR/leaf.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n' >"$DIR/ext.cnf"
openssl x509 -req -in "$DIR/leaf.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
  -out "$DIR/cert.pem" -days 2 -extfile "$DIR/ext.cnf" 2>/dev/null
start() {
  taskset -c 0 target/release/seedance-server --model null --max-running 1024 --listen 127.0.0.1:$PORT \
    --tls-listen 127.0.0.1:$TPORT --tls-cert "$DIR/cert.pem" --tls-key "$DIR/key.pem" \
    --cores 1 --log warn 2>/tmp/tls_srv.log &
  SRV=$!
  for _ in $(seq 50); do grep -q "tls listening on" /tmp/tls_srv.log && break; sleep 0.1; done
}
trap 'kill $SRV 2>/dev/null || true; rm -rf "$DIR"' EXIT
bench() { target/release/seedance-bench "$@" --cpu 1; }
start
for R in $(seq "$ROUNDS"); do
  for C in 64 1000; do
    for T in plain tls; do
      if [ $T = tls ]; then ARGS=(--addr 127.0.0.1:$TPORT --tls-ca "$DIR/ca.pem"); else ARGS=(--addr 127.0.0.1:$PORT); fi
      echo "round $R connections $C $T: $(bench ws "${ARGS[@]}" --connections $C --output-len 256 \
        --stream-mode token --duration "$SECS" --warmup 2 | sed -n '2p')"
    done
  done
done
for R in $(seq "$ROUNDS"); do
  bench handshakes --addr 127.0.0.1:$TPORT --tls-ca "$DIR/ca.pem" --connections 16 --duration 4
  bench handshakes --addr 127.0.0.1:$TPORT --tls-ca "$DIR/ca.pem" --connections 16 --duration 4 --resume
done
curl -s 127.0.0.1:$PORT/metrics | grep -E '^seedance_tls_handshakes_total'
kill $SRV; wait $SRV 2>/dev/null || true
rss() { awk '/VmRSS/ {print $2}' /proc/$SRV/status; }
open_conns() { curl -s 127.0.0.1:$PORT/metrics | awk '/^seedance_active_connections/ {s+=$2} END {print s-1}'; }
for T in plain tls; do
  start
  if [ $T = tls ]; then ARGS=(--addr 127.0.0.1:$TPORT --tls-ca "$DIR/ca.pem"); else ARGS=(--addr 127.0.0.1:$PORT); fi
  bench idle "${ARGS[@]}" --connections 100 --hold 0.5 >/dev/null
  sleep 0.5
  BEFORE=$(rss)
  bench idle "${ARGS[@]}" --connections "$IDLE" --hold 20 &
  BENCH=$!
  for _ in $(seq 600); do [ "$(open_conns)" -ge "$IDLE" ] && break; sleep 0.1; done
  sleep 1
  AFTER=$(rss)
  kill $BENCH 2>/dev/null || true; wait $BENCH 2>/dev/null || true
  awk -v a="$AFTER" -v b="$BEFORE" -v n="$IDLE" -v t="$T" \
    'BEGIN { printf "idle connections, %s: %.2f KiB each (RSS %d -> %d KiB)\n", t, (a-b)/n, b, a }'
  kill $SRV; wait $SRV 2>/dev/null || true
done
