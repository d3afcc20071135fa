#!/usr/bin/env bash
# Ingest on PostgreSQL beside SQLite, and two nodes beside one, with the same load
# generator in one run: signed JSON, BATCH samples per request over CONNECTIONS
# connections per node, release binary, fresh databases.
#
#   scripts/bench-postgres.sh [SAMPLES=2000000] [BATCH=1000] [CONNECTIONS=4] [PG_ADMIN_URL]
#
# PG_ADMIN_URL defaults to $MCP_METRICS_TEST_POSTGRES or postgres://postgres@127.0.0.1:5432/test;
# a database is created per run and dropped afterwards. For two nodes, two load
# generators (each SAMPLES/2) start together, one per node; the rate is all samples
# acknowledged by both divided by the longer of the two runs. Each line ends with how busy
# the machine's cores were during the run (100 % = no core ever idle): when one node
# already keeps every core busy, a second node on the same machine has nothing to add.
set -euo pipefail
cd "$(dirname "$0")/.."
samples=${1:-2000000}
batch=${2:-1000}
connections=${3:-4}
admin=${4:-${MCP_METRICS_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}}
. scripts/lib.sh
bench_setup
dbs=()
extra_cleanup() {
  for d in "${dbs[@]}"; do psql -q "$admin" -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true; done
}
export MCP_METRICS_MASTER_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
fresh_pg() { # sets $pg_url; not called in a subshell, so cleanup sees the database
  local name="mcpm_bench_$RANDOM$RANDOM"
  psql -q "$admin" -c "CREATE DATABASE $name" >/dev/null
  dbs+=("$name")
  pg_url=$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/"+sys.argv[2])))' "$admin" "$name")
}
start_node() { # $1 database URL; sets $node_url and $node_pid
  start_service "$1"
  node_url=$service_url; node_pid=$service_pid
}
bench() { # $1 url, $2 samples
  "$bin" bench --url "$1" --batch "$batch" --samples "$2" --connections "$connections" --json 2>/dev/null | tail -1
}
summary() {
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%.0f k samples/s, ack p50 %.1f ms, p99 %.1f ms, %d errors" % (r["samples_per_second"]/1000, r["ack_p50_ms"], r["ack_p99_ms"], r["errors"]))' "$1"
}

start_node "sqlite://$dir/bench.db"
cpu_mark
r=$(bench "$node_url" "$samples")
echo "SQLite, one node:        $(summary "$r"), cores busy $(cpu_busy) %"
kill -TERM "$node_pid"; wait "$node_pid" 2>/dev/null || true

fresh_pg
start_node "$pg_url"
cpu_mark
r=$(bench "$node_url" "$samples")
echo "PostgreSQL, one node:    $(summary "$r"), cores busy $(cpu_busy) %"
kill -TERM "$node_pid"; wait "$node_pid" 2>/dev/null || true

fresh_pg
start_node "$pg_url"; a=$node_url; a_pid=$node_pid
start_node "$pg_url"; b=$node_url; b_pid=$node_pid
half=$((samples / 2))
cpu_mark
bench "$a" "$half" >"$dir/a.json" &
ba=$!
bench "$b" "$half" >"$dir/b.json" &
bb=$!
# A run with failed requests exits non-zero after printing its figures; report them.
wait "$ba" || true
wait "$bb" || true
busy=$(cpu_busy)
python3 - "$dir/a.json" "$dir/b.json" "$busy" <<'PY'
import json, sys
runs = [json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3]]
total = sum(r["accepted_samples"] for r in runs)
seconds = max(r["seconds"] for r in runs)
p99 = max(r["ack_p99_ms"] for r in runs)
errors = sum(r["errors"] for r in runs)
print(f"PostgreSQL, two nodes:   {total / seconds / 1000:.0f} k samples/s, ack p99 {p99:.1f} ms (worse node), {errors} errors, cores busy {sys.argv[3]} %")
PY
kill -TERM "$a_pid" "$b_pid"; wait "$a_pid" "$b_pid" 2>/dev/null || true
