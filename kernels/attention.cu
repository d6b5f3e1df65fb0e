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
// Two versions:
// 1. "stored probabilities" (attention_forward, attention_backward_query/_key): probs
//    [b, nh, t, t] written like the CPU reference, one block per (sequence, head, query
//    row) with serial loops over the keys. Kept for the kernel lab and as a second witness
//    in the tests.
// 2. flash-style (flash_attention_*): never stores the t x t matrix. The forward keeps tiles
//    of K and V in shared memory, runs an online softmax (running max and sum, fp32) and
//    saves only the log-sum-exp per query row; the backward recomputes p from it
//    (FlashAttention-2's two kernels, deterministic: no atomics). The model uses this one.
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
        const bool allowed = j < t && (!any_real || mask_b[j] != 0);
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
            if (j >= t || (any_real && mask_b[j] == 0)) continue;
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
        const bool allowed = j < t && (!any_real || mask_b[j] != 0);
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
