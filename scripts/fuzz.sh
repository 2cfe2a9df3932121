#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each, or the targets named after it:
#   scripts/fuzz.sh SECONDS [TARGET...]
# Targets run side by side, one per core (FUZZ_JOBS to change). Each starts from its seeds in
# fuzz/corpus/TARGET (kept small, from the bundled data) and grows a working corpus under
# FUZZ_WORK (default target/fuzz-work), which later runs continue from. A crash, a panic, a
# hang over 10 s or more than 2 GiB of memory fails the run; the input that did it is left in
# FUZZ_WORK/artifacts/TARGET/. At the end, a table: executions, executions per second and corpus
# size of each target, also written to FUZZ_WORK/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}"
shift
work="$(realpath -m "${FUZZ_WORK:-target/fuzz-work}")"
jobs="${FUZZ_JOBS:-$(nproc)}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# cargo-fuzz passes the sanitizer-coverage flags, which need RUSTC_BOOTSTRAP on a stable
# toolchain. No sanitizer: the loaders are safe Rust, and a panic or an abort is what we look for.
export RUSTC_BOOTSTRAP=1
# Build and run with the same flags, or `cargo fuzz run` builds again. cargo-fuzz's default of one
# codegen unit would make the build several minutes longer. FUZZ_TARGET_DIR moves the build.
flags=(--sanitizer none --codegen-units 16)
[ -n "${FUZZ_TARGET_DIR:-}" ] && flags+=(--target-dir "$FUZZ_TARGET_DIR")
(cd fuzz && cargo fuzz build "${flags[@]}")
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
mkdir -p "$work"
run() {
  local t="$1" max_len=65536
  [ "$t" = checkpoint ] && max_len=131072
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
  (cd fuzz && cargo fuzz run "${flags[@]}" "$t" "$work/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" \
    -artifact_prefix="$work/artifacts/$t/" -print_final_stats=1) >"$work/$t.log" 2>&1
}
failed=0
pids=()
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  run "$t" &
  pids+=("$!")
done
for i in "${!targets[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "FAILED: ${targets[$i]} (log: $work/${targets[$i]}.log)" >&2
    grep -m5 -E "panicked|ERROR|SUMMARY|Test unit written" "$work/${targets[$i]}.log" >&2 || true
    failed=1
  fi
done
{
  echo "| target | seconds | executions | executions/s | corpus (files) | peak RSS (MB) |"
  echo "|---|---:|---:|---:|---:|---:|"
  for t in "${targets[@]}"; do
    stat() { grep -m1 "stat::$1:" "$work/$t.log" | awk '{print $2}'; }
    echo "| $t | $seconds | $(stat number_of_executed_units) | $(stat average_exec_per_sec) | $(find "$work/corpus/$t" -type f | wc -l) | $(stat peak_rss_mb) |"
  done
} | tee "$work/report.md"
exit "$failed"
