#!/usr/bin/env bash
# The GPU check (issue 8), on a machine with an NVIDIA GPU and a CUDA toolkit (nvcc, for candle's
# CUDA backend): the kernels through NVRTC, the CUDA-vs-CPU kernel tests (forward and gradients,
# odd shapes, f32 and bf16), the scan benchmarks, PyTorch's scans on the same GPU when PyTorch is
# installed, then the CLI end to end on the GPU. Paste its output into docs/benchmarks.md.
#
#     scripts/gpu-check.sh [PEAK_GB_PER_S]      # default 4800 (H200 SXM)
set -euo pipefail
cd "$(dirname "$0")/.."
peak="${1:-4800}"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
nvcc --version | tail -2
cuda_home="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export NVRTC_LIB="${NVRTC_LIB:-$(ls "$cuda_home"/lib64/libnvrtc.so* 2>/dev/null | head -1)}"
python3 scripts/check_kernels.py
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
cargo test --release -p mamba-ssm --features cuda --test cuda -- --nocapture
cargo run --release -p mamba-ssm --features cuda --example gpu_scan -- "$peak"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  python3 scripts/torch_scan.py "$peak"
else
  echo "PyTorch with CUDA is not installed: no side-by-side run"
fi
# End to end with --device cuda: logits and greedy decoding of the fixtures against transformers,
# and a training run (Mamba-1 and Mamba-2) against the same run on the CPU.
cargo test --release -p mamba-cli --features cuda --test cli --test train
