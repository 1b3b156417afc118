#!/usr/bin/env bash
# Where the server's time goes under load (SPEC 7 "perf stat / flamegraphs"): starts
# seedance-server (release, with debug info) pinned to CPU 0, drives it with seedance-bench pinned
# to CPU 1, and while the load runs takes
#   1. `perf stat` of the server process (task clock, context switches, cycles/instructions
#      where the machine exposes them), and
#   2. `perf record -g` (call graphs, 999 Hz), reported as the hottest functions by self time.
# Everything lands in $OUT (default /tmp/seedance_profile): stat.txt, report.txt, perf.data and
# perf.script (feed the last to inferno-collapse-perf | inferno-flamegraph, or to
# https://www.speedscope.app, for a flame graph).
#
# Usage: perf/profile.sh [MODEL=null] [CONNECTIONS=64] [SECONDS=10] [ws|sse]
#   perf/profile.sh                              # the serving path alone (null model)
#   perf/profile.sh synthetic:tiny 64 10         # serving + a small real engine
#   perf/profile.sh synthetic:qwen2.5-0.5b 8 20  # the CPU engine under batching
#   FLAGS="--resume false" perf/profile.sh null 1000 8   # extra server flags (FLAGS) and
#   BENCH_FLAGS="--stream-mode token" ...              # extra seedance-bench flags
# Needs: linux-perf (`perf`), kernel.perf_event_paranoid <= 2 (profiling one's own processes).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-null}
CONNS=${2:-64}
SECS=${3:-10}
PROTO=${4:-ws}
OUT=${OUT:-/tmp/seedance_profile}
PORT=${PORT:-18417}
mkdir -p "$OUT"
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt install linux-perf)" >&2; exit 1; }

cargo build --release --bins -q
BIN=${CARGO_TARGET_DIR:-target}/release
EXTRA=()
[ "$MODEL" = null ] && EXTRA=(--null-tokens-per-s 0 --max-running 4096)
taskset -c 0 "$BIN/seedance-server" --model "$MODEL" "${EXTRA[@]}" ${FLAGS:-} --cores 1 \
    --listen "127.0.0.1:$PORT" --log warn 2>"$OUT/server.log" &
SRV=$!
trap 'kill $SRV 2>/dev/null || true; wait $SRV 2>/dev/null || true' EXIT
for _ in $(seq 1200); do grep -q "listening on" "$OUT/server.log" && break; sleep 0.1; done
grep -q "listening on" "$OUT/server.log" || { cat "$OUT/server.log" >&2; exit 1; }

# The load runs a little longer than each measurement, which starts after a warm-up second.
ulimit -n "$(ulimit -Hn)"
taskset -c 1 "$BIN/seedance-bench" "$PROTO" --addr "127.0.0.1:$PORT" --connections "$CONNS" \
    --input-len 32 --output-len 256 ${BENCH_FLAGS:-} --duration $((2 * SECS + 4)) >"$OUT/bench.txt" 2>&1 &
BENCH=$!
sleep 1
perf stat -p "$SRV" -e task-clock,context-switches,cpu-migrations,page-faults,cycles,instructions \
    -- sleep "$SECS" 2>"$OUT/stat.txt" || true
perf record -F 999 -g -p "$SRV" -o "$OUT/perf.data" -- sleep "$SECS" 2>"$OUT/record.log" || true
wait $BENCH || true
perf report -i "$OUT/perf.data" --stdio --no-children --sort symbol --percent-limit 0.5 \
    2>/dev/null | grep -v '^$' | sed 's/[ -]*$//' >"$OUT/report.txt" || true
perf script -i "$OUT/perf.data" >"$OUT/perf.script" 2>/dev/null || true

echo "== load ($MODEL, $PROTO, $CONNS connections): $(grep -m1 'output tok/s' "$OUT/bench.txt" || tail -1 "$OUT/bench.txt")"
echo "== perf stat (server process, ${SECS}s)"
grep -E 'task-clock|context-switches|migrations|page-faults|cycles|instructions|elapsed' "$OUT/stat.txt" || cat "$OUT/stat.txt"
echo "== hottest functions by self time (perf record -g, ${SECS}s)"
grep -E '^ +[0-9.]+%' "$OUT/report.txt" | head -25
echo "== files in $OUT: stat.txt report.txt perf.data perf.script bench.txt server.log"
