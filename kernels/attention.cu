// Multi-head self-attention with a key padding mask, as HF BERT: q, k, v, out are
// [b, t, nh*hs] with the heads interleaved along the channels, scores are scaled by
// 1/sqrt(hs), padded keys (mask 0) get zero weight. The softmax subtracts the row maximum
// over the allowed keys, so it never overflows. A sequence with no real token at all
// attends uniformly to every key, as HF's finfo.min mask (and the CPU reference) does.
//
// Dropout on the probabilities (training): the weights that multiply v are
// w = p ∘ keep · drop_scale, keep = dropout_keep(seed, index in probs, drop_p), drop_scale =
// 1 / (1 - drop_p) rounded to fp32 by the host, as the CPU. probs holds p, before dropout;
// the backward redraws the mask. drop_p == 0: no dropout, no hashing.
//
// This first version stores the probabilities [b, nh, t, t] like the CPU reference, and
// runs one block per (sequence, head, query row). The goal is a flash-style kernel that
// keeps tiles of K/V in shared memory and never writes the t x t matrix.
#include "common.cuh"

// The weight that multiplies v of the probability at `index` in probs: dropped or not.
__device__ __forceinline__ float dropped_weight(float p, size_t index, double drop_p, float drop_scale,
                                                uint64_t seed) {
    if (drop_p == 0.0) return p;
    return dropout_keep(seed, index, drop_p) ? p * drop_scale : 0.0f;
}

// One block per (bi, h, i), blockIdx.x = (bi*nh + h)*t + i, which is also the row index of
// probs [b, nh, t, t]. Dynamic shared memory: t floats (the scores, then the weights).
template <typename T>
__device__ void attention_forward(T* out, float* probs, const T* q, const T* k, const T* v,
                                  const uint8_t* mask, int b, int t, int nh, int hs, float scale,
                                  double drop_p, float drop_scale, uint64_t seed) {
    float* weights = dynamic_shared<float>();  // [t]
    const int i = blockIdx.x % t, h = (blockIdx.x / t) % nh, bi = blockIdx.x / (t * nh);
    const size_t channels = (size_t)nh * hs;
    const T* q_i = q + ((size_t)bi * t + i) * channels + (size_t)h * hs;
    const uint8_t* mask_b = mask + (size_t)bi * t;
    bool local_real = false;
    for (int j = threadIdx.x; j < t; j += blockDim.x) local_real |= mask_b[j] != 0;
    const bool any_real = __syncthreads_or(local_real);
    float local_max = -INFINITY;
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        float score = -INFINITY;
        if (!any_real || mask_b[j]) {
            const T* k_j = k + ((size_t)bi * t + j) * channels + (size_t)h * hs;
            float dot = 0.0f;
            for (int d = 0; d < hs; d++) dot += to_float(q_i[d]) * to_float(k_j[d]);
            score = dot * scale;
        }
        weights[j] = score;
        local_max = fmaxf(local_max, score);
    }
    const float row_max = block_max(local_max);
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        const float e = weights[j] == -INFINITY ? 0.0f : expf(weights[j] - row_max);
        weights[j] = e;
        local_sum += e;
    }
    const float sum = block_sum(local_sum);
    const float inv_sum = 1.0f / sum;  // sum >= 1: the maximum contributes exp(0)
    float* probs_row = probs + (size_t)blockIdx.x * t;
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        const float p = weights[j] * inv_sum;
        weights[j] = dropped_weight(p, (size_t)blockIdx.x * t + j, drop_p, drop_scale, seed);
        probs_row[j] = p;
    }
    __syncthreads();
    T* out_i = out + ((size_t)bi * t + i) * channels + (size_t)h * hs;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < t; j++) acc += weights[j] * to_float(v[((size_t)bi * t + j) * channels + (size_t)h * hs + d]);
        out_i[d] = from_float<T>(acc);
    }
}

// First half of the backward, one block per query row (same grid as the forward):
// dw_j = dout_i · v_j; dp_j = dw_j through the dropout (keep_ij · drop_scale, or 1 without);
// ds_j = p_ij (dp_j - sum_j' p_ij' dp_j'), saved in dscores [b, nh, t, t] for the second
// half; dq_i += scale · sum_j ds_j k_j.
template <typename T>
__device__ void attention_backward_query(T* dq, float* dscores, const T* dout, const T* k, const T* v,
                                         const float* probs, int b, int t, int nh, int hs, float scale,
                                         double drop_p, float drop_scale, uint64_t seed) {
    float* dscore_row = dynamic_shared<float>();  // [t]
    const int i = blockIdx.x % t, h = (blockIdx.x / t) % nh, bi = blockIdx.x / (t * nh);
    const size_t channels = (size_t)nh * hs;
    const size_t head = (size_t)h * hs;
    const T* dout_i = dout + ((size_t)bi * t + i) * channels + head;
    const float* probs_row = probs + (size_t)blockIdx.x * t;
    float local_dot = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        const T* v_j = v + ((size_t)bi * t + j) * channels + head;
        float dp = 0.0f;
        for (int d = 0; d < hs; d++) dp += to_float(dout_i[d]) * to_float(v_j[d]);
        dp = dropped_weight(dp, (size_t)blockIdx.x * t + j, drop_p, drop_scale, seed);
        dscore_row[j] = dp;
        local_dot += probs_row[j] * dp;
    }
    const float dot = block_sum(local_dot);
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        const float ds = probs_row[j] * (dscore_row[j] - dot);
        dscore_row[j] = ds;
        dscores[(size_t)blockIdx.x * t + j] = ds;
    }
    __syncthreads();
    T* dq_i = dq + ((size_t)bi * t + i) * channels + head;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < t; j++) acc += dscore_row[j] * to_float(k[((size_t)bi * t + j) * channels + head + d]);
        dq_i[d] = from_float<T>(to_float(dq_i[d]) + scale * acc);
    }
}

// Second half, one block per key row j, blockIdx.x = (bi*nh + h)*t + j, threads over hs:
// dk_j += scale · sum_i ds_ij q_i; dv_j += sum_i w_ij dout_i (w: the forward's weights,
// p after dropout). Each output element is summed by one thread over i in order:
// deterministic.
template <typename T>
__device__ void attention_backward_key(T* dk, T* dv, const T* dout, const T* q, const float* probs,
                                       const float* dscores, int b, int t, int nh, int hs, float scale,
                                       double drop_p, float drop_scale, uint64_t seed) {
    const int j = blockIdx.x % t, h = (blockIdx.x / t) % nh, bi = blockIdx.x / (t * nh);
    const size_t channels = (size_t)nh * hs;
    const size_t head = (size_t)h * hs;
    const size_t matrix = ((size_t)bi * nh + h) * t * t;  // this head's [t, t] block
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float acc_k = 0.0f, acc_v = 0.0f;
        for (int i = 0; i < t; i++) {
            const size_t at = ((size_t)bi * t + i) * channels + head + d;
            acc_k += dscores[matrix + (size_t)i * t + j] * to_float(q[at]);
            const size_t index = matrix + (size_t)i * t + j;
            acc_v += dropped_weight(probs[index], index, drop_p, drop_scale, seed) * to_float(dout[at]);
        }
        const size_t at_j = ((size_t)bi * t + j) * channels + head + d;
        dk[at_j] = from_float<T>(to_float(dk[at_j]) + scale * acc_k);
        dv[at_j] = from_float<T>(to_float(dv[at_j]) + acc_v);
    }
}

#define KERNELS(T, SUFFIX)                                                                              \
    extern "C" __global__ void attention_forward_##SUFFIX(                                             \
        T* out, float* probs, const T* q, const T* k, const T* v, const uint8_t* mask, int b, int t,   \
        int nh, int hs, float scale, double drop_p, float drop_scale, uint64_t seed) {                 \
        attention_forward<T>(out, probs, q, k, v, mask, b, t, nh, hs, scale, drop_p, drop_scale, seed); \
    }                                                                                                   \
    extern "C" __global__ void attention_backward_query_##SUFFIX(                                      \
        T* dq, float* dscores, const T* dout, const T* k, const T* v, const float* probs, int b, int t, \
        int nh, int hs, float scale, double drop_p, float drop_scale, uint64_t seed) {                 \
        attention_backward_query<T>(dq, dscores, dout, k, v, probs, b, t, nh, hs, scale, drop_p,       \
                                    drop_scale, seed);                                                  \
    }                                                                                                   \
    extern "C" __global__ void attention_backward_key_##SUFFIX(                                        \
        T* dk, T* dv, const T* dout, const T* q, const float* probs, const float* dscores, int b,      \
        int t, int nh, int hs, float scale, double drop_p, float drop_scale, uint64_t seed) {          \
        attention_backward_key<T>(dk, dv, dout, q, probs, dscores, b, t, nh, hs, scale, drop_p,        \
                                  drop_scale, seed);                                                    \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
