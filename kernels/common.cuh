// Shared helpers of the rcx kernels: bf16 <-> fp32 conversion (activations may be stored
// in bf16, all arithmetic is fp32 or wider) and deterministic warp/block reductions.
#pragma once
#ifndef RCX_EMULATE  // the CPU emulation (kernels/emu/emu.h) defines bf16 itself
#include <cuda_bf16.h>
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull

// Whether element `index` survives dropout with probability p under `seed`: bit for bit the
// CPU's `dropout_keep` (src/backend/cpu/dropout.rs), splitmix64 of seed ^ index·GOLDEN_GAMMA,
// the top 53 bits as a uniform u on [0, 1), keep iff u >= p.
__device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t index, double p) {
    uint64_t z = (seed ^ (index * GOLDEN_GAMMA)) + GOLDEN_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    // Exact: z >> 11 < 2^53 converts without rounding and 2^-53 is a power of two.
    const double uniform = (double)(z >> 11) * (1.0 / 9007199254740992.0);
    return uniform >= p;
}

// Butterfly sums: every lane ends with the same value, summed in a fixed order, so the
// result never depends on scheduling (run-to-run identical).
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Block-wide sum, broadcast to every thread. blockDim.x must be a multiple of 32 (<= 1024).
// Every thread of the block must call it (it synchronises).
template <typename T> __device__ T block_sum(T v) {
    __shared__ T partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : T(0);
    return warp_sum(v);
}

// Block-wide max, broadcast to every thread; same contract as block_sum.
__device__ inline float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : -INFINITY;
    return warp_max(v);
}

// The launch's dynamic shared memory as an array of T (the launch sets its size). One
// declaration for every kernel, so the CPU emulation of the kernels can provide it.
template <typename T> __device__ __forceinline__ T* dynamic_shared() {
#ifdef RCX_EMULATE
    return reinterpret_cast<T*>(rcx_emu_dynamic_shared());
#else
    // 128: more than any kernel needs (the wmma tiles of attention.cu need 32).
    extern __shared__ __align__(128) unsigned char dynamic_shared_bytes[];
    return reinterpret_cast<T*>(dynamic_shared_bytes);
#endif
}

// Each kernel file instantiates its templates for float and bf16 activations through a
// macro KERNELS(T, SUFFIX) that emits `extern "C"` entry points named <kernel>_f32 and
// <kernel>_bf16; the Rust side picks one by suffix.

// The last step of a block-tiled column reduction (bias, GELU, LayerNorm and embedding
// backward): the block is 32 warps of 32 lanes (1024 threads), warp w a slice of the rows,
// lane l its partial sum of column l of the block's 32 columns. Returns, in every lane of
// warp w, the total of column w over the 32 slices, summed by the same butterfly every run
// (run-to-run identical). Every thread must call it (it synchronises).
__device__ inline float column_tile_sum(float partial) {
    __shared__ float tile[32][33];  // [slice][column]; the pad makes the transposed read conflict-free
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // a previous call may still be reading `tile`
    tile[warp][lane] = partial;
    __syncthreads();
    return warp_sum(tile[lane][warp]);
}
