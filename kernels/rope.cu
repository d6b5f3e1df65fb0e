// Rotary position embeddings as HF's Llama, Mistral and Qwen2 apply them (the CPU twin is
// src/backend/cpu/rope.rs): the `rotate_half` layout, channel i of a head pairs with
// channel i + hs/2, both turned by the angle position · inv_freq[i]. inv_freq [hs/2] comes
// from the host (rope_inv_freq: rope_theta and Llama 3's scaling are in it).
//
// The rotation rounds as PyTorch (and the CPU twin) do: each product rounded to T, then the
// sum rounded to T (__fmul_rn / __fadd_rn keep nvcc from fusing them into an fma), so the
// results match the CPU twin bit for bit in f32 and in bf16.
#include "common.cuh"

// a · b rounded to T, back in fp32.
template <typename T> __device__ __forceinline__ float mul_as(float a, float b) {
    return to_float(from_float<T>(__fmul_rn(a, b)));
}

// a + b rounded to T, back in fp32.
template <typename T> __device__ __forceinline__ float add_as(float a, float b) {
    return to_float(from_float<T>(__fadd_rn(a, b)));
}

// cos, sin [n, half] = T(f32(cos(angle))), T(f32(sin(angle))) of angle = f32(f32(positions[i]) ·
// inv_freq[j]), the angle in fp32 as transformers computes it, its cosine in f64 rounded to
// fp32 (as the CPU twin: a correctly rounded fp32 cosine of the same angle). One thread per
// element; computed once per batch.
template <typename T>
__device__ void rope_cos_sin(T* cos_out, T* sin_out, const unsigned* positions, const float* inv_freq, int n,
                             int half) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n * half) return;
    const size_t i = e / half, j = e % half;
    const float angle = __fmul_rn((float)positions[i], inv_freq[j]);
    cos_out[e] = from_float<T>((float)cos((double)angle));
    sin_out[e] = from_float<T>((float)sin((double)angle));
}

// out[n, heads*hs] = the rotation of inp: with x1 = inp[i], x2 = inp[i + hs/2] of a head,
//   out[i] = x1 cos_i - x2 sin_i, out[i + hs/2] = x2 cos_i + x1 sin_i.
// One thread per (token, head, i < hs/2) reads its pair before writing it, so out may be
// inp (in place).
template <typename T>
__device__ void rope_forward(T* out, const T* inp, const T* cos_in, const T* sin_in, int n, int heads,
                             int hs) {
    const int half = hs / 2;
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n * heads * half) return;
    const size_t token = e / ((size_t)heads * half), head = e / half % heads, i = e % half;
    const size_t at = (token * heads + head) * hs + i;
    const float c = to_float(cos_in[token * half + i]), s = to_float(sin_in[token * half + i]);
    const float x1 = to_float(inp[at]), x2 = to_float(inp[at + half]);
    out[at] = from_float<T>(__fadd_rn(mul_as<T>(x1, c), mul_as<T>(-x2, s)));
    out[at + half] = from_float<T>(__fadd_rn(mul_as<T>(x2, c), mul_as<T>(x1, s)));
}

// dinp[n, heads*hs] += the inverse rotation (the transpose) of dout:
//   dinp[i] += d1 cos_i + d2 sin_i, dinp[i + hs/2] += d2 cos_i - d1 sin_i.
template <typename T>
__device__ void rope_backward(T* dinp, const T* dout, const T* cos_in, const T* sin_in, int n, int heads,
                              int hs) {
    const int half = hs / 2;
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)n * heads * half) return;
    const size_t token = e / ((size_t)heads * half), head = e / half % heads, i = e % half;
    const size_t at = (token * heads + head) * hs + i;
    const float c = to_float(cos_in[token * half + i]), s = to_float(sin_in[token * half + i]);
    const float d1 = to_float(dout[at]), d2 = to_float(dout[at + half]);
    const float g1 = add_as<T>(mul_as<T>(d1, c), mul_as<T>(d2, s));
    const float g2 = add_as<T>(mul_as<T>(d2, c), -mul_as<T>(d1, s));
    dinp[at] = from_float<T>(__fadd_rn(to_float(dinp[at]), g1));
    dinp[at + half] = from_float<T>(__fadd_rn(to_float(dinp[at + half]), g2));
}

#define KERNELS(T, SUFFIX)                                                                                   \
    extern "C" __global__ void rope_cos_sin_##SUFFIX(T* cos_out, T* sin_out, const unsigned* positions,     \
                                                     const float* inv_freq, int n, int half) {               \
        rope_cos_sin<T>(cos_out, sin_out, positions, inv_freq, n, half);                                     \
    }                                                                                                        \
    extern "C" __global__ void rope_forward_##SUFFIX(T* out, const T* inp, const T* cos_in, const T* sin_in, \
                                                     int n, int heads, int hs) {                             \
        rope_forward<T>(out, inp, cos_in, sin_in, n, heads, hs);                                             \
    }                                                                                                        \
    extern "C" __global__ void rope_forward_in_place_##SUFFIX(T* x, const T* cos_in, const T* sin_in, int n,  \
                                                              int heads, int hs) {                          \
        rope_forward<T>(x, x, cos_in, sin_in, n, heads, hs);                                                 \
    }                                                                                                        \
    extern "C" __global__ void rope_backward_##SUFFIX(T* dinp, const T* dout, const T* cos_in,              \
                                                      const T* sin_in, int n, int heads, int hs) {           \
        rope_backward<T>(dinp, dout, cos_in, sin_in, n, heads, hs);                                          \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
