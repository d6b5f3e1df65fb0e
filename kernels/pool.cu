// The [CLS] pooling of BERT: the first position of every sequence.
#include "common.cuh"

// out[b, c] = inp[b, 0, c] with inp [b, t, c].
template <typename T> __device__ void cls_pool_forward(T* out, const T* inp, int b, int t, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * c) return;
    out[idx] = inp[(idx / c) * t * c + idx % c];
}

// dinp[b, 0, c] += dout[b, c]; the other positions get nothing.
template <typename T> __device__ void cls_pool_backward(T* dinp, const T* dout, int b, int t, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * c) return;
    const size_t at = (idx / c) * t * c + idx % c;
    dinp[at] = from_float<T>(to_float(dinp[at]) + to_float(dout[idx]));
}

// A decoder's pooling: out[b, c] = inp[b, rows[b], c], one row per sequence (its last
// real token), rows [b] < t checked on the host.
template <typename T>
__device__ void last_token_pool_forward(T* out, const T* inp, const uint32_t* rows, int b, int t, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * c) return;
    const size_t seq = idx / c;
    out[idx] = inp[(seq * t + rows[seq]) * c + idx % c];
}

// dinp[b, rows[b], c] += dout[b, c]; each thread owns one element (no races).
template <typename T>
__device__ void last_token_pool_backward(T* dinp, const T* dout, const uint32_t* rows, int b, int t, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * c) return;
    const size_t seq = idx / c;
    const size_t at = (seq * t + rows[seq]) * c + idx % c;
    dinp[at] = from_float<T>(to_float(dinp[at]) + to_float(dout[idx]));
}

#define KERNELS(T, SUFFIX)                                                                              \
    extern "C" __global__ void cls_pool_forward_##SUFFIX(T* out, const T* inp, int b, int t, int c) {  \
        cls_pool_forward<T>(out, inp, b, t, c);                                                         \
    }                                                                                                   \
    extern "C" __global__ void cls_pool_backward_##SUFFIX(T* dinp, const T* dout, int b, int t, int c) { \
        cls_pool_backward<T>(dinp, dout, b, t, c);                                                      \
    }                                                                                                   \
    extern "C" __global__ void last_token_pool_forward_##SUFFIX(T* out, const T* inp, const uint32_t* rows, \
                                                                int b, int t, int c) {                   \
        last_token_pool_forward<T>(out, inp, rows, b, t, c);                                            \
    }                                                                                                   \
    extern "C" __global__ void last_token_pool_backward_##SUFFIX(T* dinp, const T* dout, const uint32_t* rows, \
                                                                 int b, int t, int c) {                  \
        last_token_pool_backward<T>(dinp, dout, rows, b, t, c);                                         \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
