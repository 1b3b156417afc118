#!/usr/bin/env bash
# Peer baselines (SPEC 7): seedance's null-model WebSocket streaming against the same service on
# tokio + tokio-tungstenite and on hyper + fastwebsockets (perf/peers/), all driven by
# `seedance-bench ws`. Each server is pinned to CPU 0 (seedance --cores 1, peers --threads 1),
# the bench to CPU 1; 256-token streams at 1, 64 and 1,000 connections; servers alternate within
# each round (the order rotates) so drift hits all of them alike. Prints every run, then the
# median delta messages/s per server and the ratio seedance/peer per concurrency.
# Servers: seedance, tungstenite (one write per delta), fastws (one write per delta) and
# tungstenite-batch (peer-tungstenite --coalesce: one flush per generation; how much of a gap is
# write coalescing).
#
# Usage: perf/peers.sh [seconds=5] [rounds=3]
#        perf/peers.sh --check    # debug builds, 1 s at 2 connections per server; fails on any
#                                 # error or when a request's deltas != its max_tokens (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
if [ "${1:-}" = --check ]; then
  CHECK=1
  shift
fi
SECS=${1:-5}
ROUNDS=${2:-3}
CONNS=${CONNS:-1 64 1000}
WARMUP=${WARMUP:-1}
OUTPUT_LEN=256
PROFILE=release
if [ $CHECK = 1 ]; then
  SECS=1 ROUNDS=1 CONNS=2 WARMUP=0.2 PROFILE=debug
fi
SERVERS=(seedance tungstenite fastws tungstenite-batch)

if [ $PROFILE = release ]; then
  cargo build --release --bins -q
  cargo build --release -q --locked --manifest-path perf/peers/Cargo.toml
else
  cargo build --bins -q
  cargo build -q --locked --manifest-path perf/peers/Cargo.toml
fi
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE
PEERS=perf/peers/target/$PROFILE
ulimit -n "$(ulimit -Hn)"

TMP=$(mktemp -d)
SRV=""
stop() {
  if [ -n "$SRV" ]; then
    kill "$SRV" 2>/dev/null || true
    wait "$SRV" 2>/dev/null || true
    SRV=""
  fi
}
trap 'stop; rm -rf "$TMP"' EXIT

# start NAME: starts that server on CPU 0 on a free port; sets SRV (pid) and ADDR.
start() {
  local log=$TMP/$1.log
  case $1 in
    seedance) taskset -c 0 $BIN/seedance-server --model null --null-tokens-per-s 0 \
        --max-running 1024 --listen 127.0.0.1:0 --cores 1 --log warn 2>"$log" & ;;
    tungstenite) taskset -c 0 $PEERS/peer-tungstenite --listen 127.0.0.1:0 --threads 1 2>"$log" & ;;
    tungstenite-batch) taskset -c 0 $PEERS/peer-tungstenite --listen 127.0.0.1:0 --threads 1 \
        --coalesce 2>"$log" & ;;
    fastws) taskset -c 0 $PEERS/peer-fastws --listen 127.0.0.1:0 --threads 1 2>"$log" & ;;
  esac
  SRV=$!
  ADDR=""
  for _ in $(seq 100); do
    ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log" | head -1)
    [ -n "$ADDR" ] && return 0
    sleep 0.1
  done
  echo "peers.sh: $1 did not start:" >&2
  cat "$log" >&2
  exit 1
}

# field JSON NAME: a number from the bench's JSON line.
field() { sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" <<<"$1"; }

FAIL=0
printf '%-5s %-17s %6s %9s %6s %12s %10s\n' round server conns requests errors deltas/s tokens/req
for ((r = 0; r < ROUNDS; r++)); do
  for ((i = 0; i < ${#SERVERS[@]}; i++)); do
    S=${SERVERS[$(((i + r) % ${#SERVERS[@]}))]}
    start "$S"
    for C in $CONNS; do
      OUT=$(taskset -c 1 $BIN/seedance-bench ws --addr "$ADDR" --connections "$C" \
        --output-len $OUTPUT_LEN --duration "$SECS" --warmup "$WARMUP" --json 2>"$TMP/bench.err") || true
      J=$(grep '^{' <<<"$OUT" | tail -1)
      N=$(field "$J" completed) E=$(field "$J" errors)
      D=$(field "$J" delta_messages_per_s) T=$(field "$J" output_throughput) Q=$(field "$J" request_throughput)
      PER=$(awk -v t="${T:-0}" -v q="${Q:-0}" 'BEGIN { if (q > 0) printf "%.2f", t / q; else print "nan" }')
      printf '%-5s %-17s %6s %9s %6s %12.0f %10s\n' "$r" "$S" "$C" "${N:-?}" "${E:-?}" "${D:-0}" "$PER"
      echo "$S $C $r ${D:-0}" >>"$TMP/results"
      # Every request must finish without error, with one delta per token and max_tokens tokens.
      if [ -z "$J" ] || [ "${E:-1}" != 0 ] || [ "${N:-0}" = 0 ] || [ "$D" != "$T" ] ||
        ! awk -v p="$PER" -v n=$OUTPUT_LEN 'BEGIN { exit !(p == n) }'; then
        echo "peers.sh: $S at $C connections failed the check:" >&2
        head -5 "$TMP/bench.err" >&2
        FAIL=1
      fi
    done
    stop
  done
done

if [ $CHECK = 1 ]; then
  [ $FAIL = 0 ] && echo "peers check: ok (${SERVERS[*]})"
  exit $FAIL
fi

echo
echo "median delta messages/s over $ROUNDS rounds of ${SECS}s (min-max), ratio = seedance / peer"
printf '%6s  %-26s %-26s %-26s %-26s %8s %8s %8s\n' conns "${SERVERS[@]}" s/tung s/fastws s/t-batch
for C in $CONNS; do
  declare -A MED=()
  LINE=$(printf '%6s ' "$C")
  for S in "${SERVERS[@]}"; do
    VALS=$(awk -v s="$S" -v c="$C" '$1 == s && $2 == c { print $4 }' "$TMP/results" | sort -g)
    MED[$S]=$(awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }' <<<"$VALS")
    RANGE=$(awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f-%.0f", lo, hi }' <<<"$VALS")
    LINE+=$(printf ' %-26s' "$(printf '%.0f (%s)' "${MED[$S]}" "$RANGE")")
  done
  LINE+=$(awk -v s="${MED[seedance]}" -v t="${MED[tungstenite]}" -v f="${MED[fastws]}" \
    -v b="${MED[tungstenite-batch]}" 'BEGIN { printf " %8.2f %8.2f %8.2f", s / t, s / f, s / b }')
  echo "$LINE"
done
exit $FAIL
