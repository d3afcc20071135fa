#!/usr/bin/env bash
# Every ingest format against one release service (fresh SQLite database, rollup job
# on), one after another, ROUNDS times: the same samples, BATCH per request over
# CONNECTIONS connections.
#
#   scripts/bench-formats.sh [SAMPLES=1000000] [BATCH=1000] [CONNECTIONS=4] [ROUNDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
samples=${1:-1000000}
batch=${2:-1000}
connections=${3:-4}
rounds=${4:-2}
bin=target/release/mcp-metrics
[ -x "$bin" ] || cargo build --release
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export MCP_METRICS_ADMIN_TOKEN=bench-admin-token-$RANDOM$RANDOM
"$bin" serve --database "sqlite://$dir/bench.db" --listen "127.0.0.1:$port" 2>"$dir/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
for round in $(seq "$rounds"); do
  for mode in metrics influx prom-write otlp; do
    "$bin" bench --url "http://127.0.0.1:$port" --mode "$mode" --batch "$batch" --samples "$samples" \
      --connections "$connections" --json 2>/dev/null | tail -1 |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print("round %s %-10s %5.0f k samples/s  ack p99 %5.1f ms  %6.1f KB/request  %d errors" % (sys.argv[1], sys.argv[2], r["samples_per_second"]/1000, r["ack_p99_ms"], r["request_bytes_mean"]/1000, r["errors"]))' "$round" "$mode"
  done
done
