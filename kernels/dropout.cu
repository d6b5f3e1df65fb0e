// Inverted dropout whose keep mask is a pure function of (seed, element index), bit for bit
// the CPU's `dropout_keep` (src/backend/cpu/dropout.rs): splitmix64 of
// seed ^ index·GOLDEN_GAMMA, the top 53 bits as a uniform u on [0, 1), keep iff u >= p.
// Nothing is stored between forward and backward.
#include "common.cuh"

#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull

__device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t index, double p) {
    uint64_t z = (seed ^ (index * GOLDEN_GAMMA)) + GOLDEN_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    // Exact: z >> 11 < 2^53 converts without rounding and 2^-53 is a power of two.
    const double uniform = (double)(z >> 11) * (1.0 / 9007199254740992.0);
    return uniform >= p;
}

// out[i] = inp[i] · scale where kept, else 0; scale = 1 / (1 - p) rounded to fp32 by the
// host, as the CPU does. p == 0 keeps everything (scale 1).
template <typename T>
__device__ void dropout_forward(T* out, const T* inp, size_t len, double p, float scale, uint64_t seed) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    out[idx] = dropout_keep(seed, idx, p) ? from_float<T>(to_float(inp[idx]) * scale) : from_float<T>(0.0f);
}

// dinp[i] += dout[i] · scale where element i was kept (same seed and p as the forward).
template <typename T>
__device__ void dropout_backward(T* dinp, const T* dout, size_t len, double p, float scale, uint64_t seed) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len || !dropout_keep(seed, idx, p)) return;
    dinp[idx] = from_float<T>(to_float(dinp[idx]) + to_float(dout[idx]) * scale);
}

// The mask alone (1 kept, 0 dropped), to check the hash against the CPU bit for bit.
extern "C" __global__ void dropout_mask(uint8_t* keep, size_t len, double p, uint64_t seed) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < len) keep[idx] = dropout_keep(seed, idx, p) ? 1 : 0;
}

#define KERNELS(T, SUFFIX)                                                                           \
    extern "C" __global__ void dropout_forward_##SUFFIX(T* out, const T* inp, size_t len, double p,  \
                                                        float scale, uint64_t seed) {                \
        dropout_forward<T>(out, inp, len, p, scale, seed);                                           \
    }                                                                                                \
    extern "C" __global__ void dropout_backward_##SUFFIX(T* dinp, const T* dout, size_t len, double p, \
                                                         float scale, uint64_t seed) {               \
        dropout_backward<T>(dinp, dout, len, p, scale, seed);                                        \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
