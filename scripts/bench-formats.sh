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
. scripts/lib.sh
bench_setup
start_service "sqlite://$dir/bench.db"
for round in $(seq "$rounds"); do
  for mode in metrics influx prom-write otlp; do
    "$bin" bench --url "$service_url" --mode "$mode" --batch "$batch" --samples "$samples" \
      --connections "$connections" --json 2>/dev/null | tail -1 |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print("round %s %-10s %5.0f k samples/s  ack p99 %5.1f ms  %6.1f KB/request  %d errors" % (sys.argv[1], sys.argv[2], r["samples_per_second"]/1000, r["ack_p99_ms"], r["request_bytes_mean"]/1000, r["errors"]))' "$round" "$mode"
  done
done
