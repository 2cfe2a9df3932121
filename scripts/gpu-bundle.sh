#!/usr/bin/env bash
# Writes gpu-bundle/: everything the GPU check needs on a lent GPU machine, which has the NVIDIA
# driver and PyTorch's CUDA libraries but no Rust toolchain. Built here, with a real CUDA 13.0
# toolkit from PyPI (scripts/cuda-env.sh) for compute capability 9.0:
#   payload.tar.xz  bin/: the stripped `mamba` binary, the CUDA kernel tests, the scan
#                   benchmark, the CLI tests; repo/: the fixtures, data, kernels and scripts they
#                   read, in the repository's layout (xz: 257 MiB of binaries become about 40)
#   run.sh          the check itself (scripts/gpu-run.sh): unpacks, runs the steps, reports
#   BUILD           what was built, from which commit
#
#     scripts/gpu-bundle.sh            # build the bundle
#     scripts/gpu-bundle.sh --check    # build it, then show here that it is self-contained
#
# On the GPU machine (the device tool copies the working tree; gpu-bundle/ is ignored by git, so
# it is carried): run `bash gpu-bundle/run.sh`, with carry = ["gpu-bundle"]. See docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="$root/gpu-bundle"
limit=$((64 * 1024 * 1024))
export CARGO_TARGET_DIR="${MAMBA_CUDA_TARGET:-$root/target/cuda}"
cuda() { "$root/scripts/cuda-env.sh" "$@"; }

# The test binaries' paths, from cargo's JSON messages.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}

echo "building with the CUDA toolkit of scripts/cuda-env.sh (compute capability ${CUDA_COMPUTE_CAP:-90})" >&2
# One build for the binary and the example: built apart, `-p mamba-ssm` alone resolves its build
# tools' features differently, and candle's CUDA kernels would go through nvcc a second time.
cuda cargo build --release --locked -p mamba-cli -p mamba-ssm --features cuda --bin mamba --example gpu_scan
tests="$(cuda cargo test --release --locked --features cuda -p mamba-ssm --test cuda -p mamba-cli --test cli --test train \
  --no-run --message-format=json-render-diagnostics | executables)"

stage="$CARGO_TARGET_DIR/gpu-bundle-stage"
rm -rf "$out" "$stage"
mkdir -p "$out" "$stage/bin" "$stage/repo/tests" "$stage/repo/examples/data/text" "$stage/repo/scripts"
put() { objcopy --strip-debug "$1" "$stage/bin/$2"; }
put "$CARGO_TARGET_DIR/release/mamba" mamba
put "$CARGO_TARGET_DIR/release/examples/gpu_scan" gpu_scan
while read -r name path; do
  case "$name" in
    cuda) put "$path" cuda-tests ;;
    cli) put "$path" cli-tests ;;
    train) put "$path" train-tests ;;
  esac
done <<< "$tests"
for bin in mamba gpu_scan cuda-tests cli-tests train-tests; do
  [ -x "$stage/bin/$bin" ] || { echo "gpu-bundle: $bin was not built" >&2; exit 1; }
done
cp -r tests/fixtures "$stage/repo/tests/"
cp -r kernels "$stage/repo/kernels"
cp examples/data/text/tokenizer-bpe512.json "$stage/repo/examples/data/text/"
cp scripts/check_kernels.py scripts/torch_scan.py "$stage/repo/scripts/"
# The oldest C library the binaries run with (Debian 12 builds them; the lent machine may be older).
glibc="$(objdump -T "$stage"/bin/* | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 | cut -d_ -f2)"
echo "gpu-bundle: compressing $(($(du -sb "$stage" | cut -f1) / 1024 / 1024)) MiB" >&2
tar -cf - -C "$stage" bin repo | xz -T0 -6 > "$out/payload.tar.xz"
cp scripts/gpu-run.sh "$out/run.sh"
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)'), built $(date -u +%Y-%m-%dT%H:%M:%SZ), nvcc $(cuda nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability ${CUDA_COMPUTE_CAP:-90}, needs glibc >= $glibc and a CUDA 13 driver" > "$out/BUILD"

# The device tool moves at most 64 MiB with the working tree.
bundle=$(du -sb "$out" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "gpu-bundle: $((bundle / 1024 / 1024)) MiB, with the working tree $(((bundle + tree) / 1024 / 1024)) MiB (limit 64)" >&2
if [ $((bundle + tree)) -gt $limit ]; then
  echo "gpu-bundle: over the device tool's 64 MiB" >&2
  exit 1
fi

if [ "${1:-}" = "--check" ]; then
  # Resolve the CUDA libraries from the toolkit's wheels, laid out as PyTorch's are
  # (nvidia/cu13/lib), exactly as run.sh resolves them on the GPU machine.
  wheels="$(cuda sh -c 'dirname "$(dirname "$CUDA_HOME")"')"
  PYTHONPATH="$wheels" OUT="$out" bash "$out/run.sh" --check
fi
