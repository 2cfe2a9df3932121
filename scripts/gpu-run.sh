#!/usr/bin/env bash
# The GPU check, run from the bundle scripts/gpu-bundle.sh writes (it is the bundle's run.sh): on
# a machine with an NVIDIA GPU, its driver and PyTorch's CUDA libraries, and no Rust toolchain.
# Every step has a time bound; the whole fits in about 8 minutes. It ends with one table, pass or
# fail per step and its time, written with each step's output to report.md in $OUT (the folder the
# device tool brings back) or else beside this script.
#
#     bash gpu-bundle/run.sh [PEAK_GB_PER_S]    # default 4800 (H200)
#     bash gpu-bundle/run.sh --check            # here, without a GPU: is the bundle self-contained?
set -uo pipefail
bundle="$(cd "$(dirname "$0")" && pwd)"
check=false
peak=4800
case "${1:-}" in
  --check) check=true ;;
  "") ;;
  *) peak="$1" ;;
esac
report="${OUT:-$bundle}/report.md"
log="$(mktemp -d)"
# The binaries and data travel compressed (the device tool moves at most 64 MiB).
export here="$(mktemp -d)"
trap 'rm -rf "$here" "$log"' EXIT
unpack() {
  if command -v xz > /dev/null; then
    tar -xJf "$bundle/payload.tar.xz" -C "$here"
  else # Python's lzma, where the machine has no xz
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$bundle/payload.tar.xz" "$here"
  fi
}
unpack || { echo "run.sh: cannot unpack $bundle/payload.tar.xz" >&2; exit 1; }

# The CUDA libraries: every nvidia/*/lib folder on the Python path (PyTorch's wheels put cuBLAS,
# cuRAND, NVRTC and the runtime there), found now rather than assumed.
lib_dirs="$(python3 - <<'EOF' 2>/dev/null
import glob, os, sys
dirs = []
for root in sys.path:
    for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)"
export LD_LIBRARY_PATH="${lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MAMBA_BIN="$here/bin/mamba" MAMBA_REPO="$here/repo" RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"

rows=()
status=0
# step NAME SECONDS COMMAND...: runs it with a bound, keeps its output, adds a row.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS rc
  echo "== $name (at most ${limit} s)"
  if declare -F "$1" > /dev/null; then
    # A function of this script: timeout runs programs, so it gets a shell that has it.
    (cd "$here/repo" && timeout "$limit" bash -c "$(declare -f "$1"); $*") > "$log/$name.txt" 2>&1
  else
    (cd "$here/repo" && timeout "$limit" "$@") > "$log/$name.txt" 2>&1
  fi
  rc=$?
  tail -n 40 "$log/$name.txt"
  local result=pass
  if [ $rc -eq 124 ]; then result="timed out"; elif [ $rc -ne 0 ]; then result="fail (exit $rc)"; fi
  [ "$result" = pass ] || status=1
  rows+=("| $name | $result | $((SECONDS - start)) s |")
}

if $check; then
  # Every library a binary links is found (the driver's libcuda and the CUDA libraries are
  # opened at run time, by name; the mamba step below shows that those are found too).
  ldd_all() {
    local missing=0
    for bin in "$here"/bin/*; do
      local out
      out="$(ldd "$bin")"
      echo "$out" | sed "s|^|$(basename "$bin"): |"
      if echo "$out" | grep -q "not found"; then missing=1; fi
    done
    return $missing
  }
  step "ldd" 30 ldd_all
  # Without a GPU the binary stops with a clear message naming only the driver, no panic.
  no_device() {
    local out
    out="$("$MAMBA_BIN" logits --model tests/fixtures/mamba_tiny --ids 1,2,3 --out /tmp/never.safetensors --device cuda 2>&1)"
    echo "$out"
    [ -e /tmp/never.safetensors ] && { echo "wrote a file"; return 1; }
    echo "$out" | grep -q "panicked" && return 1
    # Only the driver is missing: cuBLAS, cuRAND and NVRTC were found where run.sh looks.
    echo "$out" | grep -q "no CUDA device here: cannot load libcuda (the NVIDIA driver) (on a machine"
  }
  step "no-device" 30 no_device
else
  step "nvidia-smi" 30 nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  step "nvrtc-kernels" 60 python3 "$here/repo/scripts/check_kernels.py"
  step "cuda-kernel-tests" 150 "$here/bin/cuda-tests" --nocapture --test-threads 1
  step "scan-benchmarks" 90 "$here/bin/gpu_scan" "$peak"
  if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    step "pytorch-scans" 60 python3 "$here/repo/scripts/torch_scan.py" "$peak"
  else
    rows+=("| pytorch-scans | skipped (no PyTorch with CUDA) | 0 s |")
  fi
  step "cli-on-cuda" 120 "$here/bin/cli-tests" --test-threads 1
  step "training-on-cuda" 120 "$here/bin/train-tests" a_run_on_the_gpu --test-threads 1
fi

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Bundle: $(cat "$bundle/BUILD" 2>/dev/null)"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  # The benchmarks' own tables: ours, then PyTorch's on the same GPU.
  for f in "$log/scan-benchmarks.txt" "$log/pytorch-scans.txt"; do
    [ -f "$f" ] && { echo; grep '^|' "$f"; }
  done
  for f in "$log"/*.txt; do
    echo
    echo "## $(basename "$f" .txt)"
    echo
    echo '```text'
    tail -n 200 "$f"
    echo '```'
  done
} > "$report"
echo
printf '%s\n' "${rows[@]}"
echo "report: $report"
exit $status
