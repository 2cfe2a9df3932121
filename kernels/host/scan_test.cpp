// kernels/selective_scan.cu run on the CPU (cuda_host.h) against the recurrence in double: the
// forward pass (y and the last state, f32 and bf16) and every gradient of the backward pass (f32)
// against central differences, over lengths around the kernel's 1024-step chunk.
//
//   g++ -std=c++20 -O2 -pthread kernels/host/scan_test.cpp -o scan_test && ./scan_test

#include "cuda_host.h"
// clang-format off
#include "../common.cuh"
#include "../selective_scan.cu"
// clang-format on
#include "check.h"


struct Case {
    int batch, dim, len, state, groups;
    bool d, bias, h0, softplus;
};

// The op's inputs in double, holding values representable in the kernel's element type.
struct Inputs {
    std::vector<double> u, delta, A, B, C, D, bias, h0;

    // [A | B | C | D? | bias? | h0?], as the op packs them.
    std::vector<double> pack(const Case& k) const {
        std::vector<double> p;
        for (const auto* part : {&A, &B, &C}) p.insert(p.end(), part->begin(), part->end());
        if (k.d) p.insert(p.end(), D.begin(), D.end());
        if (k.bias) p.insert(p.end(), bias.begin(), bias.end());
        if (k.h0) p.insert(p.end(), h0.begin(), h0.end());
        return p;
    }
};

// [y (batch, dim, len) | last state (batch, dim, state)] of h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,
// y_t = C_t . h_t + D u_t, with dt = softplus(delta + bias); in double.
std::vector<double> reference(const Case& k, const Inputs& in) {
    const int L = k.len, N = k.state;
    std::vector<double> out((size_t)k.batch * k.dim * (L + N));
    double* last = out.data() + (size_t)k.batch * k.dim * L;
    for (int b = 0; b < k.batch; ++b)
        for (int d = 0; d < k.dim; ++d) {
            const int g = d / (k.dim / k.groups);
            const size_t row = (size_t)b * k.dim + d, bc = ((size_t)b * k.groups + g) * N * L;
            for (int t = 0; t < L; ++t) out[row * L + t] = k.d ? in.D[d] * in.u[row * L + t] : 0.0;
            for (int n = 0; n < N; ++n) {
                double s = k.h0 ? in.h0[row * N + n] : 0.0;
                for (int t = 0; t < L; ++t) {
                    const double x = in.delta[row * L + t] + (k.bias ? in.bias[d] : 0.0);
                    const double dt = k.softplus ? std::log1p(std::exp(x)) : x;
                    s = std::exp(dt * in.A[d * N + n]) * s + dt * in.B[bc + n * L + t] * in.u[row * L + t];
                    out[row * L + t] += in.C[bc + n * L + t] * s;
                }
                last[row * N + n] = s;
            }
        }
    return out;
}

template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
    static constexpr auto fwd = selective_scan_fwd_f32;
    static constexpr auto bwd = selective_scan_bwd_f32;
};
template <>
struct Kernels<bf16> {
    static constexpr auto fwd = selective_scan_fwd_bf16;
    static constexpr auto bwd = selective_scan_bwd_bf16;
};

template <typename T>
void check(const Case& k, std::mt19937& rng, bool gradients) {
    const int L = k.len, N = k.state, chunks = (L + CHUNK - 1) / CHUNK;
    auto unit = [&](size_t n) { return uniform<T>(rng, n, -1.0, 1.0); };
    const size_t rows = (size_t)k.batch * k.dim, bc = (size_t)k.batch * k.groups * N * L;
    Inputs in{unit(rows * L), uniform<T>(rng, rows * L, -2.0, 0.5), uniform<T>(rng, (size_t)k.dim * N, 0.2, 1.5),
              unit(bc),       unit(bc),                             unit(k.dim),
              unit(k.dim),    unit(rows * N)};
    for (auto& a : in.A) a = -a;
    if (!k.softplus) {  // delta + bias is the step itself: keep it positive
        for (auto& x : in.delta) x = to_f32(from_f64<T>(0.05 + 0.1 * (x + 2.0)));
        for (auto& x : in.bias) x = to_f32(from_f64<T>(0.05 * (x + 1.0)));
    }
    const std::vector<double> want = reference(k, in);

    const ScanArgs s{k.batch, k.dim, L, N, k.groups, k.d, k.bias, k.h0, k.softplus};
    const std::vector<T> u = to_device<T>(in.u), delta = to_device<T>(in.delta), pack = to_device<T>(in.pack(k));
    std::vector<T> out(want.size());
    std::vector<float> checkpoints(rows * chunks * N);
    const dim3 grid{(unsigned)k.dim, (unsigned)k.batch}, block{THREADS};
    launch(grid, block, Kernels<T>::fwd, u.data(), delta.data(), pack.data(), out.data(), checkpoints.data(), s);
    char name[96];
    std::snprintf(name, sizeof name, "%s batch %d dim %d len %4d state %d groups %d D %d bias %d h0 %d softplus %d",
                  sizeof(T) == 4 ? "f32 " : "bf16", k.batch, k.dim, L, N, k.groups, k.d, k.bias, k.h0, k.softplus);
    expect(std::string(name) + "  y | last", to_host(out), want, sizeof(T) == 4 ? 2e-5 : 1e-2);
    if (!gradients) return;

    const std::vector<double> w = unit(want.size());  // loss = sum(w [y | last])
    const std::vector<T> grad = to_device<T>(w);
    std::vector<float> du(in.u.size()), ddelta(in.delta.size()), dpack(pack.size());
    launch(grid, block, Kernels<T>::bwd, u.data(), delta.data(), pack.data(), (const float*)checkpoints.data(),
           grad.data(), du.data(), ddelta.data(), dpack.data(), s);
    auto loss = [&] {
        const std::vector<double> o = reference(k, in);
        double total = 0.0;
        for (size_t i = 0; i < o.size(); ++i) total += w[i] * o[i];
        return total;
    };
    const double tol = 2e-5;
    expect(std::string(name) + "  du", widen(du), numeric_grad(in.u, loss), tol);
    expect(std::string(name) + "  ddelta", widen(ddelta), numeric_grad(in.delta, loss), tol);
    // The pack's gradient, part by part in pack order.
    std::vector<double> want_pack;
    for (auto* part : {&in.A, &in.B, &in.C}) {
        const auto g = numeric_grad(*part, loss);
        want_pack.insert(want_pack.end(), g.begin(), g.end());
    }
    for (auto [on, part] : {std::pair{k.d, &in.D}, {k.bias, &in.bias}, {k.h0, &in.h0}})
        if (on) {
            const auto g = numeric_grad(*part, loss);
            want_pack.insert(want_pack.end(), g.begin(), g.end());
        }
    expect(std::string(name) + "  dpack", widen(dpack), want_pack, tol);
}

int main() {
    std::mt19937 rng(11);
    const Case cases[] = {
        {1, 2, 1, 3, 1, true, true, true, true},     {2, 3, 37, 4, 3, false, false, false, false},
        {1, 4, 1024, 2, 2, true, false, true, true}, {1, 2, 1025, 3, 1, false, true, false, true},
        {2, 2, 2100, 2, 1, true, true, true, false},
    };
    for (const Case& k : cases) check<float>(k, rng, true);
    for (const Case& k : {cases[1], cases[3]}) check<bf16>(k, rng, false);
    return report();
}
