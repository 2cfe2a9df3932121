// Causal depthwise conv1d with bias and optional SiLU, the conv of both mixers: forward,
// backward and the single-token update, for the `causal-conv1d` op of crates/mamba-ssm (CPU
// kernel and reference in conv.rs):
//   pre[b, c, t] = bias[c] + sum_j w[c, j] x[b, c, t + j - (width - 1)]   (x = 0 before t = 0)
//   y = silu(pre) or pre.
// x may be strided (a (batch, len, channels) tensor transposed in place): its element (b, c, t)
// is at b * sb + c * sc + t * st. Outputs are contiguous (batch, channels, len); gradients are
// f32.

struct ConvArgs {
    int batch, channels, len, width, silu;
    long long sb, sc, st;
};

template <typename T>
__device__ float pre_activation(const T* x, const T* w, const T* bias, const ConvArgs& s, int b, int c, int t) {
    float acc = to_f32(bias[c]);
    const T* xr = x + b * s.sb + c * s.sc;
    for (int j = 0; j < s.width; ++j) {
        const int ti = t + j - (s.width - 1);
        if (ti >= 0) acc += to_f32(w[c * s.width + j]) * to_f32(xr[ti * s.st]);
    }
    return acc;
}

// One thread per output element; grid covers batch x channels x len.
template <typename T>
__device__ void conv_fwd(const T* x, const T* w, const T* bias, T* y, ConvArgs s) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)s.batch * s.channels * s.len;
    if (i >= n) return;
    const int t = i % s.len, c = (i / s.len) % s.channels, b = i / ((long long)s.len * s.channels);
    const float p = pre_activation(x, w, bias, s, b, c, t);
    store(y + i, s.silu ? p * sigmoid(p) : p);
}

// d pre = g silu'(pre), recomputing pre; into `dpre` (f32, contiguous).
template <typename T>
__device__ void conv_bwd_pre(const T* x, const T* w, const T* bias, const T* g, float* dpre, ConvArgs s) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)s.batch * s.channels * s.len;
    if (i >= n) return;
    const float gi = to_f32(g[i]);
    if (!s.silu) {
        dpre[i] = gi;
        return;
    }
    const int t = i % s.len, c = (i / s.len) % s.channels, b = i / ((long long)s.len * s.channels);
    const float p = pre_activation(x, w, bias, s, b, c, t);
    const float sg = sigmoid(p);
    dpre[i] = gi * sg * (1.f + p * (1.f - sg));
}

// dx[b, c, t] = sum_j w[c, j] dpre[b, c, t + (width - 1) - j]; one thread per element.
template <typename T>
__device__ void conv_bwd_x(const T* w, const float* dpre, float* dx, ConvArgs s) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)s.batch * s.channels * s.len;
    if (i >= n) return;
    const int t = i % s.len, c = (i / s.len) % s.channels;
    const float* row = dpre + (i - t);
    float acc = 0.f;
    for (int j = 0; j < s.width; ++j) {
        const int to = t + (s.width - 1) - j;
        if (to < s.len) acc += to_f32(w[c * s.width + j]) * row[to];
    }
    dx[i] = acc;
}

// dw[c, j] = sum_{b, t} dpre[b, c, t] x[b, c, t + j - (width - 1)] and dbias[c] = sum dpre[b, c, .]:
// one block per channel, f32 outputs (width + 1 values per channel: the taps, then the bias).
template <typename T>
__device__ void conv_bwd_w(const T* x, const float* dpre, float* dwb, ConvArgs s) {
    __shared__ float sums[32];
    const int c = blockIdx.x;
    for (int j = 0; j <= s.width; ++j) {
        float acc = 0.f;
        for (long long i = threadIdx.x; i < (long long)s.batch * s.len; i += blockDim.x) {
            const int b = i / s.len, t = i % s.len;
            const float dp = dpre[((long long)b * s.channels + c) * s.len + t];
            if (j == s.width) {
                acc += dp;
            } else {
                const int ti = t + j - (s.width - 1);
                if (ti >= 0) acc += dp * to_f32(x[b * s.sb + c * s.sc + ti * s.st]);
            }
        }
        const float total = block_sum(acc, sums);
        if (threadIdx.x == 0) dwb[c * (s.width + 1) + j] = total;
    }
}

// One decoding step: state (batch, channels, width) shifts left and takes x (batch, channels);
// y = act(sum_j w[c, j] new_state[b, c, j] + bias). One thread per (batch, channel).
template <typename T>
__device__ void conv_update(const T* state, const T* x, const T* w, const T* bias, T* y, T* new_state, ConvArgs s) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)s.batch * s.channels) return;
    const int c = i % s.channels;
    float acc = to_f32(bias[c]);
    for (int j = 0; j < s.width; ++j) {
        const float v = j + 1 < s.width ? to_f32(state[i * s.width + j + 1]) : to_f32(x[i]);
        acc += to_f32(w[c * s.width + j]) * v;
        store(new_state + i * s.width + j, v);
    }
    store(y + i, s.silu ? acc * sigmoid(acc) : acc);
}

#define CONV_KERNELS(T, suffix)                                                                         \
    extern "C" __global__ void causal_conv1d_fwd_##suffix(const T* x, const T* w, const T* bias, T* y,  \
                                                          ConvArgs s) {                                 \
        conv_fwd<T>(x, w, bias, y, s);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void causal_conv1d_bwd_pre_##suffix(const T* x, const T* w, const T* bias,    \
                                                              const T* g, float* dpre, ConvArgs s) {    \
        conv_bwd_pre<T>(x, w, bias, g, dpre, s);                                                        \
    }                                                                                                   \
    extern "C" __global__ void causal_conv1d_bwd_x_##suffix(const T* w, const float* dpre, float* dx,   \
                                                            ConvArgs s) {                               \
        conv_bwd_x<T>(w, dpre, dx, s);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void causal_conv1d_bwd_w_##suffix(const T* x, const float* dpre, float* dwb,  \
                                                            ConvArgs s) {                               \
        conv_bwd_w<T>(x, dpre, dwb, s);                                                                 \
    }                                                                                                   \
    extern "C" __global__ void causal_conv1d_update_##suffix(const T* state, const T* x, const T* w,    \
                                                             const T* bias, T* y, T* new_state,         \
                                                             ConvArgs s) {                              \
        conv_update<T>(state, x, w, bias, y, new_state, s);                                             \
    }

CONV_KERNELS(float, f32)
CONV_KERNELS(bf16, bf16)
