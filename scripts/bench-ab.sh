#!/usr/bin/env bash
# A/B of two (or more) builds on this noisy shared machine: each round runs every format
# against each binary in turn, on a fresh SQLite database, with the same load generator,
# and prints samples/s, ack p99 and the service's CPU ticks (/proc utime + stime) for the
# run. Compare the variants within a round, not across runs or days.
#
#   scripts/bench-ab.sh "before=path/to/old-binary after=target/release/mcp-metrics" \
#     [MODES="influx prom-write metrics"] [ROUNDS=3] [SAMPLES=2000000]
#
# A label ending in `-norollup` runs its binary with the rollup job effectively off
# (rollup.interval_secs = 3600), to measure the job's share; one ending in `-nosync` with
# `[sqlite] synchronous = "normal"`, to measure what the fsync of each commit costs. 1,000 samples per request
# over 4 connections; the load generator is target/release/mcp-metrics, or $LOADGEN
# (keep it one binary when the variants differ in code the client runs too, such as
# the allocator).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a variants <<<"${1:?give label=binary pairs, e.g. \"before=/tmp/old after=target/release/mcp-metrics\"}"
modes=${2:-influx prom-write metrics}
rounds=${3:-3}
samples=${4:-2000000}
. scripts/lib.sh
bench_setup
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for round in $(seq "$rounds"); do
  for mode in $modes; do
    for variant in "${variants[@]}"; do
      label=${variant%%=*}
      variant_bin=${variant#*=}
      toml=
      case $label in
        *-norollup) toml=$'[rollup]\ninterval_secs = 3600\n' ;;
        *-nosync) toml=$'[sqlite]\nsynchronous = "normal"\n' ;;
      esac
      rm -f "$dir"/ab.db*
      service_bin=$variant_bin bench_toml=$toml start_service "sqlite://$dir/ab.db"
      pid=$service_pid
      before=$(ticks "$pid")
      result=$("${LOADGEN:-$bin}" bench --url "$service_url" --mode "$mode" --batch 1000 --samples "$samples" \
        --connections 4 --json 2>/dev/null | tail -1)
      cpu=$(($(ticks "$pid") - before))
      kill "$pid"; wait "$pid" 2>/dev/null || true
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("round %s %-10s %-16s %5.0f k/s  p99 %5.1f ms  %d errors  cpu %s ticks" % (sys.argv[2], sys.argv[3], sys.argv[4], r["samples_per_second"]/1000, r["ack_p99_ms"], r["errors"], sys.argv[5]))' \
        "$result" "$round" "$mode" "$label" "$cpu"
    done
  done
done
