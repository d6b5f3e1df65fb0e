// Inverted dropout whose keep mask is a pure function of (seed, element index), bit for bit
// the CPU's `dropout_keep` (src/backend/cpu/dropout.rs): splitmix64 of
// seed ^ index·GOLDEN_GAMMA, the top 53 bits as a uniform u on [0, 1), keep iff u >= p.
// Nothing is stored between forward and backward.
// The hash, dropout_keep, is in common.cuh: attention drops its probabilities with it too.
#include "common.cuh"

// out[i] = inp[i] · scale where kept, else 0; scale = 1 / (1 - p) rounded to fp32 by the
// host, as the CPU does. p == 0 keeps everything (scale 1).
template <typename T>
__device__ void dropout_forward(T* out, const T* inp, size_t len, double p, float scale, uint64_t seed) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    out[idx] = dropout_keep(seed, idx, p) ? from_float<T>(to_float(inp[idx]) * scale) : from_float<T>(0.0f);
}

// dinp[i] += dout[i] · scale where element i was kept (same seed and p as the forward).
// The product and the sum round separately, as the CPU's: nvcc would otherwise fuse them
// into one multiply-add, and the tests compare bit for bit.
template <typename T>
__device__ void dropout_backward(T* dinp, const T* dout, size_t len, double p, float scale, uint64_t seed) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len || !dropout_keep(seed, idx, p)) return;
    dinp[idx] = from_float<T>(__fadd_rn(to_float(dinp[idx]), __fmul_rn(to_float(dout[idx]), scale)));
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
