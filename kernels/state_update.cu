// One decoding step of the state space models, the core of `selective_state_update` (Mamba-1)
// and `ssd_state_update` (Mamba-2) in crates/mamba-ssm/src/step.rs. As there, dt arrives with
// its bias, softplus and clamp applied, and the skip connection D and the gate silu(z) are
// applied afterwards by tensor ops: per state row
//   new[n] = decay[n] h[n] + dt x B[n],   y = sum_n new[n] C[n].
// One thread per row; rows of a step are few (batch x channels), so this is latency-bound by
// nature and simple on purpose.

struct StepArgs {
    int batch;
    int rows;     // Mamba-1: channels (dim); Mamba-2: heads x headdim
    int state;
    int groups;   // B / C groups
    int headdim;  // Mamba-2: rows per head (decay and dt shared by a head); Mamba-1: 1
};

// Mamba-1: h, new (batch, dim, state); x, dt (batch, dim); a (dim, state); b, c (batch, groups,
// state); y (batch, dim).
template <typename T>
__device__ void selective_step(const T* h, const T* x, const T* dt, const T* a, const T* b, const T* c, T* y,
                               T* new_h, StepArgs s) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)s.batch * s.rows) return;
    const int d = row % s.rows, bi = row / s.rows;
    const long long bc = ((long long)bi * s.groups + d / (s.rows / s.groups)) * s.state;
    const float dtv = to_f32(dt[row]), xdt = to_f32(x[row]) * dtv;
    float acc = 0.f;
    for (int n = 0; n < s.state; ++n) {
        const float decay = expf(dtv * to_f32(a[(long long)d * s.state + n]));
        const float v = decay * to_f32(h[row * s.state + n]) + xdt * to_f32(b[bc + n]);
        store(new_h + row * s.state + n, v);
        acc += v * to_f32(c[bc + n]);
    }
    store(y + row, acc);
}

// Mamba-2: h, new (batch, heads, headdim, state); x (batch, heads, headdim); dt (batch, heads);
// a (heads); b, c (batch, groups, state); y (batch, heads, headdim).
template <typename T>
__device__ void ssd_step(const T* h, const T* x, const T* dt, const T* a, const T* b, const T* c, T* y, T* new_h,
                         StepArgs s) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)s.batch * s.rows) return;
    const int heads = s.rows / s.headdim;
    const long long bh = row / s.headdim;  // (batch, head)
    const int head = bh % heads, bi = bh / heads;
    const long long bc = ((long long)bi * s.groups + head / (heads / s.groups)) * s.state;
    const float dtv = to_f32(dt[bh]), xdt = to_f32(x[row]) * dtv;
    const float decay = expf(dtv * to_f32(a[head]));
    float acc = 0.f;
    for (int n = 0; n < s.state; ++n) {
        const float v = decay * to_f32(h[row * s.state + n]) + xdt * to_f32(b[bc + n]);
        store(new_h + row * s.state + n, v);
        acc += v * to_f32(c[bc + n]);
    }
    store(y + row, acc);
}

#define STEP_KERNELS(T, suffix)                                                                      \
    extern "C" __global__ void selective_state_update_##suffix(const T* h, const T* x, const T* dt,  \
                                                               const T* a, const T* b, const T* c,  \
                                                               T* y, T* new_h, StepArgs s) {        \
        selective_step<T>(h, x, dt, a, b, c, y, new_h, s);                                           \
    }                                                                                                \
    extern "C" __global__ void ssd_state_update_##suffix(const T* h, const T* x, const T* dt,        \
                                                         const T* a, const T* b, const T* c, T* y,  \
                                                         T* new_h, StepArgs s) {                    \
        ssd_step<T>(h, x, dt, a, b, c, y, new_h, s);                                                 \
    }

STEP_KERNELS(float, f32)
STEP_KERNELS(bf16, bf16)
