// Conversions between fp32 and bf16 on the device: the bf16 copy of the fp32 master weights
// (at upload; AdamW refreshes it afterwards), and the pooler's fp32 input and its gradient
// at the border between the bf16 encoder and the fp32 head.
#include "common.cuh"

// out[len] = inp[len] rounded to the nearest bf16 (ties to even).
extern "C" __global__ void cast_f32_to_bf16(bf16* out, const float* inp, size_t len) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < len) out[idx] = __float2bfloat16_rn(inp[idx]);
}

// out[len] = inp[len], exactly (every bf16 is an fp32).
extern "C" __global__ void cast_bf16_to_f32(float* out, const bf16* inp, size_t len) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < len) out[idx] = __bfloat162float(inp[idx]);
}
