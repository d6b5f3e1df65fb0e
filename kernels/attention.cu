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
// Three versions:
// 1. "stored probabilities" (attention_forward, attention_backward_query/_key): probs
//    [b, nh, t, t] written like the CPU reference, one block per (sequence, head, query
//    row) with serial loops over the keys. Kept for the kernel lab and as a second witness
//    in the tests.
// 2. flash-style (flash_attention_*): never stores the t x t matrix. The forward keeps tiles
//    of K and V in shared memory, runs an online softmax (running max and sum, fp32) and
//    saves only the log-sum-exp per query row; the backward recomputes p from it
//    (FlashAttention-2's two kernels, deterministic: no atomics). The model uses it in f32.
// 3. flash-style on tensor cores (flash_attention_tc_*, bf16 only): version 2's algorithm
//    with every product on wmma and the probabilities rounded to bf16 before they multiply
//    (as FlashAttention-2 in bf16). The model uses it in bf16.
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

// ---- Version 2: flash-style ------------------------------------------------------------
//
// Every flash kernel runs blocks of FLASH_WARPS warps on one (sequence, head) = blockIdx.y
// (bi = blockIdx.y / nh, h = blockIdx.y % nh) and one tile of FLASH_ROWS "own" rows
// starting at blockIdx.x * FLASH_ROWS: query rows in the forward and the dQ kernel, key
// rows in the dK/dV kernel. Warp w owns rows w*FLASH_ROWS_PER_WARP .. +FLASH_ROWS_PER_WARP
// of the tile, and streams the other side in tiles of FLASH_TILE = 32 rows, one per lane:
// lane l scores its streamed row against each own row, then the warp broadcasts the 32
// weights with shuffles and every lane accumulates head dims d = lane + 32c (c <
// FLASH_DIMS_PER_LANE), so hs <= 32 * FLASH_DIMS_PER_LANE = 128 (the host checks it).
// Tiles live in dynamic shared memory as fp32, whatever T is; a streamed tile that lanes
// read along rows (lane l: row l) has row stride hs | 1, odd, so the 32 lanes hit 32
// different banks. Rows beyond t are zero-filled and get weight 0, so loops never need
// per-lane bounds. The launch is grid (ceil(t / FLASH_ROWS), b * nh), FLASH_WARPS * 32
// threads, and 4 bytes of dynamic shared memory per float of the layout each kernel states
// (ops.rs's launch shapes compute the same; over 48 KiB they raise the kernel's limit).
#define FLASH_WARPS 4
#define FLASH_ROWS_PER_WARP 4
#define FLASH_ROWS (FLASH_WARPS * FLASH_ROWS_PER_WARP)
#define FLASH_TILE 32
#define FLASH_DIMS_PER_LANE 4

// Whether sequence bi has a real token at all; when none, every key is allowed (uniform
// attention, as the CPU). Block-wide: every thread must call it (it synchronises).
__device__ __forceinline__ bool sequence_has_real_token(const uint8_t* mask_b, int t) {
    bool local_real = false;
    for (int j = threadIdx.x; j < t; j += blockDim.x) local_real |= mask_b[j] != 0;
    return __syncthreads_or(local_real);
}

// Whether key j of a sequence of t gets weight: a real token, or any key when the sequence
// has none (any_real from sequence_has_real_token).
__device__ __forceinline__ bool key_allowed(const uint8_t* mask_b, bool any_real, int j, int t) {
    return j < t && (!any_real || mask_b[j] != 0);
}

// tile[rows, stride] (fp32) = rows first_row.. of one head of x [b, t, nh*hs] (head_base:
// element (bi, 0, h*hs)), zero past t. The block cooperates; consecutive threads read
// consecutive channels (coalesced). The caller synchronises before the tile is read.
template <typename T>
__device__ __forceinline__ void load_head_rows(float* tile, int stride, const T* x, size_t head_base,
                                               size_t channels, int first_row, int rows, int t, int hs) {
    for (int e = threadIdx.x; e < rows * hs; e += blockDim.x) {
        const int r = e / hs, d = e % hs;
        const int row = first_row + r;
        tile[r * stride + d] = row < t ? to_float(x[head_base + (size_t)row * channels + d]) : 0.0f;
    }
}

// sum_d a[d] * b[d] over one head (both in shared memory).
__device__ __forceinline__ float head_dot(const float* a, const float* b, int hs) {
    float dot = 0.0f;
    for (int d = 0; d < hs; d++) dot += a[d] * b[d];
    return dot;
}

// The factor dropout puts on element `index` of the virtual probs [b, nh, t, t]:
// drop_scale if kept, 0 if dropped, 1 without dropout (drop_p == 0: no hashing).
__device__ __forceinline__ float dropout_factor(size_t index, double drop_p, float drop_scale, uint64_t seed) {
    if (drop_p == 0.0) return 1.0f;
    return dropout_keep(seed, index, drop_p) ? drop_scale : 0.0f;
}

// out [b, t, nh*hs] = attention of q, k, v (see the top of the file); lse [b, nh, t] (fp32)
// = log sum_j exp(s_ij) over the allowed keys, s = scale q_i · k_j: the softmax is then
// p_ij = exp(s_ij - lse_i), which the backward recomputes.
// Online softmax, per own query row (state in the owning warp, identical in every lane):
// m = running max of the scores seen, l = running sum of exp(s - m), acc[d] = running sum
// of dropout(exp(s - m)) v[d]; a new key tile with max m' rescales l and acc by exp(m - m').
// At the end out = acc / l and lse = m + log l. Dropout multiplies the unnormalised weight
// by keep · drop_scale; l (the softmax's denominator) is the sum before dropout.
template <typename T>
__device__ void flash_attention_forward(T* out, float* lse, const T* q, const T* k, const T* v,
                                        const uint8_t* mask, int b, int t, int nh, int hs, float scale,
                                        double drop_p, float drop_scale, uint64_t seed) {
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * FLASH_ROWS;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int key_stride = hs | 1;
    // Shared: FLASH_ROWS * hs + FLASH_TILE * (hs | 1) + FLASH_TILE * hs floats.
    float* q_own = dynamic_shared<float>();             // [FLASH_ROWS, hs]
    float* k_tile = q_own + FLASH_ROWS * hs;             // [FLASH_TILE, key_stride]
    float* v_tile = k_tile + FLASH_TILE * key_stride;    // [FLASH_TILE, hs]
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    load_head_rows(q_own, hs, q, head_base, channels, first_query, FLASH_ROWS, t, hs);

    float running_max[FLASH_ROWS_PER_WARP], running_sum[FLASH_ROWS_PER_WARP];
    float acc[FLASH_ROWS_PER_WARP][FLASH_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
        running_max[r] = -INFINITY;
        running_sum[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) acc[r][c] = 0.0f;
    }
    for (int first_key = 0; first_key < t; first_key += FLASH_TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: q_own is written)
        load_head_rows(k_tile, key_stride, k, head_base, channels, first_key, FLASH_TILE, t, hs);
        load_head_rows(v_tile, hs, v, head_base, channels, first_key, FLASH_TILE, t, hs);
        __syncthreads();
        const int j = first_key + lane;  // this lane's key
        const bool allowed = key_allowed(mask_b, any_real, j, t);
#pragma unroll
        for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
            const int own = warp * FLASH_ROWS_PER_WARP + r, i = first_query + own;
            const float score = allowed ? scale * head_dot(q_own + own * hs, k_tile + lane * key_stride, hs)
                                        : -INFINITY;
            const float new_max = fmaxf(running_max[r], warp_max(score));
            // new_max == -inf: no allowed key yet, nothing accumulated; avoid -inf - -inf.
            const float rescale = new_max == -INFINITY ? 1.0f : expf(running_max[r] - new_max);
            const float e = score == -INFINITY ? 0.0f : expf(score - new_max);
            running_sum[r] = running_sum[r] * rescale + warp_sum(e);
            running_max[r] = new_max;
            float weight = e;
            if (allowed && i < t) {
                weight *= dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
            }
#pragma unroll
            for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) acc[r][c] *= rescale;
            for (int key = 0; key < FLASH_TILE; key++) {
                const float w = __shfl_sync(0xffffffffu, weight, key);
#pragma unroll
                for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hs) acc[r][c] += w * v_tile[key * hs + d];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
        const int i = first_query + warp * FLASH_ROWS_PER_WARP + r;
        if (i < t) {
            // running_sum >= 1: the row's maximum contributes exp(0) (t >= 1 and some key is allowed).
            const float inv_sum = 1.0f / running_sum[r];
            T* out_i = out + head_base + (size_t)i * channels;
#pragma unroll
            for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                const int d = lane + 32 * c;
                if (d < hs) out_i[d] = from_float<T>(acc[r][c] * inv_sum);
            }
            if (lane == 0) lse[(size_t)bh * t + i] = running_max[r] + logf(running_sum[r]);
        }
    }
}

// The backward's pre-pass: dot [b, nh, t] = D_i = dout_i · out_i, per (sequence, head, query
// row). It is the softmax backward's sum_j p_ij dp_ij, dropout or not: with w_ij = p_ij
// keep_ij drop_scale the weights that multiplied v, dp_ij = keep_ij drop_scale (dout_i · v_j),
// so sum_j p_ij dp_ij = dout_i · sum_j w_ij v_j = dout_i · out_i. (Without dropout keep ·
// drop_scale = 1.) `out` must be the forward's output, unchanged.
// One warp per row r = (bi*nh + h)*t + i; blocks of any multiple of 32 threads.
template <typename T>
__device__ void flash_attention_backward_dot(float* dot, const T* dout, const T* out, int b, int t, int nh,
                                             int hs) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)b * nh * t) return;  // whole warps leave together; no block sync below
    const size_t i = row % t, bh = row / t, bi = bh / nh, h = bh % nh;
    const size_t channels = (size_t)nh * hs;
    const size_t at = (bi * t + i) * channels + h * hs;
    float sum = 0.0f;
    for (int d = lane; d < hs; d += 32) sum += to_float(dout[at + d]) * to_float(out[at + d]);
    sum = warp_sum(sum);
    if (lane == 0) dot[row] = sum;
}

// dk, dv [b, t, nh*hs] += the key-side gradients, per tile of own KEY rows j, streaming the
// query tiles i (lane l: query first_query + l):
//   p_ij = exp(s_ij - lse_i) for allowed keys (0 otherwise), f_ij = the dropout factor,
//   dp_ij = f_ij (dout_i · v_j), ds_ij = p_ij (dp_ij - D_i),
//   dv_j += sum_i p_ij f_ij dout_i,  dk_j += scale sum_i ds_ij q_i.
// Each element is summed by one lane over i in order: deterministic.
template <typename T>
__device__ void flash_attention_backward_key(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                                             const float* lse, const float* dot, const uint8_t* mask, int b,
                                             int t, int nh, int hs, float scale, double drop_p,
                                             float drop_scale, uint64_t seed) {
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_key = blockIdx.x * FLASH_ROWS;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int stride = hs | 1;
    // Shared: 2 * FLASH_ROWS * hs + 2 * FLASH_TILE * (hs | 1) floats.
    float* k_own = dynamic_shared<float>();           // [FLASH_ROWS, hs]
    float* v_own = k_own + FLASH_ROWS * hs;            // [FLASH_ROWS, hs]
    float* q_tile = v_own + FLASH_ROWS * hs;           // [FLASH_TILE, stride]
    float* dout_tile = q_tile + FLASH_TILE * stride;   // [FLASH_TILE, stride]
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    load_head_rows(k_own, hs, k, head_base, channels, first_key, FLASH_ROWS, t, hs);
    load_head_rows(v_own, hs, v, head_base, channels, first_key, FLASH_ROWS, t, hs);

    float acc_k[FLASH_ROWS_PER_WARP][FLASH_DIMS_PER_LANE], acc_v[FLASH_ROWS_PER_WARP][FLASH_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
#pragma unroll
        for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) acc_k[r][c] = acc_v[r][c] = 0.0f;
    }
    for (int first_query = 0; first_query < t; first_query += FLASH_TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
        load_head_rows(q_tile, stride, q, head_base, channels, first_query, FLASH_TILE, t, hs);
        load_head_rows(dout_tile, stride, dout, head_base, channels, first_query, FLASH_TILE, t, hs);
        __syncthreads();
        const int i = first_query + lane;  // this lane's query
        const bool query_real = i < t;     // (a query past t has zero rows and gets weight 0)
        const float lse_i = query_real ? lse[(size_t)bh * t + i] : 0.0f;
        const float dot_i = query_real ? dot[(size_t)bh * t + i] : 0.0f;
#pragma unroll
        for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
            const int own = warp * FLASH_ROWS_PER_WARP + r, j = first_key + own;
            // Uniform across the warp: a disallowed key (padding, or past t) gets nothing.
            if (!key_allowed(mask_b, any_real, j, t)) continue;
            float weight = 0.0f, dscore = 0.0f;
            if (query_real) {
                const float p = expf(scale * head_dot(q_tile + lane * stride, k_own + own * hs, hs) - lse_i);
                const float f = dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
                weight = p * f;
                dscore = p * (f * head_dot(dout_tile + lane * stride, v_own + own * hs, hs) - dot_i);
            }
            for (int query = 0; query < FLASH_TILE; query++) {
                const float w = __shfl_sync(0xffffffffu, weight, query);
                const float ds = __shfl_sync(0xffffffffu, dscore, query);
#pragma unroll
                for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hs) {
                        acc_v[r][c] += w * dout_tile[query * stride + d];
                        acc_k[r][c] += ds * q_tile[query * stride + d];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
        const int j = first_key + warp * FLASH_ROWS_PER_WARP + r;
        if (j < t) {
            const size_t at = head_base + (size_t)j * channels;
#pragma unroll
            for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                const int d = lane + 32 * c;
                if (d < hs) {
                    dk[at + d] = from_float<T>(to_float(dk[at + d]) + scale * acc_k[r][c]);
                    dv[at + d] = from_float<T>(to_float(dv[at + d]) + acc_v[r][c]);
                }
            }
        }
    }
}

// dq [b, t, nh*hs] += scale sum_j ds_ij k_j, per tile of own QUERY rows i, streaming the key
// tiles (lane l: key first_key + l); ds as in flash_attention_backward_key. One lane sums
// each element over j in order: deterministic.
template <typename T>
__device__ void flash_attention_backward_query(T* dq, const T* dout, const T* q, const T* k, const T* v,
                                               const float* lse, const float* dot, const uint8_t* mask, int b,
                                               int t, int nh, int hs, float scale, double drop_p,
                                               float drop_scale, uint64_t seed) {
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * FLASH_ROWS;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int stride = hs | 1;
    // Shared: 2 * FLASH_ROWS * hs + 2 * FLASH_TILE * (hs | 1) floats, as the dK/dV kernel.
    float* q_own = dynamic_shared<float>();         // [FLASH_ROWS, hs]
    float* dout_own = q_own + FLASH_ROWS * hs;       // [FLASH_ROWS, hs]
    float* k_tile = dout_own + FLASH_ROWS * hs;      // [FLASH_TILE, stride]
    float* v_tile = k_tile + FLASH_TILE * stride;    // [FLASH_TILE, stride]
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    load_head_rows(q_own, hs, q, head_base, channels, first_query, FLASH_ROWS, t, hs);
    load_head_rows(dout_own, hs, dout, head_base, channels, first_query, FLASH_ROWS, t, hs);

    // This warp's rows' lse and D (0 past t: those rows are skipped).
    float lse_own[FLASH_ROWS_PER_WARP], dot_own[FLASH_ROWS_PER_WARP];
    float acc[FLASH_ROWS_PER_WARP][FLASH_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
        const int i = first_query + warp * FLASH_ROWS_PER_WARP + r;
        lse_own[r] = i < t ? lse[(size_t)bh * t + i] : 0.0f;
        dot_own[r] = i < t ? dot[(size_t)bh * t + i] : 0.0f;
#pragma unroll
        for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) acc[r][c] = 0.0f;
    }
    for (int first_key = 0; first_key < t; first_key += FLASH_TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
        load_head_rows(k_tile, stride, k, head_base, channels, first_key, FLASH_TILE, t, hs);
        load_head_rows(v_tile, stride, v, head_base, channels, first_key, FLASH_TILE, t, hs);
        __syncthreads();
        const int j = first_key + lane;  // this lane's key
        const bool allowed = key_allowed(mask_b, any_real, j, t);
#pragma unroll
        for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
            const int own = warp * FLASH_ROWS_PER_WARP + r, i = first_query + own;
            if (i >= t) continue;  // uniform across the warp
            float dscore = 0.0f;
            if (allowed) {
                const float p = expf(scale * head_dot(q_own + own * hs, k_tile + lane * stride, hs) - lse_own[r]);
                const float f = dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
                dscore = p * (f * head_dot(dout_own + own * hs, v_tile + lane * stride, hs) - dot_own[r]);
            }
            for (int key = 0; key < FLASH_TILE; key++) {
                const float ds = __shfl_sync(0xffffffffu, dscore, key);
#pragma unroll
                for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hs) acc[r][c] += ds * k_tile[key * stride + d];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
        const int i = first_query + warp * FLASH_ROWS_PER_WARP + r;
        if (i < t) {
            const size_t at = head_base + (size_t)i * channels;
#pragma unroll
            for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                const int d = lane + 32 * c;
                if (d < hs) dq[at + d] = from_float<T>(to_float(dq[at + d]) + scale * acc[r][c]);
            }
        }
    }
}


// Version 3: version 2 on tensor cores, bf16 only. The same contract (lse, the dot pre-pass
// flash_attention_backward_dot, mask, uniform case, dropout), the products through wmma
// (m16n16k16, bf16 inputs, fp32 accumulation). A block owns TC_ROWS = 64 rows (4 warps of
// 16) of one (sequence, head) and streams the other side in tiles of TILE rows: 64, or 32 in
// the backward when hs > 64 so that its shared memory stays within 99 KiB. Tiles are bf16 in
// shared memory, head dims zero-padded to hp = hs rounded up to 16, row stride hp + 8 (a
// multiple of 16 bytes, as wmma needs, and not of 128, which spreads the banks). Each warp
// stores its 16 x TILE products (scores, their gradients) to an fp32 scratch tile where lane
// l owns row l / 2 and half l % 2 of the columns, turns them into weights there, and writes
// those back as bf16 for the next product: FlashAttention-2's rounding in bf16. Padded
// rows and dims are zero, so they add nothing to any product.
#ifndef RCX_EMULATE
#include <mma.h>
#endif

#define TC_WARPS 4
#define TC_ROWS (TC_WARPS * 16)
#define TC_MAX_BLOCKS (128 / 16)  // 16-dim blocks of the largest head, hs <= 128
#define TC_FORWARD_TILE 64

typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major> TcRows;
// B operands: B[k][n] at ptr[k * ld + n] (a tile as it is), or at ptr[n * ld + k] (its transpose).
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::row_major> TcCols;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::col_major> TcColsT;
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> TcAcc;

__device__ __forceinline__ int tc_padded_head(int hs) { return (hs + 15) / 16 * 16; }
__device__ __forceinline__ int tc_backward_tile(int hs) { return tc_padded_head(hs) <= 64 ? 64 : 32; }

// tile[rows, ld] (bf16) = rows first_row.. of one head of x [b, t, nh*hs], dims zero-padded to
// hp, rows past t zero. The block cooperates; the caller synchronises before reading. When
// every head row starts 16-byte aligned (hs and the channels multiples of 8, the buffer
// aligned: the usual case), each thread moves 8 values at once.
__device__ __forceinline__ void tc_load_head_rows(bf16* tile, int ld, const bf16* x, size_t head_base,
                                                  size_t channels, int first_row, int rows, int t, int hs,
                                                  int hp) {
    const bool vectors = hs % 8 == 0 && channels % 8 == 0 && (uintptr_t)(x + head_base) % 16 == 0;
    if (vectors) {
        const int per_row = hp / 8;  // uint4 of 8 values; ld is a multiple of 8 too
        for (int e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
            const int r = e / per_row, d = e % per_row * 8, row = first_row + r;
            uint4 values = make_uint4(0u, 0u, 0u, 0u);
            if (row < t && d < hs) values = *reinterpret_cast<const uint4*>(x + head_base + (size_t)row * channels + d);
            *reinterpret_cast<uint4*>(tile + r * ld + d) = values;
        }
        return;
    }
    for (int e = threadIdx.x; e < rows * hp; e += blockDim.x) {
        const int r = e / hp, d = e % hp, row = first_row + r;
        tile[r * ld + d] =
            row < t && d < hs ? x[head_base + (size_t)row * channels + d] : __float2bfloat16_rn(0.0f);
    }
}

// scratch[16, TILE] (fp32, row stride ld) = rows[16, hp] · tile[TILE, hp]^T: one warp.
template <int TILE>
__device__ __forceinline__ void tc_rows_times_tile_transposed(float* scratch, int ld, const bf16* rows,
                                                              const bf16* tile, int ld_head, int hp) {
#pragma unroll
    for (int n = 0; n < TILE / 16; n++) {
        TcAcc product;
        nvcuda::wmma::fill_fragment(product, 0.0f);
        for (int kk = 0; kk < hp / 16; kk++) {
            TcRows a;
            TcColsT b;
            nvcuda::wmma::load_matrix_sync(a, rows + kk * 16, ld_head);
            nvcuda::wmma::load_matrix_sync(b, tile + n * 16 * ld_head + kk * 16, ld_head);
            nvcuda::wmma::mma_sync(product, a, b, product);
        }
        nvcuda::wmma::store_matrix_sync(scratch + n * 16, product, ld, nvcuda::wmma::mem_row_major);
    }
}

// acc += weights[16, TILE] (bf16, row stride ld_prob) · tile[TILE, 16 dims from dims_first]: one warp.
template <int TILE>
__device__ __forceinline__ void tc_weights_times_tile(TcAcc& acc, const bf16* weights, int ld_prob,
                                                      const bf16* tile, int ld_head, int dims_first) {
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
        TcRows a;
        TcCols b;
        nvcuda::wmma::load_matrix_sync(a, weights + kk * 16, ld_prob);
        nvcuda::wmma::load_matrix_sync(b, tile + kk * 16 * ld_head + dims_first, ld_head);
        nvcuda::wmma::mma_sync(acc, a, b, acc);
    }
}

// grad[own rows, dims] += factor · acc[n] for each 16-dim block n, through this warp's scratch
// [16, >= 16] (fp32). own_first: the warp's first own row. One warp; its lanes leave together.
__device__ __forceinline__ void tc_add_rows(bf16* grad, const TcAcc* acc, float factor, float* scratch, int ld,
                                            size_t head_base, size_t channels, int own_first, int t, int hs,
                                            int hp) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        if (n < hp / 16) {
            __syncwarp();  // the previous block's (or the caller's) scratch reads are done
            nvcuda::wmma::store_matrix_sync(scratch, acc[n], ld, nvcuda::wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int r = e / 16, d = n * 16 + e % 16, row = own_first + r;
                if (row < t && d < hs) {
                    const size_t at = head_base + (size_t)row * channels + d;
                    grad[at] = __float2bfloat16_rn(__bfloat162float(grad[at]) + factor * scratch[r * ld + e % 16]);
                }
            }
        }
    }
}

// Version 3 of flash_attention_forward; the online softmax as version 2's, per lane on its
// row's half of each key tile, the two halves combined with one shuffle. This lane's share
// of the output row: dims n * 16 + half * 8 + c (c < 8) of every 16-dim block n.
__device__ void tc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                     const uint8_t* mask, int b, int t, int nh, int hs, float scale,
                                     double drop_p, float drop_scale, uint64_t seed) {
    constexpr int TILE = TC_FORWARD_TILE, HALF = TILE / 2;
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1;
    const int first_query = blockIdx.x * TC_ROWS, i = first_query + warp * 16 + row;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int hp = tc_padded_head(hs), ld_head = hp + 8, ld_scratch = TILE + 4, ld_prob = TILE + 8;
    // Shared: (TC_ROWS + 2 TILE) ld_head bf16, then TC_WARPS [16, ld_scratch] fp32, then
    // TC_WARPS [16, ld_prob] bf16.
    bf16* q_own = dynamic_shared<bf16>();      // [TC_ROWS, ld_head]
    bf16* k_tile = q_own + TC_ROWS * ld_head;  // [TILE, ld_head]
    bf16* v_tile = k_tile + TILE * ld_head;    // [TILE, ld_head]
    float* scratch_all = reinterpret_cast<float*>(v_tile + TILE * ld_head);
    float* scratch = scratch_all + warp * 16 * ld_scratch;                                      // [16, ld_scratch]
    bf16* weights = reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 16 * ld_scratch) + warp * 16 * ld_prob;  // [16, ld_prob]
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    tc_load_head_rows(q_own, ld_head, q, head_base, channels, first_query, TC_ROWS, t, hs, hp);
    const bf16* q_warp = q_own + warp * 16 * ld_head;

    float running_max = -INFINITY, running_sum = 0.0f;
    float acc[TC_MAX_BLOCKS][8];
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
#pragma unroll
        for (int c = 0; c < 8; c++) acc[n][c] = 0.0f;
    }
    for (int first_key = 0; first_key < t; first_key += TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: q_own is written)
        tc_load_head_rows(k_tile, ld_head, k, head_base, channels, first_key, TILE, t, hs, hp);
        tc_load_head_rows(v_tile, ld_head, v, head_base, channels, first_key, TILE, t, hs, hp);
        __syncthreads();
        tc_rows_times_tile_transposed<TILE>(scratch, ld_scratch, q_warp, k_tile, ld_head, hp);
        __syncwarp();
        float* score = scratch + row * ld_scratch + half * HALF;
        float tile_max = -INFINITY;
        for (int c = 0; c < HALF; c++) {
            const int j = first_key + half * HALF + c;
            const bool allowed = key_allowed(mask_b, any_real, j, t);
            score[c] = allowed ? scale * score[c] : -INFINITY;
            tile_max = fmaxf(tile_max, score[c]);
        }
        const float new_max = fmaxf(running_max, fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1)));
        // new_max == -inf: no allowed key yet, nothing accumulated; avoid -inf - -inf.
        const float rescale = new_max == -INFINITY ? 1.0f : expf(running_max - new_max);
        float tile_sum = 0.0f;
        bf16* weight = weights + row * ld_prob + half * HALF;
        for (int c = 0; c < HALF; c++) {
            const int j = first_key + half * HALF + c;
            const float e = score[c] == -INFINITY ? 0.0f : expf(score[c] - new_max);
            tile_sum += e;
            const float f = e != 0.0f && i < t ? dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed)
                                              : 1.0f;
            weight[c] = __float2bfloat16_rn(e * f);
        }
        running_sum = running_sum * rescale + tile_sum + __shfl_xor_sync(0xffffffffu, tile_sum, 1);
        running_max = new_max;
#pragma unroll
        for (int n = 0; n < TC_MAX_BLOCKS; n++) {
            if (n < hp / 16) {
                TcAcc product;
                nvcuda::wmma::fill_fragment(product, 0.0f);
                __syncwarp();  // the weights are written; the scratch's previous reads are done
                tc_weights_times_tile<TILE>(product, weights, ld_prob, v_tile, ld_head, n * 16);
                nvcuda::wmma::store_matrix_sync(scratch, product, ld_scratch, nvcuda::wmma::mem_row_major);
                __syncwarp();
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    acc[n][c] = acc[n][c] * rescale + scratch[row * ld_scratch + half * 8 + c];
                }
            }
        }
    }
    if (i < t) {
        // running_sum >= 1: the row's maximum contributes exp(0) (some key is allowed).
        const float inv_sum = 1.0f / running_sum;
        bf16* out_i = out + head_base + (size_t)i * channels;
#pragma unroll
        for (int n = 0; n < TC_MAX_BLOCKS; n++) {
#pragma unroll
            for (int c = 0; c < 8; c++) {
                const int d = n * 16 + half * 8 + c;
                if (d < hs) out_i[d] = __float2bfloat16_rn(acc[n][c] * inv_sum);
            }
        }
        if (half == 0) lse[(size_t)bh * t + i] = running_max + logf(running_sum);
    }
}

// Version 3 of flash_attention_backward_key: per block 64 own KEY rows (16 per warp), the
// query tiles streamed; as version 2, with the transposed products: S^T = K_own Q^T and
// dP^T = V_own dO^T per tile, then dV_own += (p f)^T dO and dK_own += dS^T Q accumulated in
// fragments over all query tiles (one warp sums each element in tile order: deterministic).
template <int TILE>
__device__ void tc_attention_backward_key(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                          const bf16* v, const float* lse, const float* dot,
                                          const uint8_t* mask, int b, int t, int nh, int hs, float scale,
                                          double drop_p, float drop_scale, uint64_t seed) {
    constexpr int HALF = TILE / 2;
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1;
    const int first_key = blockIdx.x * TC_ROWS, own_first = first_key + warp * 16, j = own_first + row;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int hp = tc_padded_head(hs), ld_head = hp + 8, ld_scratch = TILE + 4, ld_prob = TILE + 8;
    // Shared: (2 TC_ROWS + 2 TILE) ld_head bf16, TC_WARPS x 2 [16, ld_scratch] fp32, TC_WARPS x
    // 2 [16, ld_prob] bf16, 2 TILE fp32.
    bf16* k_own = dynamic_shared<bf16>();          // [TC_ROWS, ld_head]
    bf16* v_own = k_own + TC_ROWS * ld_head;       // [TC_ROWS, ld_head]
    bf16* q_tile = v_own + TC_ROWS * ld_head;      // [TILE, ld_head]
    bf16* dout_tile = q_tile + TILE * ld_head;     // [TILE, ld_head]
    float* scratch_all = reinterpret_cast<float*>(dout_tile + TILE * ld_head);
    float* scores = scratch_all + warp * 2 * 16 * ld_scratch;  // [16, ld_scratch]: S^T
    float* dprobs = scores + 16 * ld_scratch;                  // [16, ld_scratch]: dP^T
    bf16* weights = reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 2 * 16 * ld_scratch) + warp * 2 * 16 * ld_prob;  // [16, ld_prob]: (p f)^T
    bf16* dscores = weights + 16 * ld_prob;                                                                         // [16, ld_prob]: dS^T
    float* lse_tile = reinterpret_cast<float*>(reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 2 * 16 * ld_scratch) +
                                               TC_WARPS * 2 * 16 * ld_prob);  // [TILE]
    float* dot_tile = lse_tile + TILE;                                          // [TILE]
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    // A disallowed key (padding, or past t) gets weight 0 from every query: zero gradients.
    const bool own_key_allowed = key_allowed(mask_b, any_real, j, t);
    tc_load_head_rows(k_own, ld_head, k, head_base, channels, first_key, TC_ROWS, t, hs, hp);
    tc_load_head_rows(v_own, ld_head, v, head_base, channels, first_key, TC_ROWS, t, hs, hp);
    const bf16* k_warp = k_own + warp * 16 * ld_head;
    const bf16* v_warp = v_own + warp * 16 * ld_head;

    TcAcc dk_acc[TC_MAX_BLOCKS], dv_acc[TC_MAX_BLOCKS];
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        nvcuda::wmma::fill_fragment(dk_acc[n], 0.0f);
        nvcuda::wmma::fill_fragment(dv_acc[n], 0.0f);
    }
    for (int first_query = 0; first_query < t; first_query += TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
        tc_load_head_rows(q_tile, ld_head, q, head_base, channels, first_query, TILE, t, hs, hp);
        tc_load_head_rows(dout_tile, ld_head, dout, head_base, channels, first_query, TILE, t, hs, hp);
        for (int e = threadIdx.x; e < TILE; e += blockDim.x) {
            const int i = first_query + e;
            lse_tile[e] = i < t ? lse[(size_t)bh * t + i] : 0.0f;
            dot_tile[e] = i < t ? dot[(size_t)bh * t + i] : 0.0f;
        }
        __syncthreads();
        tc_rows_times_tile_transposed<TILE>(scores, ld_scratch, k_warp, q_tile, ld_head, hp);
        tc_rows_times_tile_transposed<TILE>(dprobs, ld_scratch, v_warp, dout_tile, ld_head, hp);
        __syncwarp();
        for (int c = 0; c < HALF; c++) {
            const int col = half * HALF + c, i = first_query + col;
            float weight = 0.0f, dscore = 0.0f;
            if (own_key_allowed && i < t) {
                const float p = expf(scale * scores[row * ld_scratch + col] - lse_tile[col]);
                const float f = dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
                weight = p * f;
                dscore = p * (f * dprobs[row * ld_scratch + col] - dot_tile[col]);
            }
            weights[row * ld_prob + col] = __float2bfloat16_rn(weight);
            dscores[row * ld_prob + col] = __float2bfloat16_rn(dscore);
        }
        __syncwarp();
#pragma unroll
        for (int n = 0; n < TC_MAX_BLOCKS; n++) {
            if (n < hp / 16) {
                tc_weights_times_tile<TILE>(dv_acc[n], weights, ld_prob, dout_tile, ld_head, n * 16);
                tc_weights_times_tile<TILE>(dk_acc[n], dscores, ld_prob, q_tile, ld_head, n * 16);
            }
        }
    }
    tc_add_rows(dk, dk_acc, scale, scores, ld_scratch, head_base, channels, own_first, t, hs, hp);
    tc_add_rows(dv, dv_acc, 1.0f, dprobs, ld_scratch, head_base, channels, own_first, t, hs, hp);
}

// Version 3 of flash_attention_backward_query: per block 64 own QUERY rows, the key tiles
// streamed: S = Q_own K^T, dP = dO_own V^T, dS as version 2, dQ_own += dS K accumulated in
// fragments over all key tiles (deterministic).
template <int TILE>
__device__ void tc_attention_backward_query(bf16* dq, const bf16* dout, const bf16* q, const bf16* k,
                                            const bf16* v, const float* lse, const float* dot,
                                            const uint8_t* mask, int b, int t, int nh, int hs, float scale,
                                            double drop_p, float drop_scale, uint64_t seed) {
    constexpr int HALF = TILE / 2;
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1;
    const int first_query = blockIdx.x * TC_ROWS, own_first = first_query + warp * 16, i = own_first + row;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int hp = tc_padded_head(hs), ld_head = hp + 8, ld_scratch = TILE + 4, ld_prob = TILE + 8;
    // Shared: (2 TC_ROWS + 2 TILE) ld_head bf16, TC_WARPS x 2 [16, ld_scratch] fp32, TC_WARPS
    // [16, ld_prob] bf16.
    bf16* q_own = dynamic_shared<bf16>();          // [TC_ROWS, ld_head]
    bf16* dout_own = q_own + TC_ROWS * ld_head;    // [TC_ROWS, ld_head]
    bf16* k_tile = dout_own + TC_ROWS * ld_head;   // [TILE, ld_head]
    bf16* v_tile = k_tile + TILE * ld_head;        // [TILE, ld_head]
    float* scratch_all = reinterpret_cast<float*>(v_tile + TILE * ld_head);
    float* scores = scratch_all + warp * 2 * 16 * ld_scratch;  // [16, ld_scratch]: S
    float* dprobs = scores + 16 * ld_scratch;                  // [16, ld_scratch]: dP
    bf16* dscores = reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 2 * 16 * ld_scratch) + warp * 16 * ld_prob;  // [16, ld_prob]
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    tc_load_head_rows(q_own, ld_head, q, head_base, channels, first_query, TC_ROWS, t, hs, hp);
    tc_load_head_rows(dout_own, ld_head, dout, head_base, channels, first_query, TC_ROWS, t, hs, hp);
    const bf16* q_warp = q_own + warp * 16 * ld_head;
    const bf16* dout_warp = dout_own + warp * 16 * ld_head;
    const bool query_real = i < t;  // a row past t gets no gradient
    const float lse_i = query_real ? lse[(size_t)bh * t + i] : 0.0f;
    const float dot_i = query_real ? dot[(size_t)bh * t + i] : 0.0f;

    TcAcc dq_acc[TC_MAX_BLOCKS];
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) nvcuda::wmma::fill_fragment(dq_acc[n], 0.0f);
    for (int first_key = 0; first_key < t; first_key += TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
        tc_load_head_rows(k_tile, ld_head, k, head_base, channels, first_key, TILE, t, hs, hp);
        tc_load_head_rows(v_tile, ld_head, v, head_base, channels, first_key, TILE, t, hs, hp);
        __syncthreads();
        tc_rows_times_tile_transposed<TILE>(scores, ld_scratch, q_warp, k_tile, ld_head, hp);
        tc_rows_times_tile_transposed<TILE>(dprobs, ld_scratch, dout_warp, v_tile, ld_head, hp);
        __syncwarp();
        for (int c = 0; c < HALF; c++) {
            const int col = half * HALF + c, j = first_key + col;
            float dscore = 0.0f;
            if (query_real && key_allowed(mask_b, any_real, j, t)) {
                const float p = expf(scale * scores[row * ld_scratch + col] - lse_i);
                const float f = dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
                dscore = p * (f * dprobs[row * ld_scratch + col] - dot_i);
            }
            dscores[row * ld_prob + col] = __float2bfloat16_rn(dscore);
        }
        __syncwarp();
#pragma unroll
        for (int n = 0; n < TC_MAX_BLOCKS; n++) {
            if (n < hp / 16) tc_weights_times_tile<TILE>(dq_acc[n], dscores, ld_prob, k_tile, ld_head, n * 16);
        }
    }
    tc_add_rows(dq, dq_acc, scale, scores, ld_scratch, head_base, channels, own_first, t, hs, hp);
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
    }                                                                                                   \
    extern "C" __global__ void flash_attention_forward_##SUFFIX(                                       \
        T* out, float* lse, const T* q, const T* k, const T* v, const uint8_t* mask, int b, int t,     \
        int nh, int hs, float scale, double drop_p, float drop_scale, uint64_t seed) {                 \
        flash_attention_forward<T>(out, lse, q, k, v, mask, b, t, nh, hs, scale, drop_p, drop_scale,   \
                                   seed);                                                               \
    }                                                                                                   \
    extern "C" __global__ void flash_attention_backward_dot_##SUFFIX(float* dot, const T* dout,        \
                                                                     const T* out, int b, int t,       \
                                                                     int nh, int hs) {                 \
        flash_attention_backward_dot<T>(dot, dout, out, b, t, nh, hs);                                 \
    }                                                                                                   \
    extern "C" __global__ void flash_attention_backward_key_##SUFFIX(                                  \
        T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,             \
        const float* dot, const uint8_t* mask, int b, int t, int nh, int hs, float scale,              \
        double drop_p, float drop_scale, uint64_t seed) {                                              \
        flash_attention_backward_key<T>(dk, dv, dout, q, k, v, lse, dot, mask, b, t, nh, hs, scale,    \
                                        drop_p, drop_scale, seed);                                      \
    }                                                                                                   \
    extern "C" __global__ void flash_attention_backward_query_##SUFFIX(                                \
        T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* dot,  \
        const uint8_t* mask, int b, int t, int nh, int hs, float scale, double drop_p,                 \
        float drop_scale, uint64_t seed) {                                                             \
        flash_attention_backward_query<T>(dq, dout, q, k, v, lse, dot, mask, b, t, nh, hs, scale,      \
                                          drop_p, drop_scale, seed);                                    \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)

// Version 3 (tensor cores): bf16 only. Launch: grid (ceil(t / TC_ROWS), b * nh), TC_WARPS * 32
// threads, the dynamic shared memory each kernel states (ops.rs's launch shapes compute it).
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) flash_attention_tc_forward_bf16(
    bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const uint8_t* mask, int b, int t, int nh,
    int hs, float scale, double drop_p, float drop_scale, uint64_t seed) {
    tc_attention_forward(out, lse, q, k, v, mask, b, t, nh, hs, scale, drop_p, drop_scale, seed);
}
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) flash_attention_tc_backward_key_bf16(
    bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,
    const float* dot, const uint8_t* mask, int b, int t, int nh, int hs, float scale, double drop_p,
    float drop_scale, uint64_t seed) {
    if (tc_backward_tile(hs) == 64) {
        tc_attention_backward_key<64>(dk, dv, dout, q, k, v, lse, dot, mask, b, t, nh, hs, scale, drop_p,
                                      drop_scale, seed);
    } else {
        tc_attention_backward_key<32>(dk, dv, dout, q, k, v, lse, dot, mask, b, t, nh, hs, scale, drop_p,
                                      drop_scale, seed);
    }
}
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) flash_attention_tc_backward_query_bf16(
    bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse, const float* dot,
    const uint8_t* mask, int b, int t, int nh, int hs, float scale, double drop_p, float drop_scale,
    uint64_t seed) {
    if (tc_backward_tile(hs) == 64) {
        tc_attention_backward_query<64>(dq, dout, q, k, v, lse, dot, mask, b, t, nh, hs, scale, drop_p,
                                        drop_scale, seed);
    } else {
        tc_attention_backward_query<32>(dq, dout, q, k, v, lse, dot, mask, b, t, nh, hs, scale, drop_p,
                                        drop_scale, seed);
    }
}
