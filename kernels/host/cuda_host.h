// Runs the CUDA kernel sources of kernels/ on the CPU, for tests on machines without a GPU
// (kernels/host/*_test.cpp, run by .ci/run). Every CUDA thread of a block is a std::thread;
// blocks run one after another, so `__shared__` can be a function-level static. __syncthreads
// is a barrier over the block, warp shuffles pass values through a per-warp slot between two
// barriers over the warp, atomicAdd is std::atomic_ref. Slow, but it executes the kernels' own
// code paths: indexing, barriers, shuffles, atomics.
//
// Limits: all threads of a warp must take part in a shuffle (as the kernels do); a thread that
// returns early leaves the barriers (arrive_and_drop), as an exited CUDA thread does.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

using std::max;
using std::min;

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

namespace host {
struct Warp {
    std::barrier<> bar{32};
    float slot[32];
};
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<Warp>> warps;

// The value `v` of lane `src` of the calling thread's warp.
inline float exchange(float v, int src) {
    Warp& w = *warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = v;
    w.bar.arrive_and_wait();
    const float r = w.slot[src];
    w.bar.arrive_and_wait();
    return r;
}
}  // namespace host

inline void __syncthreads() { host::block_barrier->arrive_and_wait(); }
inline void __syncwarp() { host::warps[threadIdx.x / 32]->bar.arrive_and_wait(); }
inline float __shfl_up_sync(unsigned, float v, int d) {
    const int lane = threadIdx.x % 32;
    return host::exchange(v, lane >= d ? lane - d : lane);
}
inline float __shfl_down_sync(unsigned, float v, int d) {
    const int lane = threadIdx.x % 32;
    return host::exchange(v, lane + d < 32 ? lane + d : lane);
}
inline float __shfl_xor_sync(unsigned, float v, int m) { return host::exchange(v, (threadIdx.x % 32) ^ m); }

// kernel<<<grid, block>>>(args...), blocks in order. blockDim.x must be a multiple of 32.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                host::block_barrier = std::make_unique<std::barrier<>>(block.x);
                host::warps.clear();
                for (unsigned w = 0; w < block.x / 32; ++w) host::warps.push_back(std::make_unique<host::Warp>());
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < block.x; ++t)
                    threads.emplace_back([=] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{x, y, z};
                        kernel(args...);
                        host::block_barrier->arrive_and_drop();
                        host::warps[t / 32]->bar.arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
            }
}
