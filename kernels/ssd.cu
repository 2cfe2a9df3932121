// Mamba-2 SSD chunked scan, forward and backward, for the `ssd-chunk-scan` custom op of
// crates/mamba-ssm (its candle-op form and plain reference are in ssd.rs). Layouts are the
// reference's: x (batch, len, heads, headdim), dt (batch, len, heads), A (heads),
// B and C (batch, len, groups, state), h0 and the last state (batch, heads, headdim, state).
// dt is the effective step (bias, softplus and limits applied before); the D skip and the z gate
// are applied after, so this is the recurrence alone, per head h of group g:
//   h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t.
//
// The sequence is cut into chunks of CHUNK steps and, as in the paper's SSD algorithm, each
// chunk is handled on its own except for one state passed from chunk to chunk:
//   1. `ssd_chunk_state`: each chunk's own contribution to the state at its end, from a zero
//      state: sum_j exp(cum_last - cum_j) dt_j x_j B_j^T, where cum_i = A sum_{k <= i} dt_k;
//      and the chunk's decay exp(cum_last).
//   2. `ssd_state_pass`: s_{c+1} = decay_c s_c + own_c along the chunks, writing each chunk's
//      start state over its own contribution, and the last state.
//   3. `ssd_chunk_out`: y_i = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j
//      + exp(cum_i) s_c C_i, the first term through the chunk's (CHUNK x CHUNK) matrix M in
//      shared memory.
// The backward pass mirrors it: `ssd_chunk_dstate` (what each chunk's outputs add to the
// gradient of its start state), `ssd_state_pass_bwd` (the state gradients passed backwards, and
// the gradient of each chunk's decay) and `ssd_chunk_bwd` (every input's gradient inside a
// chunk, from the chunk's start state and the gradient of its end state).
//
// Chunk states are kept in f32 as (batch, chunk, head, state, headdim): headdim fastest, so
// threads of a warp (consecutive headdim) read consecutive addresses. Steps past the end have
// dt = 0 and read as zeros, which leaves every sum unchanged. Gradients summed over heads (B, C,
// A) are added atomically into zeroed f32 buffers; everything else is written once.

#define CHUNK 64
#define THREADS 256
// (i, j) pairs of a chunk per thread in `gram`, and the columns of its shared tiles.
#define PAIRS (CHUNK * CHUNK / THREADS)
#define TILE 16

struct SsdArgs {
    int batch, len, heads, headdim, groups, state, chunks, has_h0;
};

// Element (b, t, h, k) of a (batch, len, rows, width) tensor.
__device__ __forceinline__ long long at(const SsdArgs& s, int b, int t, int rows, int row, int width, int k) {
    return (((long long)b * s.len + t) * rows + row) * width + k;
}

// Offset of chunk state (b, c, h, 0, 0).
__device__ __forceinline__ long long state_at(const SsdArgs& s, int b, int c, int h) {
    return (((long long)b * s.chunks + c) * s.heads + h) * s.state * s.headdim;
}

// Element (b, h, p, n) of h0 or the last state, (batch, heads, headdim, state).
__device__ __forceinline__ long long last_at(const SsdArgs& s, int b, int h, int p, int n) {
    return (((long long)b * s.heads + h) * s.headdim + p) * s.state + n;
}

// Element (b, h, c) of a chunk decay or its gradient, (batch, heads, chunks).
__device__ __forceinline__ long long decay_at(const SsdArgs& s, int b, int h, int c) {
    return ((long long)b * s.heads + h) * s.chunks + c;
}

// The chunk's steps (0 past the end) and their running sums: cumdt_i = sum_{k <= i} dt_k and
// cum_i = A cumdt_i. Every thread must call; the arrays are in shared memory.
template <typename T>
__device__ void chunk_steps(const T* dt, float A, const SsdArgs& s, int b, int c, int h, float* dts, float* cum,
                            float* cumdt) {
    for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) {
        const int t = c * CHUNK + i;
        dts[i] = t < s.len ? to_f32(dt[at(s, b, t, s.heads, h, 1, 0)]) : 0.f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float run = 0.f;
        for (int i = 0; i < CHUNK; ++i) {
            run += dts[i];
            cumdt[i] = run;
            cum[i] = A * run;
        }
    }
    __syncthreads();
}

// out[n, p] = sum_i w_i u_i[p] v_i[n] over the chunk's steps, u (batch, len, heads, headdim) and
// v (batch, len, groups, state): a chunk's contribution to its end state (forward) or the
// gradient its outputs send to its start state (backward).
template <typename T>
__device__ void chunk_outer(const T* u, const T* v, const float* w, const SsdArgs& s, int b, int c, int h,
                            float* out) {
    const int g = h / (s.heads / s.groups), P = s.headdim, N = s.state;
    const int steps = min(CHUNK, s.len - c * CHUNK);
    for (int e = threadIdx.x; e < N * P; e += blockDim.x) {
        const int n = e / P, p = e % P;
        float acc = 0.f;
        for (int i = 0; i < steps; ++i) {
            const int t = c * CHUNK + i;
            acc += w[i] * to_f32(u[at(s, b, t, s.heads, h, P, p)]) * to_f32(v[at(s, b, t, s.groups, g, N, n)]);
        }
        out[state_at(s, b, c, h) + e] = acc;
    }
}

// Grid (chunks, heads, batch). states: (batch, chunks, heads, state, headdim); decay: (batch,
// heads, chunks).
template <typename T>
__device__ void chunk_state(const T* x, const T* dt, const T* A, const T* B, float* states, float* decay,
                            SsdArgs s) {
    __shared__ float dts[CHUNK], cum[CHUNK], cumdt[CHUNK], w[CHUNK];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    chunk_steps(dt, to_f32(A[h]), s, b, c, h, dts, cum, cumdt);
    for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) w[i] = expf(cum[CHUNK - 1] - cum[i]) * dts[i];
    if (threadIdx.x == 0) decay[decay_at(s, b, h, c)] = expf(cum[CHUNK - 1]);
    __syncthreads();
    chunk_outer(x, B, w, s, b, c, h, states);
}

// Grid (ceil(state x headdim / THREADS), heads, batch), one thread per state element. Turns each
// chunk's own contribution into the state at its start, in place; writes the last state.
template <typename T>
__device__ void state_pass(const T* h0, float* states, const float* decay, T* last, SsdArgs s) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int P = s.headdim, N = s.state;
    if (e >= N * P) return;
    const int n = e / P, p = e % P;
    const long long hp = last_at(s, b, h, p, n);
    float run = s.has_h0 ? to_f32(h0[hp]) : 0.f;
    for (int c = 0; c < s.chunks; ++c) {
        float* slot = states + state_at(s, b, c, h) + e;
        const float own = *slot;
        *slot = run;
        run = decay[decay_at(s, b, h, c)] * run + own;
    }
    store(last + hp, run);
}

// The thread's (i, j) pairs of the chunk, i = threadIdx.x / CHUNK + q (THREADS / CHUNK) for
// q < PAIRS and j = threadIdx.x % CHUNK: a warp shares i and covers consecutive j.
__device__ __forceinline__ int pair_row(int q) { return threadIdx.x / CHUNK + q * (THREADS / CHUNK); }
__device__ __forceinline__ int pair_col() { return threadIdx.x % CHUNK; }

// dot[q] = U_i . V_j over `width` columns for the thread's pairs, the rows read by u(i, k) and
// v(j, k) (zero past the rows that exist), through shared tiles of TILE columns (padded by one
// so that a warp reading consecutive rows hits distinct banks). Every thread must call.
template <typename RowsU, typename RowsV>
__device__ void gram(RowsU u, RowsV v, int width, float (*ut)[TILE + 1], float (*vt)[TILE + 1], float* dot) {
    for (int q = 0; q < PAIRS; ++q) dot[q] = 0.f;
    for (int k0 = 0; k0 < width; k0 += TILE) {
        __syncthreads();  // the previous tile is used up
        for (int e = threadIdx.x; e < CHUNK * TILE; e += blockDim.x) {
            const int i = e / TILE, k = k0 + e % TILE;
            ut[i][e % TILE] = k < width ? u(i, k) : 0.f;
            vt[i][e % TILE] = k < width ? v(i, k) : 0.f;
        }
        __syncthreads();
        const int j = pair_col();
        for (int q = 0; q < PAIRS; ++q) {
            const int i = pair_row(q);
            float sum = 0.f;
            for (int k = 0; k < TILE; ++k) sum += ut[i][k] * vt[j][k];
            dot[q] += sum;
        }
    }
}

// Reads row i < CHUNK of the chunk's steps of a (batch, len, rows, width) tensor at row `row`,
// as `gram` wants: element k of step c * CHUNK + i, zero past the end of the sequence.
template <typename T>
struct ChunkRows {
    const T* t;
    const SsdArgs& s;
    int b, c, rows, row, width;
    __device__ float operator()(int i, int k) const {
        const int t_i = c * CHUNK + i;
        return t_i < s.len ? to_f32(t[at(s, b, t_i, rows, row, width, k)]) : 0.f;
    }
};

// (C_i . B_j) exp(cum_i - cum_j) for j <= i within the chunk, else 0, into M (CHUNK x CHUNK).
template <typename T>
__device__ void decayed_cb(const T* B, const T* C, const float* cum, const SsdArgs& s, int b, int c, int h, float* M,
                           float (*ut)[TILE + 1], float (*vt)[TILE + 1]) {
    const int g = h / (s.heads / s.groups), N = s.state, steps = min(CHUNK, s.len - c * CHUNK);
    float cb[PAIRS];
    gram(ChunkRows<T>{C, s, b, c, s.groups, g, N}, ChunkRows<T>{B, s, b, c, s.groups, g, N}, N, ut, vt, cb);
    const int j = pair_col();
    for (int q = 0; q < PAIRS; ++q) {
        const int i = pair_row(q);
        M[i * CHUNK + j] = j <= i && i < steps ? cb[q] * expf(cum[i] - cum[j]) : 0.f;
    }
}

// Grid (chunks, heads, batch). y (batch, len, heads, headdim) from the chunk start states.
template <typename T>
__device__ void chunk_out(const T* x, const T* dt, const T* A, const T* B, const T* C, const float* states, T* y,
                          SsdArgs s) {
    __shared__ float dts[CHUNK], cum[CHUNK], cumdt[CHUNK], M[CHUNK * CHUNK];
    __shared__ float ut[CHUNK][TILE + 1], vt[CHUNK][TILE + 1];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (s.heads / s.groups), P = s.headdim, N = s.state;
    const int steps = min(CHUNK, s.len - c * CHUNK);
    chunk_steps(dt, to_f32(A[h]), s, b, c, h, dts, cum, cumdt);
    decayed_cb(B, C, cum, s, b, c, h, M, ut, vt);
    __syncthreads();
    const float* start = states + state_at(s, b, c, h);
    for (int e = threadIdx.x; e < steps * P; e += blockDim.x) {
        const int i = e / P, p = e % P, ti = c * CHUNK + i;
        float within = 0.f;
        for (int j = 0; j <= i; ++j)
            within += M[i * CHUNK + j] * dts[j] * to_f32(x[at(s, b, c * CHUNK + j, s.heads, h, P, p)]);
        float carried = 0.f;
        for (int n = 0; n < N; ++n) carried += to_f32(C[at(s, b, ti, s.groups, g, N, n)]) * start[n * P + p];
        store(y + at(s, b, ti, s.heads, h, P, p), within + expf(cum[i]) * carried);
    }
}

// Backward 1, grid (chunks, heads, batch): what chunk c's outputs send to the gradient of its
// start state, sum_i exp(cum_i) dy_i C_i^T, into dstates (laid out as states).
template <typename T>
__device__ void chunk_dstate(const T* dt, const T* A, const T* C, const T* dy, float* dstates, SsdArgs s) {
    __shared__ float dts[CHUNK], cum[CHUNK], cumdt[CHUNK], w[CHUNK];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    chunk_steps(dt, to_f32(A[h]), s, b, c, h, dts, cum, cumdt);
    for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) w[i] = expf(cum[i]);
    __syncthreads();
    chunk_outer(dy, C, w, s, b, c, h, dstates);
}

// Backward 2, grid as `state_pass`: G_c = e_c + decay_c G_{c+1} from G_chunks = d last state,
// where e_c is what backward 1 left in dstates[c]; dstates[c] is overwritten with G_{c+1} (the
// gradient of chunk c's own contribution), ddecay[c] gets sum G_{c+1} s_c and dh0 gets G_0.
template <typename T>
__device__ void state_pass_bwd(const float* states, const float* decay, const T* dlast, float* dstates, float* ddecay,
                               float* dh0, SsdArgs s) {
    __shared__ float sums[32];
    const int e = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int P = s.headdim, N = s.state;
    const bool in = e < N * P;  // every thread takes part in the block sums
    const int n = in ? e / P : 0, p = in ? e % P : 0;
    const long long hp = last_at(s, b, h, p, n);
    float run = in ? to_f32(dlast[hp]) : 0.f;
    for (int c = s.chunks - 1; c >= 0; --c) {
        const long long slot = state_at(s, b, c, h) + e;
        float own = 0.f, contrib = 0.f;
        if (in) {
            own = dstates[slot];
            dstates[slot] = run;
            contrib = run * states[slot];
        }
        const float total = block_sum(contrib, sums);
        if (threadIdx.x == 0) atomicAdd(ddecay + decay_at(s, b, h, c), total);
        run = own + decay[decay_at(s, b, h, c)] * run;
    }
    if (in && s.has_h0) dh0[hp] = run;
}

// Backward 3, grid (chunks, heads, batch): every input's gradient within chunk c, from its start
// state (states), the gradient of its own contribution (dstates after backward 2), the gradient
// of its decay (ddecay) and dy. Writes dx and ddt; adds into dA, dB and dC.
// With M_ij = (C_i . B_j) exp(cum_i - cum_j), E_ij = (dy_i . x_j) exp(cum_i - cum_j) (j <= i) and
// G the gradient of the chunk's own contribution:
//   q_j = sum_{i >= j} M_ij dy_i + exp(cum_last - cum_j) G B_j,  dx_j = dt_j q_j,
//   dB_j = dt_j (sum_{i >= j} E_ij C_i + exp(cum_last - cum_j) G^T x_j),
//   dC_i = sum_{j <= i} dt_j E_ij B_j + exp(cum_i) start^T dy_i,
// and dt_j gets x_j . q_j directly and A times the gradients of cum_m for m >= j.
template <typename T>
__device__ void chunk_bwd(const T* x, const T* dt, const T* A, const T* B, const T* C, const T* dy,
                          const float* states, const float* dstates, const float* ddecay, float* dx, float* ddt,
                          float* dA, float* dB, float* dC, SsdArgs s) {
    __shared__ float dts[CHUNK], cum[CHUNK], cumdt[CHUNK];
    __shared__ float M[CHUNK * CHUNK], E[CHUNK * CHUNK];
    __shared__ float ut[CHUNK][TILE + 1], vt[CHUNK][TILE + 1];
    // Per step m, the parts of d cum_m: diagonal terms where m is the output (row) or the input
    // (col), the carried-state term (carried) and the own-contribution term (owned); and x_m . q_m.
    __shared__ float row[CHUNK], col[CHUNK], carried[CHUNK], owned[CHUNK], xq[CHUNK];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (s.heads / s.groups), P = s.headdim, N = s.state;
    const int steps = min(CHUNK, s.len - c * CHUNK);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const float a = to_f32(A[h]);
    const ChunkRows<T> X{x, s, b, c, s.heads, h, P}, DY{dy, s, b, c, s.heads, h, P};
    const ChunkRows<T> Bv{B, s, b, c, s.groups, g, N}, Cv{C, s, b, c, s.groups, g, N};
    const float* start = states + state_at(s, b, c, h);
    const float* G = dstates + state_at(s, b, c, h);

    chunk_steps(dt, a, s, b, c, h, dts, cum, cumdt);
    for (int i = threadIdx.x; i < CHUNK; i += blockDim.x) row[i] = col[i] = carried[i] = owned[i] = xq[i] = 0.f;
    float cb[PAIRS], dyx[PAIRS];
    gram(Cv, Bv, N, ut, vt, cb);
    gram(DY, X, P, ut, vt, dyx);
    {
        const int j = pair_col();
        for (int q = 0; q < PAIRS; ++q) {
            const int i = pair_row(q);
            const bool in = j <= i && i < steps;
            const float decay = in ? expf(cum[i] - cum[j]) : 0.f;
            M[i * CHUNK + j] = cb[q] * decay;
            E[i * CHUNK + j] = dyx[q] * decay;
            const float term = cb[q] * decay * dts[j] * dyx[q];  // d y-term / d cum_i, minus d / d cum_j
            const float row_sum = warp_sum(term);                // the warp shares i
            if (lane == 0) atomicAdd(&row[i], row_sum);
            if (in) atomicAdd(&col[j], term);
        }
    }
    __syncthreads();
    // Warp per step j, lanes over headdim: dx, and x_j . q_j and the own term by warp sums.
    for (int j = warp; j < steps; j += warps) {
        const float to_end = expf(cum[CHUNK - 1] - cum[j]);
        float x_q = 0.f, own = 0.f;
        for (int p = lane; p < P; p += 32) {
            float q = 0.f, gb = 0.f;
            for (int i = j; i < steps; ++i) q += M[i * CHUNK + j] * DY(i, p);
            for (int n = 0; n < N; ++n) gb += Bv(j, n) * G[n * P + p];
            const float q_own = to_end * gb;
            q += q_own;
            const float xv = X(j, p);
            dx[at(s, b, c * CHUNK + j, s.heads, h, P, p)] = dts[j] * q;
            x_q += xv * q;
            own += dts[j] * xv * q_own;
        }
        x_q = warp_sum(x_q);
        own = warp_sum(own);
        if (lane == 0) {
            xq[j] = x_q;
            owned[j] = own;
        }
    }
    // dB and dC, the state indices in blocks of CHUNK: pairs (step, state index) with the
    // state's gradient G and the start state as the other side of a `gram`.
    for (int n0 = 0; n0 < N; n0 += CHUNK) {
        auto state_rows = [&](const float* m) {
            return [=](int r, int p) { return n0 + r < N ? m[(n0 + r) * P + p] : 0.f; };
        };
        float x_g[PAIRS], dy_start[PAIRS];
        gram(X, state_rows(G), P, ut, vt, x_g);
        gram(DY, state_rows(start), P, ut, vt, dy_start);
        const int n = n0 + pair_col();
        for (int q = 0; q < PAIRS; ++q) {
            const int i = pair_row(q);  // the warp shares i: the step of dB (as j) and of dC
            float carry = 0.f;
            if (i < steps && n < N) {
                float from_y = 0.f, within = 0.f;
                for (int k = i; k < steps; ++k) from_y += Cv(k, n) * E[k * CHUNK + i];
                for (int j = 0; j <= i; ++j) within += dts[j] * E[i * CHUNK + j] * Bv(j, n);
                const float db = dts[i] * (from_y + expf(cum[CHUNK - 1] - cum[i]) * x_g[q]);
                const float from_start = expf(cum[i]) * dy_start[q];
                atomicAdd(dB + at(s, b, c * CHUNK + i, s.groups, g, N, n), db);
                atomicAdd(dC + at(s, b, c * CHUNK + i, s.groups, g, N, n), within + from_start);
                carry = Cv(i, n) * from_start;
            }
            carry = warp_sum(carry);
            if (lane == 0) atomicAdd(&carried[i], carry);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // cum_last scales every own contribution and the chunk's decay.
        float last = ddecay[decay_at(s, b, h, c)] * expf(cum[CHUNK - 1]);
        for (int j = 0; j < CHUNK; ++j) last += owned[j];
        float below = 0.f, da = 0.f;  // below: sum of d cum_m over m >= the current step
        for (int m = CHUNK - 1; m >= 0; --m) {
            const float dcum = row[m] - col[m] + carried[m] - owned[m] + (m == CHUNK - 1 ? last : 0.f);
            below += dcum;
            da += dcum * cumdt[m];
            if (m < steps) ddt[at(s, b, c * CHUNK + m, s.heads, h, 1, 0)] = xq[m] + a * below;
        }
        atomicAdd(dA + h, da);
    }
}

// Each kernel in f32 and bf16. Launch: `ssd_state_pass*` on grid (ceil(state x headdim /
// THREADS), heads, batch), the others on (chunks, heads, batch); THREADS threads per block.
#define SSD_KERNELS(T, SUFFIX)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        ssd_chunk_state_##SUFFIX(const T* x, const T* dt, const T* A, const T* B, float* states, float* decay,    \
                                 SsdArgs s) {                                                                    \
        chunk_state<T>(x, dt, A, B, states, decay, s);                                                           \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        ssd_state_pass_##SUFFIX(const T* h0, float* states, const float* decay, T* last, SsdArgs s) {            \
        state_pass<T>(h0, states, decay, last, s);                                                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        ssd_chunk_out_##SUFFIX(const T* x, const T* dt, const T* A, const T* B, const T* C, const float* states, \
                               T* y, SsdArgs s) {                                                                \
        chunk_out<T>(x, dt, A, B, C, states, y, s);                                                              \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        ssd_chunk_dstate_##SUFFIX(const T* dt, const T* A, const T* C, const T* dy, float* dstates, SsdArgs s) { \
        chunk_dstate<T>(dt, A, C, dy, dstates, s);                                                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        ssd_state_pass_bwd_##SUFFIX(const float* states, const float* decay, const T* dlast, float* dstates,     \
                                    float* ddecay, float* dh0, SsdArgs s) {                                      \
        state_pass_bwd<T>(states, decay, dlast, dstates, ddecay, dh0, s);                                        \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                        \
        ssd_chunk_bwd_##SUFFIX(const T* x, const T* dt, const T* A, const T* B, const T* C, const T* dy,         \
                               const float* states, const float* dstates, const float* ddecay, float* dx,        \
                               float* ddt, float* dA, float* dB, float* dC, SsdArgs s) {                         \
        chunk_bwd<T>(x, dt, A, B, C, dy, states, dstates, ddecay, dx, ddt, dA, dB, dC, s);                       \
    }

SSD_KERNELS(float, f32)
SSD_KERNELS(bf16, bf16)
