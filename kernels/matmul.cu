// The bias halves of the linear layer out = inp · W^T + b, whose product is cuBLAS's: the
// bias is broadcast into `out` first and the GEMM accumulates onto it (beta = 1).
#include "common.cuh"

// out[n, oc] = bias[oc] on every row.
template <typename T> __device__ void bias_broadcast_forward(T* out, const float* bias, int n, int oc) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (size_t)n * oc) out[idx] = from_float<T>(bias[idx % oc]);
}

// dbias[oc] += sum over rows of dout[n, oc]; one thread per column, rows in order.
template <typename T> __device__ void bias_backward(float* dbias, const T* dout, int n, int oc) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= oc) return;
    float acc = 0.0f;
    for (int row = 0; row < n; row++) acc += to_float(dout[(size_t)row * oc + col]);
    dbias[col] += acc;
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
