#!/usr/bin/env bash
# 63 streams on one shard with and without a 64th client that stopped reading (issue 10): null
# model, token mode, server pinned to CPU 0 (one shard + engine), `seedance-bench` (63
# connections) pinned to CPU 1; rounds alternate without / with the stalled reader on one server
# process. The stalled reader is a raw socket that asks for a 1,000,000-token stream and never
# reads; while it is there the script samples the server's held bytes and paused connections.
# Usage: perf/slow_reader.sh [seconds=6] [rounds=3]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-6}
ROUNDS=${2:-3}
PORT=${PORT:-18193}
cargo build --release --bins -q
taskset -c 0 target/release/seedance-server --model null --max-running 1024 --listen 127.0.0.1:$PORT \
  --cores 1 --log warn --max-send-backlog-bytes 65536 --event-queue-capacity 1024 --max-tokens-limit 1000000 2>/tmp/slow_srv.log &
SRV=$!
STALL=
trap 'kill $SRV $STALL 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" /tmp/slow_srv.log && break; sleep 0.1; done
metric() { curl -s 127.0.0.1:$PORT/metrics | awk -v m="$1" '$1 == m {print $2}'; }
stall() {
  # Sends one masked `generate` frame, then holds the socket without reading.
  taskset -c 1 python3 - "$PORT" "$1" <<'EOF' &
import base64, os, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET /v1/chat?stream_mode=token HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
body = b'{"type":"generate","id":"stalled","prompt":"hi","max_tokens":1000000}'
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(body)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
time.sleep(float(sys.argv[2]))
EOF
  STALL=$!
}
for R in $(seq "$ROUNDS"); do
  for MODE in without with; do
    if [ $MODE = with ]; then stall $((SECS + 6)); sleep 2; fi
    OUT=$(target/release/seedance-bench ws --addr 127.0.0.1:$PORT --connections 63 --output-len 2000 \
      --stream-mode token --duration "$SECS" --warmup 1 --cpu 1 | sed -n '2p')
    echo "round $R $MODE stalled reader: $OUT"
    if [ $MODE = with ]; then
      echo "  held for it: seedance_queued_output_bytes $(metric seedance_queued_output_bytes)," \
        "seedance_paused_connections $(metric seedance_paused_connections)"
      kill $STALL 2>/dev/null || true; wait $STALL 2>/dev/null || true; STALL=
      sleep 1
    fi
  done
done
