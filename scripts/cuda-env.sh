#!/usr/bin/env bash
# Runs a command with a real CUDA 13.0 toolkit, for building the `cuda` feature on a machine
# without a GPU or a system CUDA install: NVIDIA's own PyPI packages (nvcc, NVVM, the headers,
# and the libraries candle's CUDA backend links), installed once into a cache.
#
#     scripts/cuda-env.sh cargo build --release -p mamba-cli --features cuda
#
# CUDA 13.0 matches the lent GPU machine's driver: PTX from a newer nvcc would not load there.
# The build targets compute capability 9.0 (H100 / H200) unless CUDA_COMPUTE_CAP says otherwise.
set -euo pipefail
version=13.0.88
dir="${MAMBA_CUDA_DIR:-$HOME/.cache/mamba-rs/cuda-$version}"
if [ ! -x "$dir/nvidia/cu13/bin/nvcc" ]; then
  rm -rf "$dir.partial"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$dir.partial" \
    "nvidia-cuda-nvcc==$version" "nvidia-nvvm==$version" "nvidia-cuda-crt==$version" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==$version" \
    "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" >&2
  # candle's kernels link the runtime (-lcudart), and the wheel ships only libcudart.so.13; the
  # other libraries are opened at run time, by their versioned names.
  mkdir -p "$dir.partial/link"
  ln -s ../nvidia/cu13/lib/libcudart.so.13 "$dir.partial/link/libcudart.so"
  mv "$dir.partial" "$dir"
fi
export CUDA_HOME="$dir/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$dir/link${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
exec "$@"
