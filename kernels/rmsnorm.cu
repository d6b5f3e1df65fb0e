// RMSNorm over the last dimension, as Llama/Mistral/Qwen2 (HF LlamaRMSNorm):
// out = weight · T(x · rstd), rstd = 1 / sqrtf(mean(x²) + eps). One warp per row; the
// statistic in fp32 (the CPU twin takes it in f64); the normalised value is rounded to T
// before the weight multiplies it, as HF casts it back to the input dtype first. weight and
// its gradient are fp32, activations float or bf16. 1 / sqrtf (not rsqrtf, approximate)
// to stay close to the CPU.
#include "common.cuh"

// out[n, c] = weight[c] · T(inp · rstd); rstd[n] saved for the backward.
template <typename T>
__device__ void rmsnorm_forward(T* out, float* rstd, const T* inp, const float* weight, int n, int c,
                                float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;  // whole warps leave together; no block sync below
    const T* x = inp + (size_t)row * c;
    float sum_sq = 0.0f;
    for (int i = lane; i < c; i += 32) {
        const float v = to_float(x[i]);
        sum_sq += v * v;
    }
    const float rs = 1.0f / sqrtf(warp_sum(sum_sq) / c + eps);
    T* o = out + (size_t)row * c;
    for (int i = lane; i < c; i += 32) {
        const float norm = to_float(from_float<T>(to_float(x[i]) * rs));
        o[i] = from_float<T>(weight[i] * norm);
    }
    if (lane == 0) rstd[row] = rs;
}

// dinp[n, c] += rstd · (dnorm - norm · mean(dnorm · norm)), dnorm = weight · dout,
// norm = inp · rstd (the saved statistic). One warp per row.
template <typename T>
__device__ void rmsnorm_backward_input(T* dinp, const T* dout, const T* inp, const float* weight,
                                       const float* rstd, int n, int c) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const T* x = inp + (size_t)row * c;
    const T* d = dout + (size_t)row * c;
    T* dx = dinp + (size_t)row * c;
    const float rs = rstd[row];
    float dnorm_norm_sum = 0.0f;
    for (int i = lane; i < c; i += 32) dnorm_norm_sum += weight[i] * to_float(d[i]) * to_float(x[i]) * rs;
    const float dnorm_norm_mean = warp_sum(dnorm_norm_sum) / c;
    for (int i = lane; i < c; i += 32) {
        const float norm = to_float(x[i]) * rs;
        const float dnorm = weight[i] * to_float(d[i]);
        dx[i] = from_float<T>(to_float(dx[i]) + (dnorm - norm * dnorm_norm_mean) * rs);
    }
}

// dweight[c] += sum_rows dout · inp · rstd. The block-tiled column reduction of
// layernorm_backward_params (kernels/layernorm.cu): block x covers columns 32x..32x+31 with
// 1024 threads, thread (warp w, lane l) sums column 32x + l over rows w, w + 32, ...
// (coalesced), column_tile_sum adds the 32 slices in a fixed order: no atomics, the same
// bits every run. Grid ceil(c / 32).
template <typename T>
__device__ void rmsnorm_backward_weight(float* dweight, const T* dout, const T* inp, const float* rstd, int n,
                                        int c) {
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    float acc = 0.0f;
    if (col < c) {
        for (int row = slice; row < n; row += 32) {
            const size_t at = (size_t)row * c + col;
            acc += to_float(dout[at]) * to_float(inp[at]) * rstd[row];
        }
    }
    const float total = column_tile_sum(acc);  // column blockIdx.x * 32 + slice
    const int out_col = blockIdx.x * 32 + slice;
    if (lane == 0 && out_col < c) dweight[out_col] += total;
}

#define KERNELS(T, SUFFIX)                                                                                 \
    extern "C" __global__ void rmsnorm_forward_##SUFFIX(T* out, float* rstd, const T* inp,                \
                                                        const float* weight, int n, int c, float eps) {   \
        rmsnorm_forward<T>(out, rstd, inp, weight, n, c, eps);                                             \
    }                                                                                                      \
    extern "C" __global__ void rmsnorm_backward_input_##SUFFIX(T* dinp, const T* dout, const T* inp,      \
                                                               const float* weight, const float* rstd,    \
                                                               int n, int c) {                            \
        rmsnorm_backward_input<T>(dinp, dout, inp, weight, rstd, n, c);                                    \
    }                                                                                                      \
    extern "C" __global__ void rmsnorm_backward_weight_##SUFFIX(float* dweight, const T* dout, const T* inp, \
                                                                const float* rstd, int n, int c) {        \
        rmsnorm_backward_weight<T>(dweight, dout, inp, rstd, n, c);                                        \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
