// Shared by the kernels: element types, block scans of the linear recurrence, reductions.
//
// Every kernel file is compiled alone by NVRTC at run time, with no include path: this header
// is prepended to each source by the loader (and by scripts/check_kernels.py), so it may use
// nothing but the compiler's built-ins. bf16 is carried as its 16 bits and widened by hand; all
// arithmetic is f32.

typedef unsigned short bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

// f32 -> bf16, rounding to nearest even; NaN stays NaN.
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(bf16* p, float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        *p = (bf16)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    *p = (bf16)(u >> 16);
}

// softplus as PyTorch computes it (linear above 20).
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The pair (a, b) stands for the map h -> a h + b. `then(p, q)` is p followed by q.
struct Affine {
    float a, b;
};
__device__ __forceinline__ Affine then(Affine p, Affine q) { return Affine{p.a * q.a, q.a * p.b + q.b}; }

// Exclusive scan of `x` (each thread's composed map) over the block, in thread order, or in
// reverse thread order when `reverse` (the last thread first), started from the identity map.
// Also returns the composition of every thread's map, in that order, in `total`. `shared`
// holds 32 Affine; blockDim.x must be a multiple of 32 and every thread must call.
__device__ Affine block_exclusive_scan(Affine x, bool reverse, Affine* shared, Affine* total) {
    const int warps = blockDim.x >> 5;
    // Positions in scan order.
    const int lane = reverse ? 31 - (threadIdx.x & 31) : threadIdx.x & 31;
    const int warp = reverse ? warps - 1 - (threadIdx.x >> 5) : threadIdx.x >> 5;
    // The lane `off` positions earlier in scan order.
    auto earlier = [&](float v, int off) {
        return reverse ? __shfl_down_sync(0xffffffffu, v, off) : __shfl_up_sync(0xffffffffu, v, off);
    };
    Affine inc = x;
    for (int off = 1; off < 32; off <<= 1) {
        Affine prev = {earlier(inc.a, off), earlier(inc.b, off)};
        if (lane >= off) inc = then(prev, inc);
    }
    if (lane == 31) shared[warp] = inc;
    __syncthreads();
    if (threadIdx.x < 32) {
        // Warp totals, scanned in scan order by the first warp (its own lanes in thread order).
        const int w_pos = threadIdx.x;
        Affine w = w_pos < warps ? shared[w_pos] : Affine{1.f, 0.f};
        for (int off = 1; off < 32; off <<= 1) {
            Affine prev = {__shfl_up_sync(0xffffffffu, w.a, off), __shfl_up_sync(0xffffffffu, w.b, off)};
            if (w_pos >= off) w = then(prev, w);
        }
        __syncwarp();
        if (w_pos < warps) shared[w_pos] = w;  // inclusive prefix over the warps
    }
    __syncthreads();
    Affine before_warp = warp > 0 ? shared[warp - 1] : Affine{1.f, 0.f};
    *total = shared[warps - 1];
    Affine exc = {earlier(inc.a, 1), earlier(inc.b, 1)};
    if (lane == 0) exc = Affine{1.f, 0.f};
    __syncthreads();  // `shared` may be reused by the caller's next scan
    return then(before_warp, exc);
}

// Sum of `x` over the warp; every lane gets it, and every lane must call.
__device__ __forceinline__ float warp_sum(float x) {
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// Sum of `x` over the block; every thread gets it. `shared` holds 32 floats.
__device__ float block_sum(float x, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    const float s = warp_sum(lane < warps ? shared[lane] : 0.f);
    __syncthreads();
    return s;
}
