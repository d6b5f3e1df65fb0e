// Elementwise ops: bias + GELU (exact erf form, as BERT), tanh (the pooler), residual add.
// erff/expf/tanhf are the exact library versions (the file is built without fast math).
#include "common.cuh"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * INV_SQRT2)); }

// d gelu / dx = Phi(x) + x phi(x).
__device__ __forceinline__ float gelu_slope(float x) {
    const float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
    const float pdf = INV_SQRT_2PI * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

// out[n, c] = gelu(inp[n, c] + bias[c]): fuses the matmul bias into the activation.
template <typename T>
__device__ void bias_gelu_forward(T* out, const T* inp, const float* bias, int n, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * c) return;
    out[idx] = from_float<T>(gelu(to_float(inp[idx]) + bias[idx % c]));
}

// With g = dout * gelu'(inp + bias): dinp[n, c] += g; dbias[c] += sum over rows of g.
// Block-tiled column reduction as bias_backward (kernels/matmul.cu): block x covers columns
// 32x..32x+31 with 1024 threads, thread (warp w, lane l) handles column 32x + l at rows
// w, w + 32, ... (writing each dinp element once), column_tile_sum adds the 32 slices in a
// fixed order: deterministic without atomics. Grid ceil(c / 32).
template <typename T>
__device__ void bias_gelu_backward(T* dinp, float* dbias, const T* dout, const T* inp, const float* bias,
                                   int n, int c) {
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    float acc = 0.0f;
    if (col < c) {
        const float b = bias[col];
        for (int row = slice; row < n; row += 32) {
            const size_t at = (size_t)row * c + col;
            const float g = to_float(dout[at]) * gelu_slope(to_float(inp[at]) + b);
            dinp[at] = from_float<T>(to_float(dinp[at]) + g);
            acc += g;
        }
    }
    const float total = column_tile_sum(acc);  // column blockIdx.x * 32 + slice
    const int out_col = blockIdx.x * 32 + slice;
    if (lane == 0 && out_col < c) dbias[out_col] += total;
}

template <typename T> __device__ void tanh_forward(T* out, const T* inp, size_t len) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < len) out[idx] = from_float<T>(tanhf(to_float(inp[idx])));
}

// dinp += dout * (1 - out²), from the saved output.
template <typename T> __device__ void tanh_backward(T* dinp, const T* out, const T* dout, size_t len) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    const float y = to_float(out[idx]);
    dinp[idx] = from_float<T>(to_float(dinp[idx]) + to_float(dout[idx]) * (1.0f - y * y));
}

template <typename T> __device__ void residual_forward(T* out, const T* a, const T* b, size_t len) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < len) out[idx] = from_float<T>(to_float(a[idx]) + to_float(b[idx]));
}

#define KERNELS(T, SUFFIX)                                                                             \
    extern "C" __global__ void bias_gelu_forward_##SUFFIX(T* out, const T* inp, const float* bias, int n, \
                                                          int c) {                                      \
        bias_gelu_forward<T>(out, inp, bias, n, c);                                                    \
    }                                                                                                  \
    extern "C" __global__ void bias_gelu_backward_##SUFFIX(T* dinp, float* dbias, const T* dout,        \
                                                           const T* inp, const float* bias, int n, int c) { \
        bias_gelu_backward<T>(dinp, dbias, dout, inp, bias, n, c);                                     \
    }                                                                                                  \
    extern "C" __global__ void tanh_forward_##SUFFIX(T* out, const T* inp, size_t len) {              \
        tanh_forward<T>(out, inp, len);                                                                \
    }                                                                                                  \
    extern "C" __global__ void tanh_backward_##SUFFIX(T* dinp, const T* out, const T* dout, size_t len) { \
        tanh_backward<T>(dinp, out, dout, len);                                                        \
    }                                                                                                  \
    extern "C" __global__ void residual_forward_##SUFFIX(T* out, const T* a, const T* b, size_t len) { \
        residual_forward<T>(out, a, b, len);                                                           \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
