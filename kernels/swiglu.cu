// The gated MLP activation of Llama, Mistral and Qwen2: out = T(silu(gate)) · up,
// silu(x) = x · sigmoid(x), in fp32, silu rounded to T before it multiplies up (as PyTorch
// rounds act_fn(gate_proj(x)) before the product; the CPU twin does the same in f64).
// One thread per element. sigmoid from e = expf(-|x|), which never overflows.
#include "common.cuh"

__device__ __forceinline__ float stable_sigmoid(float x) {
    const float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// out[i] = T(silu(gate[i])) · up[i], i < len.
template <typename T>
__device__ void swiglu_forward(T* out, const T* gate, const T* up, size_t len) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float g = to_float(gate[i]);
    const float silu = to_float(from_float<T>(g * stable_sigmoid(g)));
    out[i] = from_float<T>(silu * to_float(up[i]));
}

// dgate[i] += dout · up · silu'(gate), silu'(x) = s (1 + x (1 - s)), s = sigmoid(x);
// dup[i] += dout · T(silu(gate)).
template <typename T>
__device__ void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t len) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    const float g = to_float(gate[i]), d = to_float(dout[i]);
    const float s = stable_sigmoid(g);
    const float dsilu = s * (1.0f + g * (1.0f - s));
    const float silu = to_float(from_float<T>(g * s));
    dgate[i] = from_float<T>(to_float(dgate[i]) + d * to_float(up[i]) * dsilu);
    dup[i] = from_float<T>(to_float(dup[i]) + d * silu);
}

#define KERNELS(T, SUFFIX)                                                                                \
    extern "C" __global__ void swiglu_forward_##SUFFIX(T* out, const T* gate, const T* up, size_t len) { \
        swiglu_forward<T>(out, gate, up, len);                                                            \
    }                                                                                                     \
    extern "C" __global__ void swiglu_backward_##SUFFIX(T* dgate, T* dup, const T* dout, const T* gate,  \
                                                        const T* up, size_t len) {                        \
        swiglu_backward<T>(dgate, dup, dout, gate, up, len);                                              \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
