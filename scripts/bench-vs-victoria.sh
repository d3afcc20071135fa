#!/usr/bin/env bash
# Line protocol and remote-write ingest, mcp-metrics beside VictoriaMetrics (Debian's
# `victoria-metrics` package), on the same payloads from the same load generator, in one
# run: each round sends every format to both, alternating, on fresh databases.
#
#   scripts/bench-vs-victoria.sh [SAMPLES=2000000] [BATCH=1000] [CONNECTIONS=4] [ROUNDS=2]
#
# Both sides authenticate every request (mcp-metrics: the server's API key;
# VictoriaMetrics: -httpAuth basic auth). mcp-metrics answers after the samples are
# committed (SQLite, synchronous=FULL); VictoriaMetrics answers once rows are in its
# in-memory buffers, flushed to disk within about a second. After each run the script
# checks that the other side stored what was acknowledged.
set -euo pipefail
cd "$(dirname "$0")/.."
samples=${1:-2000000}
batch=${2:-1000}
connections=${3:-4}
rounds=${4:-2}
vm=${VICTORIA_METRICS:-/usr/bin/victoria-metrics}
[ -x "$vm" ] || { echo "install Debian's victoria-metrics package first (apt-get install victoria-metrics)" >&2; exit 1; }
. scripts/lib.sh
bench_setup
vm_auth="Basic $(printf 'bench:secret-%s' "$MCP_METRICS_ADMIN_TOKEN" | base64 -w0)"

start_vm() { # $1: name
  local port; port=$(free_port)
  "$vm" -storageDataPath="$dir/$1" -httpListenAddr="127.0.0.1:$port" -retentionPeriod=100y \
    -httpAuth.username=bench -httpAuth.password="secret-$MCP_METRICS_ADMIN_TOKEN" \
    -loggerLevel=ERROR >"$dir/$1.log" 2>&1 &
  pids+=($!); vm_pid=$!
  for _ in $(seq 100); do curl -sf -H "Authorization: $vm_auth" "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
  victoria="http://127.0.0.1:$port"
}
rate() {
  python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("%.0f k/s, p99 %.1f ms, %d errors" % (r["samples_per_second"]/1000, r["ack_p99_ms"], r["errors"]))'
}

printf '%-6s %-12s %-42s %-42s\n' round format mcp-metrics VictoriaMetrics
for round in $(seq "$rounds"); do
  for mode in influx prom-write; do
    start_service "sqlite://$dir/ours-$round-$mode.db"
    ours=$service_url; ours_pid=$service_pid
    a=$("$bin" bench --url "$ours" --mode "$mode" --batch "$batch" --samples "$samples" --connections "$connections" --json | rate)
    stored=$(curl -s "$ours/metrics" | awk '/^mcp_metrics_ingest_samples_accepted_total/ {print $2}')
    kill -TERM "$ours_pid"; wait "$ours_pid" 2>/dev/null || true
    start_vm "vm-$round-$mode"
    if [ "$mode" = influx ]; then path="/write?precision=ms"; else path="/api/v1/write"; fi
    b=$("$bin" bench --foreign-url "$victoria$path" --foreign-authorization "$vm_auth" --mode "$mode" \
        --batch "$batch" --samples "$samples" --connections "$connections" --json | rate)
    curl -sf -H "Authorization: $vm_auth" "$victoria/internal/force_flush" >/dev/null || true
    vm_rows=$(curl -s -H "Authorization: $vm_auth" "$victoria/metrics" | awk '/^vm_rows_inserted_total\{type="(influx|promremotewrite)"\}/ {s+=$2} END {print s+0}')
    kill "$vm_pid"; wait "$vm_pid" 2>/dev/null || true
    printf '%-6s %-12s %-42s %-42s\n' "$round" "$mode" "$a (stored $stored)" "$b (rows $vm_rows)"
  done
done
