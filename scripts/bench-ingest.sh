#!/usr/bin/env bash
# End-to-end ingest benchmark on loopback: a fresh SQLite database, the release binary,
# `mcp-metrics bench` with the given batch size, then bytes per stored sample (after a
# WAL checkpoint) and the service's peak RSS.
#   scripts/bench-ingest.sh [BATCH] [SAMPLES] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-1000}
samples=${2:-1000000}
connections=${3:-4}
. scripts/lib.sh
bench_setup
start_service "sqlite://$dir/bench.db"
result=$("$bin" bench --url "$service_url" --batch "$batch" --samples "$samples" --connections "$connections" --json)
echo "$result"
echo "peak RSS of serve: $(grep VmHWM /proc/$service_pid/status | awk '{print $2/1024 " MiB"}')"
kill -TERM "$service_pid"; wait "$service_pid" || true
# Raw samples are stored as runs (one blob per write, server and minute), so the count
# is what the service acknowledged.
python3 - "$dir/bench.db" "$result" <<'PY'
import json, sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("pragma wal_checkpoint(TRUNCATE)")
size = c.execute("pragma page_size").fetchone()[0] * c.execute("pragma page_count").fetchone()[0]
n = json.loads(sys.argv[2])["accepted_samples"]
print(f"database file {size} bytes for {n} samples: {size / max(n, 1):.2f} bytes per stored sample")
PY
