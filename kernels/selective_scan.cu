// Mamba-1 selective scan, forward and backward, for the `selective-scan` custom op of
// crates/mamba-ssm (its CPU kernel and plain reference are in selective_scan.rs; the layouts
// here are that op's):
//   u, delta (batch, dim, len); pack = [A (dim, state) | B (batch, groups, state, len) |
//   C (same) | D (dim)? | delta_bias (dim)? | h0 (batch, dim, state)?];
//   out = [y (batch, dim, len) | last state (batch, dim, state)].
// Per channel d and state n, with dt = softplus(delta + delta_bias) (each part optional):
//   h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t.
//
// The hardware-aware algorithm of the paper: one block per (batch, channel); the sequence in
// chunks of THREADS x ITEMS steps, each thread holding ITEMS consecutive steps in registers; for
// each state index the chunk's recurrence is a block scan of the maps h -> a h + b, started from
// the state carried over from the previous chunk. The states live in registers and shared
// memory only: the forward pass writes the state at each chunk start (len / 1024 states per
// channel, when `checkpoints` is not null) and the backward pass recomputes the chunk's states
// from it, then runs the adjoint recurrence backwards with a reverse block scan.
//
// Gradients accumulated over channels or steps (A, B, C, D, delta_bias) are added atomically
// into a zeroed f32 `dpack` laid out as `pack`; du and ddelta are written in f32 too.

#define THREADS 128
#define ITEMS 8
#define CHUNK (THREADS * ITEMS)
#define MAX_STATE 256

struct ScanArgs {
    int batch, dim, len, state, groups;
    int has_d, has_bias, has_h0, softplus;
};

// Offsets into `pack` (and `dpack`).
struct PackOffsets {
    long long a, b, c, d, bias, h0;
};

__device__ PackOffsets offsets(const ScanArgs& s) {
    PackOffsets o;
    const long long bc = (long long)s.batch * s.groups * s.state * s.len;
    o.a = 0;
    o.b = (long long)s.dim * s.state;
    o.c = o.b + bc;
    long long next = o.c + bc;
    o.d = s.has_d ? next : -1;
    next += s.has_d ? s.dim : 0;
    o.bias = s.has_bias ? next : -1;
    next += s.has_bias ? s.dim : 0;
    o.h0 = s.has_h0 ? next : -1;
    return o;
}

template <typename T>
__device__ void scan_fwd(const T* u, const T* delta, const T* pack, T* out, float* checkpoints, ScanArgs s) {
    __shared__ Affine scan_shared[32];
    __shared__ float carry[MAX_STATE];
    const int b = blockIdx.y, d = blockIdx.x, L = s.len, N = s.state;
    const int g = d / (s.dim / s.groups);
    const PackOffsets o = offsets(s);
    const long long row = (long long)b * s.dim + d;
    const T* ur = u + row * L;
    const T* dr = delta + row * L;
    const long long bc_row = ((long long)b * s.groups + g) * N * L;
    const T* Bm = pack + o.b + bc_row;
    const T* Cm = pack + o.c + bc_row;
    const float dskip = s.has_d ? to_f32(pack[o.d + d]) : 0.f;
    const float bias = s.has_bias ? to_f32(pack[o.bias + d]) : 0.f;
    for (int n = threadIdx.x; n < N; n += blockDim.x) carry[n] = s.has_h0 ? to_f32(pack[o.h0 + row * N + n]) : 0.f;
    const int chunks = (L + CHUNK - 1) / CHUNK;
    for (int c = 0; c < chunks; ++c) {
        __syncthreads();
        if (checkpoints)
            for (int n = threadIdx.x; n < N; n += blockDim.x) checkpoints[(row * chunks + c) * N + n] = carry[n];
        const int t0 = c * CHUNK + threadIdx.x * ITEMS;
        float dt[ITEMS], dtu[ITEMS], y[ITEMS];
        for (int k = 0; k < ITEMS; ++k) {
            const int t = t0 + k;
            if (t < L) {
                const float x = to_f32(dr[t]) + bias;
                const float uv = to_f32(ur[t]);
                dt[k] = s.softplus ? softplus(x) : x;
                dtu[k] = dt[k] * uv;
                y[k] = dskip * uv;
            } else {
                dt[k] = 0.f;  // past the end: the identity map
                dtu[k] = 0.f;
                y[k] = 0.f;
            }
        }
        for (int n = 0; n < N; ++n) {
            const float an = to_f32(pack[o.a + (long long)d * N + n]);
            float a[ITEMS], bb[ITEMS];
            Affine mine = {1.f, 0.f};
            for (int k = 0; k < ITEMS; ++k) {
                const int t = t0 + k;
                a[k] = expf(dt[k] * an);
                bb[k] = t < L ? dtu[k] * to_f32(Bm[(long long)n * L + t]) : 0.f;
                mine = then(mine, Affine{a[k], bb[k]});
            }
            Affine total;
            const Affine before = block_exclusive_scan(mine, false, scan_shared, &total);
            float h = before.a * carry[n] + before.b;
            for (int k = 0; k < ITEMS; ++k) {
                const int t = t0 + k;
                h = a[k] * h + bb[k];
                if (t < L) y[k] += to_f32(Cm[(long long)n * L + t]) * h;
            }
            __syncthreads();  // every thread has read carry[n]
            if (threadIdx.x == 0) carry[n] = total.a * carry[n] + total.b;
        }
        for (int k = 0; k < ITEMS; ++k)
            if (t0 + k < L) store(out + row * L + t0 + k, y[k]);
    }
    __syncthreads();
    T* last = out + (long long)s.batch * s.dim * L;
    for (int n = threadIdx.x; n < N; n += blockDim.x) store(last + row * N + n, carry[n]);
}

// grad = [dy (batch, dim, len) | d last state (batch, dim, state)]; `checkpoints` as the forward
// pass wrote them; `dpack` zeroed.
template <typename T>
__device__ void scan_bwd(const T* u, const T* delta, const T* pack, const float* checkpoints, const T* grad,
                         float* du, float* ddelta, float* dpack, ScanArgs s) {
    __shared__ Affine scan_shared[32];
    __shared__ float sums[32];
    __shared__ float gcarry[MAX_STATE];
    __shared__ float chunk_a[CHUNK + 1];
    const int b = blockIdx.y, d = blockIdx.x, L = s.len, N = s.state;
    const int g = d / (s.dim / s.groups);
    const PackOffsets o = offsets(s);
    const long long row = (long long)b * s.dim + d;
    const T* ur = u + row * L;
    const T* dr = delta + row * L;
    const T* dyr = grad + row * L;
    const long long bc_row = ((long long)b * s.groups + g) * N * L;
    const T* Bm = pack + o.b + bc_row;
    const T* Cm = pack + o.c + bc_row;
    float* dB = dpack + o.b + bc_row;
    float* dC = dpack + o.c + bc_row;
    const float dskip = s.has_d ? to_f32(pack[o.d + d]) : 0.f;
    const float bias = s.has_bias ? to_f32(pack[o.bias + d]) : 0.f;
    // The adjoint entering the last step from after it: the last state's gradient.
    const T* dlast = grad + (long long)s.batch * s.dim * L;
    for (int n = threadIdx.x; n < N; n += blockDim.x) gcarry[n] = to_f32(dlast[row * N + n]);
    float d_skip = 0.f, d_bias = 0.f;
    const int chunks = (L + CHUNK - 1) / CHUNK;
    for (int c = chunks - 1; c >= 0; --c) {
        const int i0 = threadIdx.x * ITEMS;  // first item's place in the chunk
        const int t0 = c * CHUNK + i0;
        float dt[ITEMS], uv[ITEMS], dy[ITEMS], ddt[ITEMS], dU[ITEMS];
        for (int k = 0; k < ITEMS; ++k) {
            const int t = t0 + k;
            const bool in = t < L;
            const float x = in ? to_f32(dr[t]) + bias : 0.f;
            dt[k] = in ? (s.softplus ? softplus(x) : x) : 0.f;
            uv[k] = in ? to_f32(ur[t]) : 0.f;
            dy[k] = in ? to_f32(dyr[t]) : 0.f;
            ddt[k] = 0.f;
            dU[k] = dskip * dy[k];
            d_skip += dy[k] * uv[k];
        }
        for (int n = 0; n < N; ++n) {
            const float an = to_f32(pack[o.a + (long long)d * N + n]);
            // The chunk's states again, from its checkpoint.
            float a[ITEMS], bb[ITEMS], h_before[ITEMS], h[ITEMS];
            Affine mine = {1.f, 0.f};
            for (int k = 0; k < ITEMS; ++k) {
                const int t = t0 + k;
                a[k] = expf(dt[k] * an);
                bb[k] = t < L ? dt[k] * uv[k] * to_f32(Bm[(long long)n * L + t]) : 0.f;
                mine = then(mine, Affine{a[k], bb[k]});
                chunk_a[i0 + k] = a[k];
            }
            if (threadIdx.x == 0) chunk_a[CHUNK] = 1.f;  // the carry enters with no decay
            Affine total;
            const Affine before = block_exclusive_scan(mine, false, scan_shared, &total);
            const float start = checkpoints[(row * chunks + c) * N + n];
            float run = before.a * start + before.b;
            for (int k = 0; k < ITEMS; ++k) {
                h_before[k] = run;
                run = a[k] * run + bb[k];
                h[k] = run;
            }
            // The adjoint g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t, backwards through the chunk.
            // chunk_a is complete after the scan's barriers.
            float cdy[ITEMS];
            Affine back = {1.f, 0.f};
            for (int k = ITEMS - 1; k >= 0; --k) {
                const int t = t0 + k;
                cdy[k] = t < L ? to_f32(Cm[(long long)n * L + t]) * dy[k] : 0.f;
                back = then(back, Affine{chunk_a[i0 + k + 1], cdy[k]});
            }
            Affine back_total;
            const Affine after = block_exclusive_scan(back, true, scan_shared, &back_total);
            float adj = after.a * gcarry[n] + after.b;
            float da_sum = 0.f, into_previous = 0.f;
            for (int k = ITEMS - 1; k >= 0; --k) {
                const int t = t0 + k;
                adj = chunk_a[i0 + k + 1] * adj + cdy[k];  // g_t
                if (t < L) {
                    const float bn = to_f32(Bm[(long long)n * L + t]);
                    atomicAdd(dC + (long long)n * L + t, dy[k] * h[k]);
                    atomicAdd(dB + (long long)n * L + t, adj * dt[k] * uv[k]);
                    dU[k] += adj * dt[k] * bn;
                    const float da = adj * h_before[k] * a[k];  // dL/d(dt A) through exp
                    ddt[k] += adj * bn * uv[k] + da * an;
                    da_sum += da * dt[k];
                }
                if (k == 0) into_previous = a[0] * adj;  // a_t0 g_t0, the adjoint entering step t0 - 1
            }
            const float dA = block_sum(da_sum, sums);
            if (threadIdx.x == 0) {
                atomicAdd(dpack + o.a + (long long)d * N + n, dA);
                gcarry[n] = into_previous;
                if (c == 0 && s.has_h0) dpack[o.h0 + row * N + n] = into_previous;
            }
            __syncthreads();  // gcarry and chunk_a are reused by the next state index
        }
        for (int k = 0; k < ITEMS; ++k) {
            const int t = t0 + k;
            if (t >= L) continue;
            const float dd = s.softplus ? ddt[k] * sigmoid(to_f32(dr[t]) + bias) : ddt[k];
            d_bias += dd;
            du[row * L + t] = dU[k];
            ddelta[row * L + t] = dd;
        }
    }
    const float total_skip = block_sum(d_skip, sums);
    const float total_bias = block_sum(d_bias, sums);
    if (threadIdx.x == 0) {
        if (s.has_d) atomicAdd(dpack + o.d + d, total_skip);
        if (s.has_bias) atomicAdd(dpack + o.bias + d, total_bias);
    }
}

// Launch: grid (dim, batch), block THREADS; `checkpoints` holds batch x dim x ceil(len / CHUNK)
// x state floats (or is null when no backward pass will follow).
extern "C" __global__ void __launch_bounds__(THREADS)
selective_scan_fwd_f32(const float* u, const float* delta, const float* pack, float* out, float* checkpoints,
                       ScanArgs s) {
    scan_fwd<float>(u, delta, pack, out, checkpoints, s);
}
extern "C" __global__ void __launch_bounds__(THREADS)
selective_scan_fwd_bf16(const bf16* u, const bf16* delta, const bf16* pack, bf16* out, float* checkpoints,
                        ScanArgs s) {
    scan_fwd<bf16>(u, delta, pack, out, checkpoints, s);
}
extern "C" __global__ void __launch_bounds__(THREADS)
selective_scan_bwd_f32(const float* u, const float* delta, const float* pack, const float* checkpoints,
                       const float* grad, float* du, float* ddelta, float* dpack, ScanArgs s) {
    scan_bwd<float>(u, delta, pack, checkpoints, grad, du, ddelta, dpack, s);
}
extern "C" __global__ void __launch_bounds__(THREADS)
selective_scan_bwd_bf16(const bf16* u, const bf16* delta, const bf16* pack, const float* checkpoints,
                        const bf16* grad, float* du, float* ddelta, float* dpack, ScanArgs s) {
    scan_bwd<bf16>(u, delta, pack, checkpoints, grad, du, ddelta, dpack, s);
}
