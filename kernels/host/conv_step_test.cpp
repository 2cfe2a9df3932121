// kernels/causal_conv1d.cu and kernels/state_update.cu run on the CPU (cuda_host.h) against
// plain loops in double: the conv's forward pass from a strided (transposed) input and its
// gradients against central differences, its decode update, and both decode steps.
//
//   g++ -std=c++20 -O2 -pthread kernels/host/conv_step_test.cpp -o conv_step_test && ./conv_step_test

#include "cuda_host.h"
// clang-format off
#include "../common.cuh"
#include "../causal_conv1d.cu"
#include "../state_update.cu"
// clang-format on
#include "check.h"


std::mt19937 rng(5);

// Values in [lo, hi) that f32 holds exactly.
std::vector<double> random(size_t n, double lo = -1.0, double hi = 1.0) { return uniform<float>(rng, n, lo, hi); }

double silu(double p) { return p / (1.0 + std::exp(-p)); }

const dim3 block{256};
dim3 elementwise(size_t n) { return dim3{(unsigned)((n + 255) / 256)}; }

// x is held as (batch, len, channels) and read as its (batch, channels, len) transpose.
void check_conv(int batch, int channels, int len, int width, bool act) {
    std::vector<double> x = random((size_t)batch * len * channels), w = random((size_t)channels * width),
                        bias = random(channels);
    const size_t n = (size_t)batch * channels * len;
    auto forward = [&] {  // y (batch, channels, len)
        std::vector<double> y(n);
        for (int b = 0; b < batch; ++b)
            for (int c = 0; c < channels; ++c)
                for (int t = 0; t < len; ++t) {
                    double p = bias[c];
                    for (int j = 0; j < width; ++j) {
                        const int ti = t + j - (width - 1);
                        if (ti >= 0) p += w[c * width + j] * x[((size_t)b * len + ti) * channels + c];
                    }
                    y[((size_t)b * channels + c) * len + t] = act ? silu(p) : p;
                }
        return y;
    };
    const ConvArgs s{batch, channels, len, width, act, (long long)len * channels, 1, channels};
    const std::vector<float> xf = to_device<float>(x), wf = to_device<float>(w), bf = to_device<float>(bias);
    std::vector<float> y(n);
    launch(elementwise(n), block, causal_conv1d_fwd_f32, xf.data(), wf.data(), bf.data(), y.data(), s);
    char name[80];
    std::snprintf(name, sizeof name, "conv batch %d channels %d len %3d width %d silu %d", batch, channels, len,
                  width, act);
    expect(std::string(name) + "  y", widen(y), forward(), 1e-6);

    const std::vector<double> wy = random(n);
    const std::vector<float> g = to_device<float>(wy);
    std::vector<float> dpre(n), dx(n), dwb((size_t)channels * (width + 1));
    launch(elementwise(n), block, causal_conv1d_bwd_pre_f32, xf.data(), wf.data(), bf.data(), g.data(), dpre.data(),
           s);
    launch(elementwise(n), block, causal_conv1d_bwd_x_f32, wf.data(), (const float*)dpre.data(), dx.data(), s);
    launch(dim3{(unsigned)channels}, block, causal_conv1d_bwd_w_f32, xf.data(), (const float*)dpre.data(),
           dwb.data(), s);
    auto loss = [&] {
        const std::vector<double> out = forward();
        double total = 0.0;
        for (size_t i = 0; i < n; ++i) total += wy[i] * out[i];
        return total;
    };
    // dx comes out as (batch, channels, len); the numeric gradient is x's own (batch, len, channels).
    const std::vector<double> want_dx = numeric_grad(x, loss);
    std::vector<double> got_dx(n);
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < channels; ++c)
            for (int t = 0; t < len; ++t)
                got_dx[((size_t)b * len + t) * channels + c] = dx[((size_t)b * channels + c) * len + t];
    expect(std::string(name) + "  dx", got_dx, want_dx, 1e-5);
    const std::vector<double> dw = numeric_grad(w, loss), dbias = numeric_grad(bias, loss);
    std::vector<double> want_dwb;
    for (int c = 0; c < channels; ++c) {
        want_dwb.insert(want_dwb.end(), dw.begin() + c * width, dw.begin() + (c + 1) * width);
        want_dwb.push_back(dbias[c]);
    }
    expect(std::string(name) + "  dw | dbias", widen(dwb), want_dwb, 1e-5);
}

void check_conv_update(int batch, int channels, int width, bool act) {
    const std::vector<double> state = random((size_t)batch * channels * width), x = random((size_t)batch * channels),
                              w = random((size_t)channels * width), bias = random(channels);
    const size_t rows = (size_t)batch * channels;
    std::vector<double> want_y(rows), want_state(state.size());
    for (size_t r = 0; r < rows; ++r) {
        const int c = r % channels;
        double acc = bias[c];
        for (int j = 0; j < width; ++j) {
            const double v = j + 1 < width ? state[r * width + j + 1] : x[r];
            want_state[r * width + j] = v;
            acc += w[c * width + j] * v;
        }
        want_y[r] = act ? silu(acc) : acc;
    }
    const ConvArgs s{batch, channels, 1, width, act, 0, 0, 0};
    const auto sf = to_device<float>(state), xf = to_device<float>(x), wf = to_device<float>(w),
               bf = to_device<float>(bias);
    std::vector<float> y(rows), new_state(state.size());
    launch(elementwise(rows), block, causal_conv1d_update_f32, sf.data(), xf.data(), wf.data(), bf.data(), y.data(),
           new_state.data(), s);
    char name[80];
    std::snprintf(name, sizeof name, "conv update batch %d channels %d width %d silu %d", batch, channels, width, act);
    expect(std::string(name) + "  y", widen(y), want_y, 1e-6);
    expect(std::string(name) + "  state", widen(new_state), want_state, 0.0);
}

template <typename T>
auto step_kernel(bool ssd) {
    if constexpr (sizeof(T) == 4)
        return ssd ? ssd_state_update_f32 : selective_state_update_f32;
    else
        return ssd ? ssd_state_update_bf16 : selective_state_update_bf16;
}

// Mamba-1 (headdim 0: a per channel and state index) or Mamba-2 (a per head of `headdim` rows).
template <typename T>
void check_step(int batch, int rows, int state, int groups, int headdim) {
    const bool ssd = headdim > 0;
    const int per_dt = ssd ? headdim : 1, heads = rows / per_dt;
    auto values = [&](size_t n, double lo = -1.0, double hi = 1.0) { return uniform<T>(rng, n, lo, hi); };
    const std::vector<double> h = values((size_t)batch * rows * state), x = values((size_t)batch * rows),
                              dt = values((size_t)batch * heads, 0.01, 0.5),
                              a = values(ssd ? heads : (size_t)rows * state, -2.0, -0.2),
                              b = values((size_t)batch * groups * state), c = values((size_t)batch * groups * state);
    std::vector<double> want_y((size_t)batch * rows), want_h(h.size());
    for (int bi = 0; bi < batch; ++bi)
        for (int r = 0; r < rows; ++r) {
            const size_t row = (size_t)bi * rows + r, bh = (size_t)bi * heads + r / per_dt;
            const int g = (r / per_dt) / (heads / groups);
            double acc = 0.0;
            for (int n = 0; n < state; ++n) {
                const double an = ssd ? a[r / per_dt] : a[(size_t)r * state + n];
                const size_t bc = ((size_t)bi * groups + g) * state + n;
                const double v = std::exp(dt[bh] * an) * h[row * state + n] + dt[bh] * x[row] * b[bc];
                want_h[row * state + n] = v;
                acc += v * c[bc];
            }
            want_y[row] = acc;
        }
    const StepArgs s{batch, rows, state, groups, ssd ? headdim : 1};
    const auto hd = to_device<T>(h), xd = to_device<T>(x), dtd = to_device<T>(dt), ad = to_device<T>(a),
               bd = to_device<T>(b), cd = to_device<T>(c);
    std::vector<T> y(want_y.size()), new_h(h.size());
    launch(elementwise(want_y.size()), block, step_kernel<T>(ssd),
           hd.data(), xd.data(), dtd.data(), ad.data(), bd.data(), cd.data(), y.data(), new_h.data(), s);
    char name[96];
    std::snprintf(name, sizeof name, "%s step %s batch %d rows %d state %d groups %d", ssd ? "Mamba-2" : "Mamba-1",
                  sizeof(T) == 4 ? "f32 " : "bf16", batch, rows, state, groups);
    const double tol = sizeof(T) == 4 ? 1e-6 : 1e-2;
    expect(std::string(name) + "  y", to_host(y), want_y, tol);
    expect(std::string(name) + "  state", to_host(new_h), want_h, tol);
}

int main() {
    for (auto [batch, channels, len, width, act] :
         {std::tuple{1, 3, 1, 4, true}, {2, 5, 37, 4, true}, {2, 4, 300, 3, false}, {1, 2, 5, 1, true}})
        check_conv(batch, channels, len, width, act);
    for (auto [batch, channels, width, act] : {std::tuple{1, 1, 1, true}, {2, 5, 4, true}, {3, 300, 3, false}})
        check_conv_update(batch, channels, width, act);
    // (batch, rows, state, groups, headdim)
    check_step<float>(1, 3, 1, 1, 0);
    check_step<float>(2, 300, 16, 2, 0);
    check_step<bf16>(2, 6, 16, 2, 0);
    check_step<float>(1, 1, 1, 1, 1);
    check_step<float>(2, 4 * 75, 16, 2, 75);
    check_step<bf16>(2, 12, 16, 2, 3);
    return report();
}
