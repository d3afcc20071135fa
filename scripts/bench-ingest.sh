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
bin=target/release/mcp-metrics
[ -x "$bin" ] || cargo build --release
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export MCP_METRICS_ADMIN_TOKEN=bench-admin-token-$RANDOM$RANDOM
"$bin" serve --database "sqlite://$dir/bench.db" --listen "127.0.0.1:$port" 2>"$dir/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
"$bin" bench --url "http://127.0.0.1:$port" --batch "$batch" --samples "$samples" --connections "$connections" --json
echo "peak RSS of serve: $(grep VmHWM /proc/$pid/status | awk '{print $2/1024 " MiB"}')"
kill -TERM $pid; wait $pid || true
python3 - "$dir/bench.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("pragma wal_checkpoint(TRUNCATE)")
size = c.execute("pragma page_size").fetchone()[0] * c.execute("pragma page_count").fetchone()[0]
n = c.execute("select count(*) from server_metrics").fetchone()[0]
print(f"database file {size} bytes for {n} samples: {size / max(n, 1):.2f} bytes per stored sample")
PY
