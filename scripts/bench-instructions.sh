#!/usr/bin/env bash
# Instructions the service executes for one fixed load, per build: `serve` runs under
# valgrind's callgrind (which counts instructions, not seconds, so the figure does not
# move with whatever else this shared machine is doing), one connection sends SAMPLES
# samples in requests of 1,000 (one request per commit, so every build commits the same
# groups), the rollup job is off, and the service is stopped gracefully. Prints each
# build's total and its instructions per request; compare builds within one run.
#
#   scripts/bench-instructions.sh "before=path/to/old after=target/release/mcp-metrics" \
#     [MODE=influx] [SAMPLES=300000]
#
# About a minute per build at the defaults. Startup is counted too (the same for every
# build); heap layout moves a run by about ±1 % (realloc copies), so read differences
# below that as none. Needs valgrind. With PROFILES=DIR, each build's callgrind output
# is kept as DIR/LABEL-MODE.out, for `callgrind_annotate --inclusive=yes` to say where
# the instructions go.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a variants <<<"${1:?give label=binary pairs, e.g. \"before=/tmp/old after=target/release/mcp-metrics\"}"
mode=${2:-influx}
samples=${3:-300000}
. scripts/lib.sh
bench_setup
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
requests=$(( (samples + 999) / 1000 ))
for variant in "${variants[@]}"; do
  label=${variant%%=*}
  binary=$(command -v -- "${variant#*=}") || { echo "no such program: ${variant#*=}" >&2; exit 1; }
  config=$dir/$label.toml
  printf '[rollup]\ninterval_secs = 3600\n' >"$config"
  # The allowance is raised (not off) for builds that have one, so it is counted.
  if grep -q samples_per_second_per_server "$binary"; then
    printf '[ingest]\nsamples_per_second_per_server = 1000000000\nburst_samples_per_server = 1000000000\n' >>"$config"
  fi
  port=$(free_port)
  rm -f "$dir"/ins.db*
  valgrind --tool=callgrind --callgrind-out-file="$dir/$label.out" \
    "$binary" serve --config "$config" --database "sqlite://$dir/ins.db" --listen "127.0.0.1:$port" 2>>"$dir/serve.log" &
  pid=$!; pids+=("$pid")
  ready=
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && ready=1 && break; sleep 0.1; done
  if [ -z "$ready" ]; then
    echo "$label: serve under valgrind did not become ready in 60 s; the end of its log:" >&2
    tail -n 20 "$dir/serve.log" >&2
    exit 1
  fi
  "$bin" bench --url "http://127.0.0.1:$port" --mode "$mode" --batch 1000 --samples "$samples" --connections 1 \
    --json >/dev/null 2>&1 || { echo "$label: the load failed; see $dir/serve.log" >&2; exit 1; }
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || true
  total=$(awk '/^summary:/{print $2}' "$dir/$label.out")
  if [ -n "${PROFILES:-}" ]; then mkdir -p "$PROFILES" && cp "$dir/$label.out" "$PROFILES/$label-$mode.out"; fi
  python3 -c 'import sys; t=int(sys.argv[3]); print("%-10s %-10s %15s instructions  %9.0f per request" % (sys.argv[1], sys.argv[2], format(t, ","), t / int(sys.argv[4])))' \
    "$label" "$mode" "$total" "$requests"
done
