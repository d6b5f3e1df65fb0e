// The bias halves of the linear layer out = inp · W^T + b, whose product is cuBLAS's: the
// bias is broadcast into `out` first and the GEMM accumulates onto it (beta = 1).
#include "common.cuh"

// out[n, oc] = bias[oc] on every row.
template <typename T> __device__ void bias_broadcast_forward(T* out, const float* bias, int n, int oc) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (size_t)n * oc) out[idx] = from_float<T>(bias[idx % oc]);
}

// dbias[oc] += sum over rows of dout[n, oc]. Block-tiled column reduction: block x covers
// columns 32x..32x+31 with 1024 threads; thread (warp w, lane l) sums column 32x + l over
// rows w, w + 32, ... (each warp reads 32 consecutive columns of a row: coalesced), then
// column_tile_sum adds the 32 slices in a fixed order. Grid ceil(oc / 32). Threads past oc
// add nothing but still reach the block's barriers.
template <typename T> __device__ void bias_backward(float* dbias, const T* dout, int n, int oc) {
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    float acc = 0.0f;
    if (col < oc) {
        for (int row = slice; row < n; row += 32) acc += to_float(dout[(size_t)row * oc + col]);
    }
    const float total = column_tile_sum(acc);  // column blockIdx.x * 32 + slice
    const int out_col = blockIdx.x * 32 + slice;
    if (lane == 0 && out_col < oc) dbias[out_col] += total;
}

#define KERNELS(T, SUFFIX)                                                                           \
    extern "C" __global__ void bias_broadcast_forward_##SUFFIX(T* out, const float* bias, int n, int oc) { \
        bias_broadcast_forward<T>(out, bias, n, oc);                                                 \
    }                                                                                                \
    extern "C" __global__ void bias_backward_##SUFFIX(float* dbias, const T* dout, int n, int oc) {  \
        bias_backward<T>(dbias, dout, n, oc);                                                        \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
