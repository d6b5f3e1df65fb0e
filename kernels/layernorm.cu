// LayerNorm over the last dimension, one warp per row (rows of BERT are 128..1024 wide).
// Statistics in fp32 with a two-pass variance (no E[x²] - E[x]² cancellation); weight and
// bias are fp32, activations float or bf16. rstd = 1 / sqrtf(var + eps) (not rsqrtf, which
// is approximate) to stay close to the f64 CPU reference.
#include "common.cuh"

// out[n, c] = (x - mean) * rstd * weight + bias with x = inp[n, c]; mean, rstd [n] saved.
// When `a`/`b` are given instead (residual variant) x = a + b is first written to inp.
template <typename T>
__device__ void layernorm_rows(T* out, float* mean, float* rstd, T* inp, const T* a, const T* b,
                               const float* weight, const float* bias, int n, int c, float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    T* x = inp + (size_t)row * c;
    if (a != nullptr) {
        // Each lane re-reads only what it wrote itself: no synchronisation needed, and the
        // statistics see the stored (possibly rounded) sum, as the backward will.
        const T* a_row = a + (size_t)row * c;
        const T* b_row = b + (size_t)row * c;
        for (int i = lane; i < c; i += 32) x[i] = from_float<T>(to_float(a_row[i]) + to_float(b_row[i]));
    }
    float sum = 0.0f;
    for (int i = lane; i < c; i += 32) sum += to_float(x[i]);
    const float m = warp_sum(sum) / c;
    float sq = 0.0f;
    for (int i = lane; i < c; i += 32) {
        const float d = to_float(x[i]) - m;
        sq += d * d;
    }
    const float rs = 1.0f / sqrtf(warp_sum(sq) / c + eps);
    T* o = out + (size_t)row * c;
    for (int i = lane; i < c; i += 32) o[i] = from_float<T>((to_float(x[i]) - m) * rs * weight[i] + bias[i]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

// dinp[n, c] += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = weight * dout.
template <typename T>
__device__ void layernorm_backward_input(T* dinp, const T* dout, const T* inp, const float* weight,
                                         const float* mean, const float* rstd, int n, int c) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const T* x = inp + (size_t)row * c;
    const T* d = dout + (size_t)row * c;
    T* dx = dinp + (size_t)row * c;
    const float m = mean[row], rs = rstd[row];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int i = lane; i < c; i += 32) {
        const float norm = (to_float(x[i]) - m) * rs;
        const float dnorm = weight[i] * to_float(d[i]);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    const float dnorm_mean = warp_sum(dnorm_sum) / c;
    const float dnorm_norm_mean = warp_sum(dnorm_norm_sum) / c;
    for (int i = lane; i < c; i += 32) {
        const float norm = (to_float(x[i]) - m) * rs;
        const float dnorm = weight[i] * to_float(d[i]);
        dx[i] = from_float<T>(to_float(dx[i]) + (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs);
    }
}

// dweight[c] += sum_rows dout * norm; dbias[c] += sum_rows dout. Block-tiled column
// reduction as bias_backward (kernels/matmul.cu): block x covers columns 32x..32x+31 with
// 1024 threads, thread (warp w, lane l) sums column 32x + l over rows w, w + 32, ...
// (coalesced; mean and rstd are one broadcast per row), column_tile_sum adds the 32 slices
// in a fixed order: deterministic. Grid ceil(c / 32).
template <typename T>
__device__ void layernorm_backward_params(float* dweight, float* dbias, const T* dout, const T* inp,
                                          const float* mean, const float* rstd, int n, int c) {
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    float acc_weight = 0.0f, acc_bias = 0.0f;
    if (col < c) {
        for (int row = slice; row < n; row += 32) {
            const size_t at = (size_t)row * c + col;
            const float d = to_float(dout[at]);
            acc_weight += d * (to_float(inp[at]) - mean[row]) * rstd[row];
            acc_bias += d;
        }
    }
    const float total_weight = column_tile_sum(acc_weight);  // column blockIdx.x * 32 + slice
    const float total_bias = column_tile_sum(acc_bias);
    const int out_col = blockIdx.x * 32 + slice;
    if (lane == 0 && out_col < c) {
        dweight[out_col] += total_weight;
        dbias[out_col] += total_bias;
    }
}

#define KERNELS(T, SUFFIX)                                                                            \
    extern "C" __global__ void layernorm_forward_##SUFFIX(T* out, float* mean, float* rstd,          \
                                                          const T* inp, const float* weight,          \
                                                          const float* bias, int n, int c, float eps) { \
        layernorm_rows<T>(out, mean, rstd, const_cast<T*>(inp), nullptr, nullptr, weight, bias, n, c,  \
                          eps);                                                                       \
    }                                                                                                 \
    extern "C" __global__ void residual_layernorm_forward_##SUFFIX(                                  \
        T* out, T* sum, float* mean, float* rstd, const T* a, const T* b, const float* weight,        \
        const float* bias, int n, int c, float eps) {                                                 \
        layernorm_rows<T>(out, mean, rstd, sum, a, b, weight, bias, n, c, eps);                       \
    }                                                                                                 \
    extern "C" __global__ void layernorm_backward_input_##SUFFIX(T* dinp, const T* dout, const T* inp, \
                                                                 const float* weight, const float* mean, \
                                                                 const float* rstd, int n, int c) {   \
        layernorm_backward_input<T>(dinp, dout, inp, weight, mean, rstd, n, c);                       \
    }                                                                                                 \
    extern "C" __global__ void layernorm_backward_params_##SUFFIX(float* dweight, float* dbias,      \
                                                                  const T* dout, const T* inp,        \
                                                                  const float* mean, const float* rstd, \
                                                                  int n, int c) {                     \
        layernorm_backward_params<T>(dweight, dbias, dout, inp, mean, rstd, n, c);                    \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
