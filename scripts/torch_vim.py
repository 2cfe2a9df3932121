#!/usr/bin/env python3
"""PyTorch's side of the vision throughput comparison: the README's Vision Mamba
(models/vision/mnist-vim.toml) written in plain PyTorch ops on the CPU, timed as the Rust
example `throughput` times ours (random weights and images; training = forward + backward of
mean(logits^2), no optimizer step; the median of 9 batches after a warm-up).

    python3 scripts/torch_vim.py [BATCH] [THREADS]

The model: 4 x 4 patches of a 28 x 28 image (a 7 x 7 grid), the class token in the middle, four
residual blocks of RMSNorm + a bidirectional Mamba-1 mixer (d_model 64, expand 2, d_state 16,
dt_rank 4, d_conv 4; forward and reverse routes with their own conv, x_proj, dt_proj, A and D,
sharing in_proj and out_proj; the routes averaged), a final RMSNorm and a linear head on the
class token. The selective scan is mamba_ssm's `selective_scan_ref`: exp(delta A) and delta B u
for the whole sequence, then a loop over time.
"""

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

D_MODEL, N_LAYER, D_STATE, EXPAND, D_CONV, PATCH, IMAGE, CLASSES = 64, 4, 16, 2, 4, 4, 28, 10
D_INNER, DT_RANK = EXPAND * D_MODEL, (D_MODEL + 15) // 16


def selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """u, delta, z: (batch, d_inner, len); A: (d_inner, state); B, C: (batch, state, len)."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = delta_a[:, :, t] * h + delta_b_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2) + u * D[None, :, None]
    return y * F.silu(z)


class Route(nn.Module):
    """One route's own SSM parameters."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(D_INNER, D_INNER, D_CONV, groups=D_INNER, padding=D_CONV - 1)
        self.x_proj = nn.Linear(D_INNER, DT_RANK + 2 * D_STATE, bias=False)
        self.dt_proj = nn.Linear(DT_RANK, D_INNER)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, D_STATE + 1).float()).repeat(D_INNER, 1))
        self.D = nn.Parameter(torch.ones(D_INNER))

    def forward(self, x, z):
        """x, z: (batch, d_inner, len) in this route's order."""
        length = x.shape[2]
        u = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(u.transpose(1, 2))
        dt, B, C = torch.split(x_dbl, [DT_RANK, D_STATE, D_STATE], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        A = -torch.exp(self.A_log)
        return selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z, self.dt_proj.bias)


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D_MODEL, 2 * D_INNER, bias=False)
        self.routes = nn.ModuleList([Route(), Route()])
        self.out_proj = nn.Linear(D_INNER, D_MODEL, bias=False)

    def forward(self, h):
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)
        forward = self.routes[0](x, z)
        reverse = self.routes[1](x.flip(2), z.flip(2)).flip(2)
        return self.out_proj(((forward + reverse) / 2).transpose(1, 2))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Vim(nn.Module):
    def __init__(self):
        super().__init__()
        grid = (IMAGE // PATCH) ** 2
        self.patch_embed = nn.Conv2d(1, D_MODEL, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D_MODEL))
        self.pos_embed = nn.Parameter(torch.randn(1, grid + 1, D_MODEL) * 0.02)
        self.norms = nn.ModuleList([RMSNorm(D_MODEL) for _ in range(N_LAYER)])
        self.mixers = nn.ModuleList([Mixer() for _ in range(N_LAYER)])
        self.norm_f = RMSNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, CLASSES)
        self.middle = grid // 2

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([x[:, : self.middle], cls, x[:, self.middle :]], dim=1) + self.pos_embed
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h)[:, self.middle])


def median_images_per_s(f, batch, reps=9):
    f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return batch / sorted(times)[reps // 2]


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Vim()
    images = torch.randn(batch, 1, IMAGE, IMAGE)

    def infer():
        with torch.no_grad():
            model(images)

    def train():
        model.zero_grad()
        model(images).pow(2).mean().backward()

    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {threads} threads, {params / 1e6:.2f} M parameters, batch {batch}")
    print(f"inference images/s {median_images_per_s(infer, batch):.1f}")
    print(f"training images/s {median_images_per_s(train, batch):.1f}")


if __name__ == "__main__":
    main()
