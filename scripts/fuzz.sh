#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) under libFuzzer for a bounded time each,
# starting from the seed inputs in fuzz/seeds, and prints executions and findings.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=60] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Stable Rust: sanitizers need
# nightly, so targets run with `--sanitizer none`; coverage guidance (SanitizerCoverage)
# and Rust's own checks (panics, overflow checks, debug assertions) are on. A crash
# leaves its input in fuzz/artifacts/<target>/ and makes this script fail.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
status=0
for target in "${targets[@]}"; do
  corpus="corpus/$target"
  mkdir -p "$corpus"
  if [ -d "seeds/$target" ]; then cp -n seeds/"$target"/* "$corpus"/ 2>/dev/null || true; fi
  log="$(mktemp)"
  if cargo fuzz run --sanitizer none --debug-assertions "$target" "$corpus" -- \
      -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1; then
    result="no findings"
  else
    result="FINDING (see fuzz/artifacts/$target and $log)"
    status=1
  fi
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+')
  printf '%-18s %4ss  %12s executions  coverage %6s  %s\n' "$target" "$seconds" "${runs:-?}" "${cov:-?}" "$result"
done
exit $status
