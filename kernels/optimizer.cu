// Gradient clipping and the optimizer: the squared global gradient norm (a deterministic
// two-stage reduction in f64) and PyTorch's AdamW on fp32 master weights, each element
// updated in f64 like the CPU reference (memory-bound either way).
#include "common.cuh"

// Stage 1: partials[blockIdx.x] = sum of grads² over a grid-stride slice of grads [len].
// The grid size is fixed by the caller (not by the device), so the sum order is too.
extern "C" __global__ void global_norm_squared_partial(double* partials, const float* grads, size_t len) {
    double acc = 0.0;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < len; idx += (size_t)gridDim.x * blockDim.x) {
        const double g = grads[idx];
        acc += g * g;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Stage 2, one block: out[0] = sum of partials [count].
extern "C" __global__ void global_norm_squared_finish(double* out, const double* partials, int count) {
    double acc = 0.0;
    for (int idx = threadIdx.x; idx < count; idx += blockDim.x) acc += partials[idx];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc;
}

// One AdamW step with g = grads · grad_scale (the clip factor, 1 when not clipping):
//   p <- p·decay - step_size · m / (sqrt(v) / bias_correction2_sqrt + eps)
// with m, v the updated moments, decay = 1 - lr·wd, step_size = lr / (1 - beta1^step),
// bias_correction2_sqrt = sqrt(1 - beta2^step), all computed on the host in f64.
__device__ __forceinline__ double adamw_element(float* params, const float* grads, float* m, float* v, size_t idx,
                                                double beta1, double beta2, double eps, double decay,
                                                double step_size, double bias_correction2_sqrt,
                                                double grad_scale) {
    const double g = (double)grads[idx] * grad_scale;
    const double m_new = beta1 * m[idx] + (1.0 - beta1) * g;
    const double v_new = beta2 * v[idx] + (1.0 - beta2) * g * g;
    const double denom = sqrt(v_new) / bias_correction2_sqrt + eps;
    const double p = params[idx] * decay - step_size * m_new / denom;
    params[idx] = (float)p;
    m[idx] = (float)m_new;
    v[idx] = (float)v_new;
    return p;
}

// params, grads, m, v [len], fp32.
extern "C" __global__ void adamw_update(float* params, const float* grads, float* m, float* v, size_t len,
                                        double beta1, double beta2, double eps, double decay, double step_size,
                                        double bias_correction2_sqrt, double grad_scale) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    adamw_element(params, grads, m, v, idx, beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, grad_scale);
}

// The same step, also writing the bf16 copy of the weights that a bf16 forward reads.
extern "C" __global__ void adamw_update_bf16_copy(float* params, bf16* params_bf16, const float* grads, float* m,
                                                  float* v, size_t len, double beta1, double beta2, double eps,
                                                  double decay, double step_size, double bias_correction2_sqrt,
                                                  double grad_scale) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    const double p = adamw_element(params, grads, m, v, idx, beta1, beta2, eps, decay, step_size,
                                   bias_correction2_sqrt, grad_scale);
    params_bf16[idx] = __float2bfloat16_rn((float)p);
}
