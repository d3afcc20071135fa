# Shared by the bench scripts: sourced after `cd` to the repository root.
#
#   bench_setup                  release binary in $bin, scratch directory in $dir, an
#                                admin token, and a trap that stops what was started
#   start_service DATABASE_URL [SERVE ARGS...]
#                                starts `serve` ($service_bin if set, else $bin) on a free
#                                loopback port and waits until it is ready (or exits with
#                                the end of its log): $service_url, $service_pid. Its
#                                configuration file raises the per-server write allowance
#                                (for builds that have one) and adds $bench_toml if set.
#   free_port                    prints a free loopback port
#   cpu_mark / cpu_busy          cpu_mark notes the machine's CPU counters (/proc/stat);
#                                cpu_busy prints how busy all cores were since, in
#                                percent of every core (100 = no core ever idle)
#
# A script that needs more cleanup defines `extra_cleanup` before it exits.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bench_setup() {
  bin=target/release/mcp-metrics
  [ -x "$bin" ] || cargo build --release
  dir=$(mktemp -d)
  pids=()
  export MCP_METRICS_ADMIN_TOKEN=bench-admin-token-$RANDOM$RANDOM
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
  rm -rf "$dir"
}

start_service() { # $1: database URL, then extra `serve` arguments
  local port; port=$(free_port)
  local url=$1; shift
  local binary config=$dir/serve-$port.toml
  binary=$(command -v -- "${service_bin:-$bin}") || { echo "no such program: ${service_bin:-$bin}" >&2; exit 1; }
  : >"$config"
  # One benchmark server writes millions of samples a second, far past the default
  # per-server write allowance: raised so the pipeline is measured, while every request
  # is still charged to it. Builds from before the allowance refuse the keys.
  if grep -q samples_per_second_per_server "$binary"; then
    printf '[ingest]\nsamples_per_second_per_server = 1000000000\nburst_samples_per_server = 1000000000\n' >>"$config"
  fi
  printf '%s' "${bench_toml:-}" >>"$config"
  "$binary" serve --config "$config" "$@" --database "$url" --listen "127.0.0.1:$port" 2>>"$dir/serve.log" &
  service_pid=$!; pids+=("$service_pid")
  local ready=
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && ready=1 && break; sleep 0.05; done
  if [ -z "$ready" ]; then
    echo "$binary serve did not become ready in 10 s; the end of its log:" >&2
    tail -n 20 "$dir/serve.log" >&2
    exit 1
  fi
  service_url="http://127.0.0.1:$port"
}

cpu_now() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; } # busy and idle ticks
cpu_mark() { cpu_at=$(cpu_now); }
cpu_busy() {
  local now; now=$(cpu_now)
  python3 -c 'import sys; b0,i0,b1,i1=map(int,sys.argv[1:]); print("%.0f" % (100*(b1-b0)/max(1,(b1-b0)+(i1-i0))))' $cpu_at $now
}
