// kernels/ssd.cu run on the CPU (cuda_host.h) against the recurrence in double: the forward
// pass (y and the last state, f32 and bf16) and every gradient of the backward pass (f32)
// against central differences of the double recurrence, over lengths around the chunk size.
//
//   g++ -std=c++20 -O2 -pthread kernels/host/ssd_test.cpp -o ssd_test && ./ssd_test

#include "cuda_host.h"
// clang-format off
#include "../common.cuh"
#include "../ssd.cu"
// clang-format on
#include "check.h"


struct Case {
    int batch, len, heads, headdim, groups, state;
    bool h0;
};

// Inputs in double holding f32 (or bf16) values, so kernel and reference read the same numbers.
struct Inputs {
    std::vector<double> x, dt, A, B, C, h0;
};

struct Outputs {
    std::vector<double> y, last;
};

// h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, per head; in double.
Outputs reference(const Case& k, const Inputs& in) {
    const int L = k.len, H = k.heads, P = k.headdim, N = k.state, G = k.groups;
    Outputs out{std::vector<double>((size_t)k.batch * L * H * P), std::vector<double>((size_t)k.batch * H * P * N)};
    for (int b = 0; b < k.batch; ++b)
        for (int h = 0; h < H; ++h) {
            const int g = h / (H / G);
            for (int p = 0; p < P; ++p)
                for (int n = 0; n < N; ++n) {
                    const size_t hp = (((size_t)b * H + h) * P + p) * N + n;
                    double s = k.h0 ? in.h0[hp] : 0.0;
                    for (int t = 0; t < L; ++t) {
                        const size_t bt = (size_t)b * L + t;
                        const double dt = in.dt[bt * H + h];
                        s = std::exp(dt * in.A[h]) * s + dt * in.x[(bt * H + h) * P + p] * in.B[(bt * G + g) * N + n];
                        out.y[(bt * H + h) * P + p] += s * in.C[(bt * G + g) * N + n];
                    }
                    out.last[hp] = s;
                }
        }
    return out;
}

double loss(const Case& k, const Inputs& in, const std::vector<double>& wy, const std::vector<double>& wl) {
    const Outputs o = reference(k, in);
    double total = 0.0;
    for (size_t i = 0; i < wy.size(); ++i) total += wy[i] * o.y[i];
    for (size_t i = 0; i < wl.size(); ++i) total += wl[i] * o.last[i];
    return total;
}

// The kernels' launch sequence, as crates/mamba-ssm/src/cuda.rs issues it.
template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
    static constexpr auto chunk_state = ssd_chunk_state_f32;
    static constexpr auto state_pass = ssd_state_pass_f32;
    static constexpr auto chunk_out = ssd_chunk_out_f32;
    static constexpr auto chunk_dstate = ssd_chunk_dstate_f32;
    static constexpr auto state_pass_bwd = ssd_state_pass_bwd_f32;
    static constexpr auto chunk_bwd = ssd_chunk_bwd_f32;
};
template <>
struct Kernels<bf16> {
    static constexpr auto chunk_state = ssd_chunk_state_bf16;
    static constexpr auto state_pass = ssd_state_pass_bf16;
    static constexpr auto chunk_out = ssd_chunk_out_bf16;
    static constexpr auto chunk_dstate = ssd_chunk_dstate_bf16;
    static constexpr auto state_pass_bwd = ssd_state_pass_bwd_bf16;
    static constexpr auto chunk_bwd = ssd_chunk_bwd_bf16;
};

template <typename T>
void check(const Case& k, std::mt19937& rng, bool gradients) {
    const int L = k.len, H = k.heads, P = k.headdim, N = k.state, G = k.groups;
    const int chunks = (L + CHUNK - 1) / CHUNK;
    auto unit = [&](size_t n) { return uniform<T>(rng, n, -1.0, 1.0); };
    Inputs in{unit((size_t)k.batch * L * H * P), uniform<T>(rng, (size_t)k.batch * L * H, 0.01, 0.3),
              uniform<T>(rng, H, 0.5, 2.0),      unit((size_t)k.batch * L * G * N),
              unit((size_t)k.batch * L * G * N), unit((size_t)k.batch * H * P * N)};
    for (auto& a : in.A) a = -a;
    const Outputs want = reference(k, in);

    const SsdArgs s{k.batch, L, H, P, G, N, chunks, k.h0};
    const std::vector<T> x = to_device<T>(in.x), dt = to_device<T>(in.dt), A = to_device<T>(in.A), B = to_device<T>(in.B),
                         C = to_device<T>(in.C), h0 = to_device<T>(in.h0);
    const size_t state_len = (size_t)k.batch * chunks * H * N * P;
    std::vector<float> states(state_len), decays((size_t)k.batch * H * chunks);
    std::vector<T> y(want.y.size()), last(want.last.size());
    const dim3 per_chunk{(unsigned)chunks, (unsigned)H, (unsigned)k.batch}, block{THREADS};
    const dim3 per_element{(unsigned)((N * P + THREADS - 1) / THREADS), (unsigned)H, (unsigned)k.batch};
    using K = Kernels<T>;
    launch(per_chunk, block, K::chunk_state, x.data(), dt.data(), A.data(), B.data(), states.data(), decays.data(), s);
    launch(per_element, block, K::state_pass, h0.data(), states.data(), (const float*)decays.data(), last.data(), s);
    launch(per_chunk, block, K::chunk_out, x.data(), dt.data(), A.data(), B.data(), C.data(),
           (const float*)states.data(), y.data(), s);
    char name[96];
    std::snprintf(name, sizeof name, "%s batch %d len %4d heads %d headdim %d groups %d state %2d h0 %d",
                  sizeof(T) == 4 ? "f32 " : "bf16", k.batch, L, H, P, G, N, k.h0);
    auto expect_named = [&](const char* what, const std::vector<double>& got, const std::vector<double>& want,
                            double tol) { expect(std::string(name) + "  " + what, got, want, tol); };
    const double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
    expect_named("y", to_host(y), want.y, tol);
    expect_named("last", to_host(last), want.last, tol);
    if (!gradients) return;

    // d loss for loss = sum(wy y) + sum(wl last): dy = wy, d last = wl.
    const std::vector<double> wy = unit(want.y.size()), wl = unit(want.last.size());
    const std::vector<T> dy = to_device<T>(wy), dlast = to_device<T>(wl);
    std::vector<float> dstates(state_len), ddecay(decays.size()), dh0(in.h0.size()), dx(in.x.size()),
        ddt(in.dt.size()), dA(H), dB(in.B.size()), dC(in.C.size());
    launch(per_chunk, block, K::chunk_dstate, dt.data(), A.data(), C.data(), dy.data(), dstates.data(), s);
    launch(per_element, block, K::state_pass_bwd, (const float*)states.data(), (const float*)decays.data(),
           dlast.data(), dstates.data(), ddecay.data(), dh0.data(), s);
    launch(per_chunk, block, K::chunk_bwd, x.data(), dt.data(), A.data(), B.data(), C.data(), dy.data(),
           (const float*)states.data(), (const float*)dstates.data(), (const float*)ddecay.data(), dx.data(),
           ddt.data(), dA.data(), dB.data(), dC.data(), s);

    auto numeric = [&](std::vector<double>& v) { return numeric_grad(v, [&] { return loss(k, in, wy, wl); }); };
    const double gtol = 1e-5;
    expect_named("dx", widen(dx), numeric(in.x), gtol);
    expect_named("ddt", widen(ddt), numeric(in.dt), gtol);
    expect_named("dA", widen(dA), numeric(in.A), gtol);
    expect_named("dB", widen(dB), numeric(in.B), gtol);
    expect_named("dC", widen(dC), numeric(in.C), gtol);
    if (k.h0) expect_named("dh0", widen(dh0), numeric(in.h0), gtol);
}

int main() {
    std::mt19937 rng(7);
    const Case cases[] = {
        {1, 1, 2, 3, 1, 4, false},    {2, 37, 4, 3, 2, 5, true},  {2, 64, 4, 3, 2, 5, false},
        {1, 65, 3, 2, 3, 4, true},    {2, 150, 4, 2, 1, 3, true}, {1, 70, 2, 8, 1, 40, true},  // state x headdim > THREADS
    };
    for (const Case& k : cases) check<float>(k, rng, true);
    for (const Case& k : {cases[1], cases[4]}) check<bf16>(k, rng, false);
    return report();
}
