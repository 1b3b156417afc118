#!/usr/bin/env bash
# Resumable streams' cost on the serving path (issue 9): null model, token mode, 1,000
# connections, 256-token streams; deltas/s with resume off, the embedded store (fresh: its
# logs grow into memory never touched before, which the kernel zeroes first; and at its cap:
# 64 MiB, full within the warm-up, each new log taking an evicted one's memory, as in a server
# that has run for `resume_ttl`), and Redis, in alternating rounds within one run (medians and
# ratios). Server pinned to CPU 0 (one shard +
# the engine thread), load generator and redis-server on CPU 1.
# After each Redis round the server's own counters say how many messages Redis accepted
# (logged, resumable), and whether any batch was dropped or failed.
# Usage: perf/resume_throughput.sh [seconds=8] [rounds=3]
# SERVER=path runs another build of seedance-server (e.g. the previous commit's) instead;
# BASE=path adds rounds of that build's embedded store (fresh and at its cap) beside this one's.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
ROUNDS=${2:-3}
PORT=${PORT:-18192}
RPORT=${RPORT:-16390}
cargo build --release --bins -q
SERVER=${SERVER:-target/release/seedance-server}
ulimit -n "$(ulimit -Hn)"
DIR=$(mktemp -d)
taskset -c 1 redis-server --port "$RPORT" --bind 127.0.0.1 --appendonly yes --appendfsync everysec \
  --save "" --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
trap 'kill $RPID 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)  ($(nproc) CPUs)"

run() { # label, extra server flags...
  local label=$1
  shift
  taskset -c 0 "${BIN:-$SERVER}" --model null --null-tokens-per-s 0 \
    --max-running 1024 --listen 127.0.0.1:$PORT --cores 1 --log warn "$@" 2>"$DIR/srv.log" &
  local srv=$!
  for _ in $(seq 100); do grep -q "listening on" "$DIR/srv.log" && break; sleep 0.05; done
  local d
  d=$(target/release/seedance-bench ws --addr 127.0.0.1:$PORT --connections 1000 --output-len 256 \
    --model null --stream-mode token --duration "$SECS" --warmup 2 --cpu 1 --json |
    tail -1 | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["delta_messages_per_s"]))')
  metric() { grep -E "^$1 " <<<"$2" | awk '{printf "%d", $2}' || true; }
  local m logged drops errors sent total drain
  m=$(curl -s "127.0.0.1:$PORT/metrics")
  logged=$(metric seedance_store_appended_messages_total "$m")
  drops=$(metric seedance_state_queue_drops_total "$m")
  errors=$(metric seedance_store_errors_total "$m")
  # The load has stopped: how long the state thread needs to write what is still queued, and
  # whether then every message sent is in the store (deltas + one done per stream).
  local t0=$SECONDS
  for _ in $(seq 600); do
    m=$(curl -s "127.0.0.1:$PORT/metrics")
    case "$(metric seedance_state_queue_depth "$m")" in 0 | "") break ;; esac
    sleep 0.1
  done
  drain=$((SECONDS - t0))
  sent=$(metric seedance_ws_deltas_sent_total "$m")
  total=$(metric seedance_store_appended_messages_total "$m")
  kill $srv
  wait $srv 2>/dev/null || true
  echo "$label $d ${logged:-0} ${drops:-0} ${errors:-0}" >>"$DIR/results"
  printf '  %-8s %10s deltas/s | store: %s msgs when the load stopped (%s/s over the %ss run), queue drops %s, errors %s; %s deltas sent, %s msgs stored after %ss of drain\n' \
    "$label" "$d" "${logged:--}" "$(( ${logged:-0} / (SECS + 2) ))" "$((SECS + 2))" "${drops:--}" "${errors:--}" "${sent:--}" "${total:--}" "$drain"
}

for r in $(seq "$ROUNDS"); do
  echo "round $r"
  run off --resume false
  run memory
  run mem-cap --memory-store-max-mb 64
  if [ -n "${BASE:-}" ]; then
    BIN=$BASE run base-mem
    BIN=$BASE run base-cap --memory-store-max-mb 64
  fi
  run redis --redis-url "redis://127.0.0.1:$RPORT"
  redis-cli -p "$RPORT" flushall >/dev/null
done
python3 - "$DIR/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
kinds = [k for k in ("off", "memory", "mem-cap", "base-mem", "base-cap", "redis") if any(r[0] == k for r in rows)]
med = {k: statistics.median(int(r[1]) for r in rows if r[0] == k) for k in kinds}
print("median deltas/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in med.items()))
print(f"embedded/off {med['memory'] / med['off']:.2f}x (at its cap {med['mem-cap'] / med['off']:.2f}x)   redis/off {med['redis'] / med['off']:.2f}x")
if "base-mem" in med:
    print(f"BASE build: embedded/off {med['base-mem'] / med['off']:.2f}x (at its cap {med['base-cap'] / med['off']:.2f}x)")
PY
