// Helpers of the kernel tests in kernels/host: conversions between the test's double values and
// the kernels' element types, central differences, and the pass / fail line of each check.
// Include after the kernel sources (it uses their `store` and `to_f32`).
#pragma once

#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

template <typename T>
T from_f64(double v) {
    T t;
    store(&t, (float)v);
    return t;
}

template <typename T>
std::vector<T> to_device(const std::vector<double>& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = from_f64<T>(v[i]);
    return out;
}

template <typename T>
std::vector<double> to_host(const std::vector<T>& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = to_f32(v[i]);
    return out;
}

// n values uniform in [lo, hi), each representable in T, so that the kernel (reading T) and the
// double reference see the same numbers.
template <typename T>
std::vector<double> uniform(std::mt19937& rng, size_t n, double lo, double hi) {
    std::uniform_real_distribution<double> dist(lo, hi);
    std::vector<double> v(n);
    for (auto& e : v) e = to_f32(from_f64<T>(dist(rng)));
    return v;
}

inline int failures = 0;

// Passes when max |got - want| <= tol * max(max |want|, 1e-3); any NaN or infinity fails.
inline void expect(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                   double tol) {
    double err = 0.0, scale = 1e-3;
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs(got[i] - want[i]);
        err = std::isfinite(e) ? std::max(err, e) : INFINITY;
        scale = std::max(scale, std::fabs(want[i]));
    }
    const bool ok = got.size() == want.size() && err <= tol * scale;
    failures += !ok;
    std::printf("%-4s %s  rel err %.2e\n", ok ? "ok" : "FAIL", what.c_str(), err / scale);
}

// d loss / d v by central differences, v changed in place and restored.
inline std::vector<double> numeric_grad(std::vector<double>& v, const std::function<double()>& loss) {
    std::vector<double> g(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        const double keep = v[i], eps = 1e-6;
        v[i] = keep + eps;
        const double up = loss();
        v[i] = keep - eps;
        g[i] = (up - loss()) / (2 * eps);
        v[i] = keep;
    }
    return g;
}

inline std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

inline int report() {
    std::printf(failures ? "%d checks FAILED\n" : "all checks passed\n", failures);
    return failures ? 1 : 0;
}
