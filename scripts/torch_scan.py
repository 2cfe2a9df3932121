#!/usr/bin/env python3
"""PyTorch's side of the GPU check, at the sizes of `gpu_scan`: the selective scan written in
plain PyTorch ops (the reference's recurrence, one step per time index), mamba_ssm's CUDA kernel
and Mamba-2's Triton SSD kernel when the mamba_ssm package is installed.

    python3 scripts/torch_scan.py [PEAK_GB_PER_S]
"""

import sys
import time

import torch
import torch.nn.functional as F


def timed(f, runs=10):
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def plain_scan(u, delta, A, B, C, D, bias):
    """The selective scan in PyTorch ops: a loop over time of the (batch, dim, state) state."""
    dt = F.softplus(delta + bias[None, :, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device, dtype=torch.float32)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + D[None, :, None] * u


def main():
    peak = float(sys.argv[1]) if len(sys.argv) > 1 else 4800.0
    dev = torch.device("cuda")
    batch, dim, state, length = 8, 1536, 16, 4096
    print(f"| PyTorch {torch.__version__} | dtype | shape | median time | note |")
    print("|---|---|---|---|---|")
    for dtype in [torch.float32, torch.bfloat16]:
        u = torch.rand(batch, dim, length, device=dev, dtype=dtype) * 2 - 1
        delta = torch.rand(batch, dim, length, device=dev, dtype=dtype) * -3
        A = -(torch.rand(dim, state, device=dev) * 3.5 + 0.5)
        B = torch.rand(batch, state, length, device=dev, dtype=dtype) * 2 - 1
        C = torch.rand(batch, state, length, device=dev, dtype=dtype) * 2 - 1
        D = torch.rand(dim, device=dev)
        bias = -torch.rand(dim, device=dev)
        shape = f"batch {batch}, dim {dim}, state {state}, len {length}"
        floor = 3 * batch * dim * length * u.element_size() / (peak * 1e9)
        with torch.no_grad():
            t = timed(lambda: plain_scan(u.float(), delta.float(), A, B.float(), C.float(), D, bias), runs=3)
            print(f"| selective scan, plain PyTorch ops | {dtype} | {shape} | {t * 1e3:.1f} ms | {t / floor:.1f}x the bandwidth floor |")
            try:
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

                t = timed(lambda: selective_scan_fn(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True))
                print(f"| selective scan, mamba_ssm CUDA kernel | {dtype} | {shape} | {t * 1e3:.3f} ms | {t / floor:.2f}x the bandwidth floor |")
            except ImportError:
                print("| selective scan, mamba_ssm CUDA kernel | | | not installed | |")
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        heads, headdim, ssd_state = 24, 64, 128
        shape = f"batch {batch}, len {length}, heads {heads} x {headdim}, state {ssd_state}"
        for dtype in [torch.float32, torch.bfloat16]:
            x = torch.rand(batch, length, heads, headdim, device=dev, dtype=dtype) * 2 - 1
            dt = torch.rand(batch, length, heads, device=dev, dtype=dtype) * -3
            A = -(torch.rand(heads, device=dev) * 3.5 + 0.5)
            Bs = torch.rand(batch, length, 1, ssd_state, device=dev, dtype=dtype) * 2 - 1
            Cs = torch.rand(batch, length, 1, ssd_state, device=dev, dtype=dtype) * 2 - 1
            with torch.no_grad():
                t = timed(lambda: mamba_chunk_scan_combined(x, dt, A, Bs, Cs, chunk_size=256, dt_softplus=True))
            print(f"| SSD forward, mamba_ssm Triton | {dtype} | {shape} | {t * 1e3:.3f} ms | |")
            leaves = [v.requires_grad_() for v in (x, dt, A, Bs, Cs)]

            def train():
                y = mamba_chunk_scan_combined(*leaves, chunk_size=256, dt_softplus=True)
                y.float().sum().backward()

            t = timed(train, runs=5)
            print(f"| SSD forward + backward, mamba_ssm Triton | {dtype} | {shape} | {t * 1e3:.3f} ms | |")
    except ImportError:
        print("| SSD, mamba_ssm Triton | | | not installed | |")


if __name__ == "__main__":
    main()
