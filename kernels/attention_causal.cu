// Causal softmax attention with grouped-query heads, a key padding mask and an optional
// shared prompt prefix, as Llama, Mistral and Qwen2 attend; the CPU twin is
// src/backend/cpu/attention_causal.rs (its doc comments define the semantics).
//
// Layouts: q, out, dout [b, t, nh*hs]; k, v [b, t, nkv*hs] (heads interleaved along the
// channels); query head h reads key/value head h / (nh / nkv). mask [b, t] (1 = real
// token). The prefix: pk, pv [prompts, tp, nkv*hs], pmask [prompts, tp], of_sequence [b]
// (the prompt each sequence continues); tp = 0 means no prefix (the pointers are then
// unused and may be null). A sequence whose of_sequence is >= prompts (the caller checks
// them) sees no prefix: never a read out of bounds.
//
// Query i of sequence s attends to the prefix keys j of prompt of_sequence[s] with
// pmask = 1, then to its own keys j <= i with mask[j] = 1. A query with no allowed key gets
// zero output and saves lse = +inf, so that every probability the backward recomputes,
// exp(s - lse), is exactly 0 (the CPU twin gives such rows zero weight everywhere).
// Scores are scale · q·k, scale = 1/sqrt(hs). Dropout on the probabilities (training): the
// weight that multiplies v is p · keep · drop_scale, keep = dropout_keep(seed, index,
// drop_p) with index the element's place in the CPU twin's probs [b, nh, t, tp + t]
// (columns: the prefix keys, then the own keys), drop_scale = 1 / (1 - drop_p) rounded to
// fp32 by the host; drop_p = 0: no dropout, no hashing. The backward redraws the mask.
//
// Two versions, both flash-style; the kernel lab validates and times each:
// 1. CUDA cores (causal_attention_*_f32/_bf16): below.
// 2. Tensor cores (causal_attention_tc_*_bf16): at the end of the file. The model
//    runs it in bf16 where hs is a multiple of 16 (src/backend/cuda/decoder_ops.rs
//    `CausalKernels::for_shape`), version 1 otherwise.
//
// Version 1, as kernels/attention.cu's version 2 (FlashAttention-2's algorithm on CUDA
// cores, fp32 arithmetic, tiles in shared memory as fp32 whatever T is): the forward runs
// an online softmax over the prefix key tiles, then over the own key tiles up to the
// diagonal (tiles wholly above it are skipped), and saves one log-sum-exp per query row;
// the backward recomputes the probabilities from it in three launches, no atomics:
//   causal_attention_backward_dot: D_i = dout_i · out_i per query row;
//   causal_attention_backward_key: dk, dv of the sequences' own keys, one block per key
//     tile and key/value head, summing over the query heads of its group in order;
//   causal_attention_backward_prefix_key: dk, dv of the prompts' keys, one block per key
//     tile, prompt and key/value head, summing over the sequences that continue the prompt
//     (in batch order) and the query heads of the group (in order);
//   causal_attention_backward_query: dq, one block per query tile and query head.
// Every gradient element is summed by one lane in a fixed order: the same bits every run.
//
// Blocks are CAUSAL_WARPS warps over CAUSAL_ROWS "own" rows (query rows in the forward and
// the dq kernel, key rows in the dk/dv kernels), streaming the other side in tiles of
// CAUSAL_TILE rows, one per lane: lane l scores its streamed row against each own row,
// the warp broadcasts the 32 weights by shuffles and every lane accumulates the head dims
// d = lane + 32c (c < CAUSAL_DIMS_PER_LANE), so hs <= 128 (the host checks it). Streamed
// tiles that lanes read along rows have the odd row stride hs | 1 (no bank conflicts).
// Rows past the end are zero-filled and get weight 0. Launch: 128 threads, grid
// (ceil(rows / CAUSAL_ROWS), heads), dynamic shared memory as each kernel states (4 bytes
// per float; src/backend/cuda/decoder_ops.rs computes the same).
#include "common.cuh"

#define CAUSAL_WARPS 4
#define CAUSAL_ROWS_PER_WARP 4
#define CAUSAL_ROWS (CAUSAL_WARPS * CAUSAL_ROWS_PER_WARP)
#define CAUSAL_TILE 32
#define CAUSAL_DIMS_PER_LANE 4

// The shapes and the prefix of one call.
struct CausalShape {
    int b, t, nh, nkv, hs;
    int prompts, tp;  // tp = 0: no prefix
};

// tile[rows, stride] (fp32) = rows first_row.. of one head of x [*, len, channels] starting
// at element head_base (row 0 of the head), zero from row `len` on. The block cooperates
// (coalesced along the channels); the caller synchronises before the tile is read.
template <typename T>
__device__ __forceinline__ void load_rows(float* tile, int stride, const T* x, size_t head_base, size_t channels,
                                          int first_row, int rows, int len, int hs) {
    for (int e = threadIdx.x; e < rows * hs; e += blockDim.x) {
        const int r = e / hs, d = e % hs;
        const int row = first_row + r;
        tile[r * stride + d] = row < len ? to_float(x[head_base + (size_t)row * channels + d]) : 0.0f;
    }
}

// sum_d a[d] * b[d] over one head (both in shared memory).
__device__ __forceinline__ float head_dot(const float* a, const float* b, int hs) {
    float dot = 0.0f;
    for (int d = 0; d < hs; d++) dot += a[d] * b[d];
    return dot;
}

// The prompt sequence bi continues, or -1 when there is no prefix (or an invalid index).
__device__ __forceinline__ int prompt_of(const unsigned* of_sequence, const CausalShape& s, int bi) {
    if (s.tp == 0) return -1;
    const unsigned prompt = of_sequence[bi];
    return prompt < (unsigned)s.prompts ? (int)prompt : -1;
}

// The dropout of a call: p, the fp32 scale of a kept weight (1 / (1 - p) rounded by the
// host), the seed; p = 0: no dropout, no hashing.
struct CausalDropout {
    double p;
    float scale;
    uint64_t seed;
};

// The factor dropout puts on element `index` of the virtual probs [b, nh, t, tp + t] (the
// CPU twin's probabilities: columns 0..tp the prefix keys, then the own keys): the scale
// if kept, 0 if dropped, 1 without dropout.
__device__ __forceinline__ float dropout_factor(size_t index, const CausalDropout& drop) {
    if (drop.p == 0.0) return 1.0f;
    return dropout_keep(drop.seed, index, drop.p) ? drop.scale : 0.0f;
}

// Per own query row of a warp: the online softmax's running max m, running sum l of
// exp(score - m), and acc[d] = running sum of exp(score - m) v[d].
struct OnlineRows {
    float max[CAUSAL_ROWS_PER_WARP], sum[CAUSAL_ROWS_PER_WARP];
    float acc[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE];
};

// Folds one streamed key tile (k_tile [CAUSAL_TILE, hs|1], v_tile [CAUSAL_TILE, hs]) into
// the warp's rows. Lane l's key is allowed when lane_allowed and, for own keys
// (causal_first_key >= 0: the tile's first own key index), key <= the query's index.
// probs_column: the column of lane l's key in probs; bh_t = (bi * nh + h) * t.
__device__ __forceinline__ void forward_tile(OnlineRows& rows, const float* q_own, const float* k_tile,
                                             const float* v_tile, const CausalShape& s, float scale,
                                             bool lane_allowed, int causal_first_key, int first_query,
                                             size_t bh_t, int probs_column, const CausalDropout& drop) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, hs = s.hs;
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int own = warp * CAUSAL_ROWS_PER_WARP + r, i = first_query + own;
        const bool allowed = lane_allowed && (causal_first_key < 0 || causal_first_key + lane <= i);
        const float score = allowed ? scale * head_dot(q_own + own * hs, k_tile + lane * (hs | 1), hs) : -INFINITY;
        const float new_max = fmaxf(rows.max[r], warp_max(score));
        // new_max == -inf: no allowed key yet, nothing accumulated; avoid -inf - -inf.
        const float rescale = new_max == -INFINITY ? 1.0f : expf(rows.max[r] - new_max);
        const float e = score == -INFINITY ? 0.0f : expf(score - new_max);
        // The sum (the softmax's denominator) is before dropout; the weight after it.
        const float f = e != 0.0f && i < s.t
                            ? dropout_factor((bh_t + i) * (size_t)(s.tp + s.t) + probs_column, drop)
                            : 1.0f;
        const float dropped = e * f;
        rows.sum[r] = rows.sum[r] * rescale + warp_sum(e);
        rows.max[r] = new_max;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) rows.acc[r][c] *= rescale;
        for (int key = 0; key < CAUSAL_TILE; key++) {
            const float w = __shfl_sync(0xffffffffu, dropped, key);
#pragma unroll
            for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) {
                const int d = lane + 32 * c;
                if (d < hs) rows.acc[r][c] += w * v_tile[key * hs + d];
            }
        }
    }
}

// out [b, t, nh*hs] and lse [b, nh, t] (see the top of the file). Grid (ceil(t / CAUSAL_ROWS),
// b * nh). Shared: CAUSAL_ROWS * hs + CAUSAL_TILE * (hs | 1) + CAUSAL_TILE * hs floats.
template <typename T>
__device__ void causal_attention_forward(T* out, float* lse, const T* q, const T* k, const T* v,
                                         const uint8_t* mask, const T* pk, const T* pv, const uint8_t* pmask,
                                         const unsigned* of_sequence, CausalShape s, float scale,
                                         CausalDropout drop) {
    const int bh = blockIdx.y, bi = bh / s.nh, h = bh % s.nh, g = h / (s.nh / s.nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * CAUSAL_ROWS;
    const int hs = s.hs, key_stride = hs | 1;
    const size_t q_channels = (size_t)s.nh * hs, kv_channels = (size_t)s.nkv * hs;
    const size_t q_base = (size_t)bi * s.t * q_channels + (size_t)h * hs;
    const size_t kv_base = (size_t)bi * s.t * kv_channels + (size_t)g * hs;
    float* q_own = dynamic_shared<float>();            // [CAUSAL_ROWS, hs]
    float* k_tile = q_own + CAUSAL_ROWS * hs;           // [CAUSAL_TILE, hs | 1]
    float* v_tile = k_tile + CAUSAL_TILE * key_stride;  // [CAUSAL_TILE, hs]
    load_rows(q_own, hs, q, q_base, q_channels, first_query, CAUSAL_ROWS, s.t, hs);

    OnlineRows rows;
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        rows.max[r] = -INFINITY;
        rows.sum[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) rows.acc[r][c] = 0.0f;
    }
    const int prompt = prompt_of(of_sequence, s, bi);
    if (prompt >= 0) {
        const size_t p_base = (size_t)prompt * s.tp * kv_channels + (size_t)g * hs;
        const uint8_t* pmask_p = pmask + (size_t)prompt * s.tp;
        for (int first_key = 0; first_key < s.tp; first_key += CAUSAL_TILE) {
            __syncthreads();  // the previous tiles are no longer read (first pass: q_own is written)
            load_rows(k_tile, key_stride, pk, p_base, kv_channels, first_key, CAUSAL_TILE, s.tp, hs);
            load_rows(v_tile, hs, pv, p_base, kv_channels, first_key, CAUSAL_TILE, s.tp, hs);
            __syncthreads();
            const int j = first_key + lane;
            const bool lane_allowed = j < s.tp && pmask_p[j] != 0;
            forward_tile(rows, q_own, k_tile, v_tile, s, scale, lane_allowed, -1, first_query, (size_t)bh * s.t, j,
                         drop);
        }
    }
    // Own keys up to the block's last query: later tiles are wholly in the future.
    const uint8_t* mask_b = mask + (size_t)bi * s.t;
    const int key_end = min(s.t, first_query + CAUSAL_ROWS);
    for (int first_key = 0; first_key < key_end; first_key += CAUSAL_TILE) {
        __syncthreads();
        load_rows(k_tile, key_stride, k, kv_base, kv_channels, first_key, CAUSAL_TILE, s.t, hs);
        load_rows(v_tile, hs, v, kv_base, kv_channels, first_key, CAUSAL_TILE, s.t, hs);
        __syncthreads();
        const int j = first_key + lane;
        const bool lane_allowed = j < s.t && mask_b[j] != 0;
        forward_tile(rows, q_own, k_tile, v_tile, s, scale, lane_allowed, first_key, first_query, (size_t)bh * s.t,
                     s.tp + j, drop);
    }
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int i = first_query + warp * CAUSAL_ROWS_PER_WARP + r;
        if (i >= s.t) continue;
        // sum == 0 only when no key was allowed (else the maximum contributes exp(0) = 1).
        const bool any = rows.sum[r] > 0.0f;
        const float inv_sum = any ? 1.0f / rows.sum[r] : 0.0f;
        T* out_i = out + q_base + (size_t)i * q_channels;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) {
            const int d = lane + 32 * c;
            if (d < hs) out_i[d] = from_float<T>(rows.acc[r][c] * inv_sum);
        }
        if (lane == 0) lse[(size_t)bh * s.t + i] = any ? rows.max[r] + logf(rows.sum[r]) : INFINITY;
    }
}

// dot [b, nh, t] = D_i = dout_i · out_i, the softmax backward's sum_j p_ij dp_ij. One warp
// per row r = (bi*nh + h)*t + i; blocks of any multiple of 32 threads.
template <typename T>
__device__ void causal_attention_backward_dot(float* dot, const T* dout, const T* out, int b, int t, int nh,
                                              int hs) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)b * nh * t) return;  // whole warps leave together; no block sync below
    const size_t i = row % t, bh = row / t, bi = bh / nh, h = bh % nh;
    const size_t at = (bi * t + i) * nh * hs + h * hs;
    float sum = 0.0f;
    for (int d = lane; d < hs; d += 32) sum += to_float(dout[at + d]) * to_float(out[at + d]);
    sum = warp_sum(sum);
    if (lane == 0) dot[row] = sum;
}

// The key side of the backward for the block's own key rows (k_own, v_own [CAUSAL_ROWS, hs],
// keys first_key.., allowed per row as key_ok), against the queries of sequence bi, query
// head h, from first_query_start to t (lane l: query first_query + l), f_ij the dropout:
//   p_ij = exp(scale q_i·k_j - lse_i), ds_ij = p_ij (f_ij dout_i·v_j - D_i),
//   acc_v_j += p_ij f_ij dout_i, acc_k_j += ds_ij q_i,
// over the allowed pairs: causal (the own keys): j <= i. probs_column: the column of key
// first_key in probs (tp for the own keys, 0 for the prefix's).
template <typename T>
__device__ void key_side(float (&acc_k)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE],
                         float (&acc_v)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE], const float* k_own,
                         const float* v_own, float* q_tile, float* dout_tile, const bool (&key_ok)[CAUSAL_ROWS_PER_WARP],
                         const T* q, const T* dout, const float* lse, const float* dot, const CausalShape& s,
                         int bi, int h, int first_query_start, int first_key, bool causal, int probs_column,
                         float scale, const CausalDropout& drop) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hs = s.hs, stride = hs | 1;
    const size_t q_channels = (size_t)s.nh * hs;
    const size_t q_base = (size_t)bi * s.t * q_channels + (size_t)h * hs;
    const size_t row_base = ((size_t)bi * s.nh + h) * s.t;  // of lse and dot
    for (int first_query = first_query_start; first_query < s.t; first_query += CAUSAL_TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
        load_rows(q_tile, stride, q, q_base, q_channels, first_query, CAUSAL_TILE, s.t, hs);
        load_rows(dout_tile, stride, dout, q_base, q_channels, first_query, CAUSAL_TILE, s.t, hs);
        __syncthreads();
        const int i = first_query + lane;
        const bool query_real = i < s.t;
        const float lse_i = query_real ? lse[row_base + i] : INFINITY;
        const float dot_i = query_real ? dot[row_base + i] : 0.0f;
#pragma unroll
        for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
            const int own = warp * CAUSAL_ROWS_PER_WARP + r;
            if (!key_ok[r]) continue;  // uniform across the warp
            const bool allowed = query_real && (!causal || first_key + own <= i);
            float weight = 0.0f, dscore = 0.0f;
            if (allowed) {
                const float p = expf(scale * head_dot(q_tile + lane * stride, k_own + own * hs, hs) - lse_i);
                const size_t index = (row_base + i) * (size_t)(s.tp + s.t) + probs_column + own;
                const float f = dropout_factor(index, drop);
                weight = p * f;
                dscore = p * (f * head_dot(dout_tile + lane * stride, v_own + own * hs, hs) - dot_i);
            }
            for (int query = 0; query < CAUSAL_TILE; query++) {
                const float w = __shfl_sync(0xffffffffu, weight, query);
                const float ds = __shfl_sync(0xffffffffu, dscore, query);
#pragma unroll
                for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hs) {
                        acc_v[r][c] += w * dout_tile[query * stride + d];
                        acc_k[r][c] += ds * q_tile[query * stride + d];
                    }
                }
            }
        }
    }
}

// dk_rows, dv_rows (rows first_key.. of one head at `base`, `channels` apart, `len` rows)
// += scale · acc_k, acc_v.
template <typename T>
__device__ __forceinline__ void add_key_grads(T* dk, T* dv, size_t base, size_t channels, int first_key, int len,
                                              int hs, float scale,
                                              const float (&acc_k)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE],
                                              const float (&acc_v)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int j = first_key + warp * CAUSAL_ROWS_PER_WARP + r;
        if (j >= len) continue;
        const size_t at = base + (size_t)j * channels;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) {
            const int d = lane + 32 * c;
            if (d < hs) {
                dk[at + d] = from_float<T>(to_float(dk[at + d]) + scale * acc_k[r][c]);
                dv[at + d] = from_float<T>(to_float(dv[at + d]) + acc_v[r][c]);
            }
        }
    }
}

// dk, dv [b, t, nkv*hs] += the gradients of the sequences' own keys and values. Grid
// (ceil(t / CAUSAL_ROWS), b * nkv); block (bi, g) sums over the query heads of group g in
// order, each over its queries from the tile's first key on (earlier ones cannot see it).
// Shared: 2 * CAUSAL_ROWS * hs + 2 * CAUSAL_TILE * (hs | 1) floats.
template <typename T>
__device__ void causal_attention_backward_key(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                                              const float* lse, const float* dot, const uint8_t* mask,
                                              CausalShape s, float scale, CausalDropout drop) {
    const int bg = blockIdx.y, bi = bg / s.nkv, g = bg % s.nkv, group = s.nh / s.nkv;
    const int warp = threadIdx.x >> 5;
    const int first_key = blockIdx.x * CAUSAL_ROWS;
    const int hs = s.hs, stride = hs | 1;
    const size_t kv_channels = (size_t)s.nkv * hs;
    const size_t kv_base = (size_t)bi * s.t * kv_channels + (size_t)g * hs;
    float* k_own = dynamic_shared<float>();            // [CAUSAL_ROWS, hs]
    float* v_own = k_own + CAUSAL_ROWS * hs;            // [CAUSAL_ROWS, hs]
    float* q_tile = v_own + CAUSAL_ROWS * hs;           // [CAUSAL_TILE, stride]
    float* dout_tile = q_tile + CAUSAL_TILE * stride;   // [CAUSAL_TILE, stride]
    load_rows(k_own, hs, k, kv_base, kv_channels, first_key, CAUSAL_ROWS, s.t, hs);
    load_rows(v_own, hs, v, kv_base, kv_channels, first_key, CAUSAL_ROWS, s.t, hs);
    const uint8_t* mask_b = mask + (size_t)bi * s.t;
    float acc_k[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE], acc_v[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE];
    bool key_ok[CAUSAL_ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int j = first_key + warp * CAUSAL_ROWS_PER_WARP + r;
        key_ok[r] = j < s.t && mask_b[j] != 0;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) acc_k[r][c] = acc_v[r][c] = 0.0f;
    }
    for (int h = g * group; h < (g + 1) * group; h++) {
        key_side(acc_k, acc_v, k_own, v_own, q_tile, dout_tile, key_ok, q, dout, lse, dot, s, bi, h, first_key,
                 first_key, true, s.tp + first_key, scale, drop);
    }
    add_key_grads(dk, dv, kv_base, kv_channels, first_key, s.t, hs, scale, acc_k, acc_v);
}

// dpk, dpv [prompts, tp, nkv*hs] += the gradients of the prompts' keys and values, summed
// over every sequence that continues the prompt (in batch order) and the query heads of the
// group (in order). Grid (ceil(tp / CAUSAL_ROWS), prompts * nkv); shared as the own-key
// kernel. Every query of a continuing sequence sees every real prompt key.
template <typename T>
__device__ void causal_attention_backward_prefix_key(T* dpk, T* dpv, const T* dout, const T* q, const T* pk,
                                                     const T* pv, const uint8_t* pmask, const unsigned* of_sequence,
                                                     const float* lse, const float* dot, CausalShape s,
                                                     float scale, CausalDropout drop) {
    const int pg = blockIdx.y, prompt = pg / s.nkv, g = pg % s.nkv, group = s.nh / s.nkv;
    const int warp = threadIdx.x >> 5;
    const int first_key = blockIdx.x * CAUSAL_ROWS;
    const int hs = s.hs, stride = hs | 1;
    const size_t kv_channels = (size_t)s.nkv * hs;
    const size_t p_base = (size_t)prompt * s.tp * kv_channels + (size_t)g * hs;
    float* k_own = dynamic_shared<float>();            // [CAUSAL_ROWS, hs]
    float* v_own = k_own + CAUSAL_ROWS * hs;            // [CAUSAL_ROWS, hs]
    float* q_tile = v_own + CAUSAL_ROWS * hs;           // [CAUSAL_TILE, stride]
    float* dout_tile = q_tile + CAUSAL_TILE * stride;   // [CAUSAL_TILE, stride]
    load_rows(k_own, hs, pk, p_base, kv_channels, first_key, CAUSAL_ROWS, s.tp, hs);
    load_rows(v_own, hs, pv, p_base, kv_channels, first_key, CAUSAL_ROWS, s.tp, hs);
    const uint8_t* pmask_p = pmask + (size_t)prompt * s.tp;
    float acc_k[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE], acc_v[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE];
    bool key_ok[CAUSAL_ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int j = first_key + warp * CAUSAL_ROWS_PER_WARP + r;
        key_ok[r] = j < s.tp && pmask_p[j] != 0;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) acc_k[r][c] = acc_v[r][c] = 0.0f;
    }
    for (int bi = 0; bi < s.b; bi++) {
        if (of_sequence[bi] != (unsigned)prompt) continue;  // uniform across the block
        for (int h = g * group; h < (g + 1) * group; h++) {
            key_side(acc_k, acc_v, k_own, v_own, q_tile, dout_tile, key_ok, q, dout, lse, dot, s, bi, h, 0,
                     first_key, false, first_key, scale, drop);
        }
    }
    add_key_grads(dpk, dpv, p_base, kv_channels, first_key, s.tp, hs, scale, acc_k, acc_v);
}

// Folds one streamed key tile (k_tile, v_tile [CAUSAL_TILE, hs|1]) into the warp's dq
// accumulators: acc_i += ds_ij k_j. Allowance and dropout as forward_tile's.
__device__ __forceinline__ void query_tile(float (&acc)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE],
                                           const float* q_own, const float* dout_own, const float* k_tile,
                                           const float* v_tile, const float (&lse_own)[CAUSAL_ROWS_PER_WARP],
                                           const float (&dot_own)[CAUSAL_ROWS_PER_WARP], const CausalShape& s,
                                           float scale, bool lane_allowed, int causal_first_key, int first_query,
                                           size_t bh_t, int probs_column, const CausalDropout& drop) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, hs = s.hs, t = s.t, stride = hs | 1;
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int own = warp * CAUSAL_ROWS_PER_WARP + r, i = first_query + own;
        if (i >= t) continue;  // uniform across the warp
        const bool allowed = lane_allowed && (causal_first_key < 0 || causal_first_key + lane <= i);
        float dscore = 0.0f;
        if (allowed) {
            const float p = expf(scale * head_dot(q_own + own * hs, k_tile + lane * stride, hs) - lse_own[r]);
            const float f = dropout_factor((bh_t + i) * (size_t)(s.tp + s.t) + probs_column, drop);
            dscore = p * (f * head_dot(dout_own + own * hs, v_tile + lane * stride, hs) - dot_own[r]);
        }
        for (int key = 0; key < CAUSAL_TILE; key++) {
            const float ds = __shfl_sync(0xffffffffu, dscore, key);
#pragma unroll
            for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) {
                const int d = lane + 32 * c;
                if (d < hs) acc[r][c] += ds * k_tile[key * stride + d];
            }
        }
    }
}

// dq [b, t, nh*hs] += scale sum_j ds_ij k_j over the prefix keys, then the own keys up to
// the diagonal. Grid (ceil(t / CAUSAL_ROWS), b * nh); shared as the key kernels.
template <typename T>
__device__ void causal_attention_backward_query(T* dq, const T* dout, const T* q, const T* k, const T* v,
                                                const float* lse, const float* dot, const uint8_t* mask,
                                                const T* pk, const T* pv, const uint8_t* pmask,
                                                const unsigned* of_sequence, CausalShape s, float scale,
                                                CausalDropout drop) {
    const int bh = blockIdx.y, bi = bh / s.nh, h = bh % s.nh, g = h / (s.nh / s.nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * CAUSAL_ROWS;
    const int hs = s.hs, stride = hs | 1;
    const size_t q_channels = (size_t)s.nh * hs, kv_channels = (size_t)s.nkv * hs;
    const size_t q_base = (size_t)bi * s.t * q_channels + (size_t)h * hs;
    const size_t kv_base = (size_t)bi * s.t * kv_channels + (size_t)g * hs;
    float* q_own = dynamic_shared<float>();          // [CAUSAL_ROWS, hs]
    float* dout_own = q_own + CAUSAL_ROWS * hs;       // [CAUSAL_ROWS, hs]
    float* k_tile = dout_own + CAUSAL_ROWS * hs;      // [CAUSAL_TILE, stride]
    float* v_tile = k_tile + CAUSAL_TILE * stride;    // [CAUSAL_TILE, stride]
    load_rows(q_own, hs, q, q_base, q_channels, first_query, CAUSAL_ROWS, s.t, hs);
    load_rows(dout_own, hs, dout, q_base, q_channels, first_query, CAUSAL_ROWS, s.t, hs);
    float lse_own[CAUSAL_ROWS_PER_WARP], dot_own[CAUSAL_ROWS_PER_WARP];
    float acc[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int i = first_query + warp * CAUSAL_ROWS_PER_WARP + r;
        lse_own[r] = i < s.t ? lse[(size_t)bh * s.t + i] : INFINITY;
        dot_own[r] = i < s.t ? dot[(size_t)bh * s.t + i] : 0.0f;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) acc[r][c] = 0.0f;
    }
    const int prompt = prompt_of(of_sequence, s, bi);
    if (prompt >= 0) {
        const size_t p_base = (size_t)prompt * s.tp * kv_channels + (size_t)g * hs;
        const uint8_t* pmask_p = pmask + (size_t)prompt * s.tp;
        for (int first_key = 0; first_key < s.tp; first_key += CAUSAL_TILE) {
            __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
            load_rows(k_tile, stride, pk, p_base, kv_channels, first_key, CAUSAL_TILE, s.tp, hs);
            load_rows(v_tile, stride, pv, p_base, kv_channels, first_key, CAUSAL_TILE, s.tp, hs);
            __syncthreads();
            const int j = first_key + lane;
            const bool lane_allowed = j < s.tp && pmask_p[j] != 0;
            query_tile(acc, q_own, dout_own, k_tile, v_tile, lse_own, dot_own, s, scale, lane_allowed, -1,
                       first_query, (size_t)bh * s.t, j, drop);
        }
    }
    const uint8_t* mask_b = mask + (size_t)bi * s.t;
    const int key_end = min(s.t, first_query + CAUSAL_ROWS);
    for (int first_key = 0; first_key < key_end; first_key += CAUSAL_TILE) {
        __syncthreads();
        load_rows(k_tile, stride, k, kv_base, kv_channels, first_key, CAUSAL_TILE, s.t, hs);
        load_rows(v_tile, stride, v, kv_base, kv_channels, first_key, CAUSAL_TILE, s.t, hs);
        __syncthreads();
        const int j = first_key + lane;
        const bool lane_allowed = j < s.t && mask_b[j] != 0;
        query_tile(acc, q_own, dout_own, k_tile, v_tile, lse_own, dot_own, s, scale, lane_allowed, first_key,
                   first_query, (size_t)bh * s.t, s.tp + j, drop);
    }
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int i = first_query + warp * CAUSAL_ROWS_PER_WARP + r;
        if (i >= s.t) continue;
        const size_t at = q_base + (size_t)i * q_channels;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) {
            const int d = lane + 32 * c;
            if (d < hs) dq[at + d] = from_float<T>(to_float(dq[at + d]) + scale * acc[r][c]);
        }
    }
}

// The shape arguments every kernel but the dot pass ends with, in this order.
#define CAUSAL_SHAPE_PARAMS int b, int t, int nh, int nkv, int hs, int prompts, int tp, float scale
#define CAUSAL_SHAPE CausalShape{b, t, nh, nkv, hs, prompts, tp}
// Then the dropout's, in this order.
#define CAUSAL_DROPOUT_PARAMS double drop_p, float drop_scale, uint64_t seed
#define CAUSAL_DROPOUT CausalDropout{drop_p, drop_scale, seed}

#define KERNELS(T, SUFFIX)                                                                                                     \
    extern "C" __global__ void causal_attention_forward_##SUFFIX(                                                              \
        T* out, float* lse, const T* q, const T* k, const T* v, const uint8_t* mask, const T* pk, const T* pv,                 \
        const uint8_t* pmask, const unsigned* of_sequence, CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {                       \
        causal_attention_forward<T>(out, lse, q, k, v, mask, pk, pv, pmask, of_sequence, CAUSAL_SHAPE, scale, CAUSAL_DROPOUT); \
    }                                                                                                                          \
    extern "C" __global__ void causal_attention_backward_dot_##SUFFIX(float* dot, const T* dout, const T* out,                 \
                                                                      int b, int t, int nh, int hs) {                          \
        causal_attention_backward_dot<T>(dot, dout, out, b, t, nh, hs);                                                        \
    }                                                                                                                          \
    extern "C" __global__ void causal_attention_backward_key_##SUFFIX(                                                         \
        T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* dot,                   \
        const uint8_t* mask, CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {                                                     \
        causal_attention_backward_key<T>(dk, dv, dout, q, k, v, lse, dot, mask, CAUSAL_SHAPE, scale, CAUSAL_DROPOUT);          \
    }                                                                                                                          \
    extern "C" __global__ void causal_attention_backward_prefix_key_##SUFFIX(                                                  \
        T* dpk, T* dpv, const T* dout, const T* q, const T* pk, const T* pv, const uint8_t* pmask,                             \
        const unsigned* of_sequence, const float* lse, const float* dot, CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {         \
        causal_attention_backward_prefix_key<T>(dpk, dpv, dout, q, pk, pv, pmask, of_sequence, lse, dot,                       \
                                                CAUSAL_SHAPE, scale, CAUSAL_DROPOUT);                                          \
    }                                                                                                                          \
    extern "C" __global__ void causal_attention_backward_query_##SUFFIX(                                                       \
        T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* dot,                          \
        const uint8_t* mask, const T* pk, const T* pv, const uint8_t* pmask, const unsigned* of_sequence,                      \
        CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {                                                                          \
        causal_attention_backward_query<T>(dq, dout, q, k, v, lse, dot, mask, pk, pv, pmask, of_sequence,                      \
                                           CAUSAL_SHAPE, scale, CAUSAL_DROPOUT);                                               \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)

// ---- Version 2: tensor cores (bf16) -------------------------------------------------------
//
// Version 1's contract (the prefix, GQA, the mask, lse = +inf for a row with no allowed key,
// the dot pre-pass causal_attention_backward_dot, the dropout) with every product on wmma
// (m16n16k16, bf16 inputs, fp32 accumulation), as kernels/attention.cu's version 3 does
// for BERT.
//
// hs a multiple of 16, at most 128 (the host checks it): tiles need no padding. A block
// owns TC_ROWS = 64 rows (4 warps of 16) and streams the other side in tiles of TILE rows:
// 64, or 32 in the backward when hs > 64 (shared memory within 99 KiB). Tiles are bf16 in
// shared memory with row stride hs + 8 (a multiple of 16 bytes, as wmma needs, and not of
// 128 bytes, which spreads the banks). Each warp stores its 16 x TILE products to an fp32
// scratch tile where lane l owns row l / 2 and half l % 2 of the columns, turns them into
// weights there and writes those as bf16 for the next product: the probabilities and
// their gradients are rounded to bf16 before they multiply, as FlashAttention-2 in bf16.
// Every gradient element is summed by one warp in a fixed order: the same bits every run.
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

__device__ __forceinline__ int tc_backward_tile(int hs) { return hs <= 64 ? 64 : 32; }

// tile[rows, ld] (bf16) = rows first_row.. of one head of x [*, len, channels] starting at
// element head_base, zero from row `len` on. The block cooperates; the caller synchronises
// before reading. 8 values per move where every row starts 16-byte aligned (the channels
// are multiples of 16; the buffer's start decides).
__device__ __forceinline__ void tc_load_rows(bf16* tile, int ld, const bf16* x, size_t head_base, size_t channels,
                                             int first_row, int rows, int len, int hs) {
    if ((uintptr_t)(x + head_base) % 16 == 0) {
        const int per_row = hs / 8;  // uint4 of 8 values
        for (int e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
            const int r = e / per_row, d = e % per_row * 8, row = first_row + r;
            uint4 values = make_uint4(0u, 0u, 0u, 0u);
            if (row < len) values = *reinterpret_cast<const uint4*>(x + head_base + (size_t)row * channels + d);
            *reinterpret_cast<uint4*>(tile + r * ld + d) = values;
        }
        return;
    }
    for (int e = threadIdx.x; e < rows * hs; e += blockDim.x) {
        const int r = e / hs, d = e % hs, row = first_row + r;
        tile[r * ld + d] = row < len ? x[head_base + (size_t)row * channels + d] : __float2bfloat16_rn(0.0f);
    }
}

// scratch[16, TILE] (fp32, row stride ld) = rows[16, hs] · tile[TILE, hs]^T: one warp.
template <int TILE>
__device__ __forceinline__ void tc_rows_times_tile_transposed(float* scratch, int ld, const bf16* rows,
                                                              const bf16* tile, int ld_head, int hs) {
#pragma unroll
    for (int n = 0; n < TILE / 16; n++) {
        TcAcc product;
        nvcuda::wmma::fill_fragment(product, 0.0f);
        for (int kk = 0; kk < hs / 16; kk++) {
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
__device__ __forceinline__ void tc_weights_times_tile(TcAcc& acc, const bf16* weights, int ld_prob, const bf16* tile,
                                                      int ld_head, int dims_first) {
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
        TcRows a;
        TcCols b;
        nvcuda::wmma::load_matrix_sync(a, weights + kk * 16, ld_prob);
        nvcuda::wmma::load_matrix_sync(b, tile + kk * 16 * ld_head + dims_first, ld_head);
        nvcuda::wmma::mma_sync(acc, a, b, acc);
    }
}

// grad[own rows, dims] += factor · acc[n] for each 16-dim block n, through this warp's
// scratch [16, >= 16] (fp32): rows own_first.. (of `len`) of one head at head_base. One
// warp; its lanes leave together.
__device__ __forceinline__ void tc_add_rows(bf16* grad, const TcAcc* acc, float factor, float* scratch, int ld,
                                            size_t head_base, size_t channels, int own_first, int len, int hs) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        if (n < hs / 16) {
            __syncwarp();  // the previous block's (or the caller's) scratch reads are done
            nvcuda::wmma::store_matrix_sync(scratch, acc[n], ld, nvcuda::wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int r = e / 16, d = n * 16 + e % 16, row = own_first + r;
                if (row < len) {
                    const size_t at = head_base + (size_t)row * channels + d;
                    grad[at] = __float2bfloat16_rn(__bfloat162float(grad[at]) + factor * scratch[r * ld + e % 16]);
                }
            }
        }
    }
}

// A stretch of keys one query row scans: the prefix's (causal = false) or its own
// (causal = true: key j only for j <= i). Key j of the stretch is allowed where j < len
// and mask[j] != 0; its column in the row of probs is column + j.
struct KeyStretch {
    const uint8_t* mask;
    int len, column;
    bool causal;
};

// This lane's running state for its query row in the forward (identical in the two lanes of
// the row): the running max m and sum l of exp(s - m), and its share of acc = Σ weight · v:
// dims n * 16 + half * 8 + c (c < 8) of every 16-dim block n.
struct TcOnline {
    float max, sum;
    float acc[TC_MAX_BLOCKS][8];
};

// Folds one key tile (k_tile, v_tile [TILE, ld_head], keys first_key.. of `keys`) into the
// warp's rows: S = Q_warp K^T, the online softmax per row over the lane's half of the tile,
// acc = acc · rescale + (p · dropout) V. probs_row: the element index of (row i, column 0)
// in probs.
__device__ __forceinline__ void tc_forward_tile(TcOnline& st, const bf16* q_warp, const bf16* k_tile,
                                                const bf16* v_tile, float* scratch, bf16* weights, int ld_head,
                                                int hs, float scale, const KeyStretch& keys, int first_key, int i,
                                                bool row_real, size_t probs_row, const CausalDropout& drop) {
    constexpr int TILE = TC_FORWARD_TILE, HALF = TILE / 2, ld_scratch = TILE + 4, ld_prob = TILE + 8;
    const int lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1;
    tc_rows_times_tile_transposed<TILE>(scratch, ld_scratch, q_warp, k_tile, ld_head, hs);
    __syncwarp();
    float* score = scratch + row * ld_scratch + half * HALF;
    float tile_max = -INFINITY;
    for (int c = 0; c < HALF; c++) {
        const int j = first_key + half * HALF + c;
        const bool allowed = j < keys.len && keys.mask[j] != 0 && (!keys.causal || j <= i);
        score[c] = allowed ? scale * score[c] : -INFINITY;
        tile_max = fmaxf(tile_max, score[c]);
    }
    const float new_max = fmaxf(st.max, fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1)));
    // new_max == -inf: no allowed key yet, nothing accumulated; avoid -inf - -inf.
    const float rescale = new_max == -INFINITY ? 1.0f : expf(st.max - new_max);
    float tile_sum = 0.0f;
    bf16* weight = weights + row * ld_prob + half * HALF;
    for (int c = 0; c < HALF; c++) {
        const int j = first_key + half * HALF + c;
        const float e = score[c] == -INFINITY ? 0.0f : expf(score[c] - new_max);
        tile_sum += e;
        const float f = e != 0.0f && row_real
                            ? dropout_factor(probs_row + keys.column + j, drop)
                            : 1.0f;
        weight[c] = __float2bfloat16_rn(e * f);
    }
    st.sum = st.sum * rescale + tile_sum + __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    st.max = new_max;
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        if (n < hs / 16) {
            TcAcc product;
            nvcuda::wmma::fill_fragment(product, 0.0f);
            __syncwarp();  // the weights are written; the scratch's previous reads are done
            tc_weights_times_tile<TILE>(product, weights, ld_prob, v_tile, ld_head, n * 16);
            nvcuda::wmma::store_matrix_sync(scratch, product, ld_scratch, nvcuda::wmma::mem_row_major);
            __syncwarp();
#pragma unroll
            for (int c = 0; c < 8; c++) st.acc[n][c] = st.acc[n][c] * rescale + scratch[row * ld_scratch + half * 8 + c];
        }
    }
}

// out [b, t, nh*hs] and lse [b, nh, t] as version 1. Grid (ceil(t / TC_ROWS), b * nh).
// Shared: (TC_ROWS + 2 TILE) rows of hs + 8 bf16, TC_WARPS [16, TILE + 4] fp32, TC_WARPS
// [16, TILE + 8] bf16 (TILE = TC_FORWARD_TILE).
__device__ void tc_causal_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                  const uint8_t* mask, const bf16* pk, const bf16* pv, const uint8_t* pmask,
                                  const unsigned* of_sequence, CausalShape s, float scale, CausalDropout drop) {
    constexpr int TILE = TC_FORWARD_TILE;
    const int bh = blockIdx.y, bi = bh / s.nh, h = bh % s.nh, g = h / (s.nh / s.nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1;
    const int first_query = blockIdx.x * TC_ROWS, i = first_query + warp * 16 + row;
    const int hs = s.hs, ld_head = hs + 8;
    const size_t q_channels = (size_t)s.nh * hs, kv_channels = (size_t)s.nkv * hs;
    const size_t q_base = (size_t)bi * s.t * q_channels + (size_t)h * hs;
    const size_t kv_base = (size_t)bi * s.t * kv_channels + (size_t)g * hs;
    bf16* q_own = dynamic_shared<bf16>();      // [TC_ROWS, ld_head]
    bf16* k_tile = q_own + TC_ROWS * ld_head;  // [TILE, ld_head]
    bf16* v_tile = k_tile + TILE * ld_head;    // [TILE, ld_head]
    float* scratch_all = reinterpret_cast<float*>(v_tile + TILE * ld_head);
    float* scratch = scratch_all + warp * 16 * (TILE + 4);                                            // [16, TILE + 4]
    bf16* weights = reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 16 * (TILE + 4)) + warp * 16 * (TILE + 8);  // [16, TILE + 8]
    tc_load_rows(q_own, ld_head, q, q_base, q_channels, first_query, TC_ROWS, s.t, hs);
    const bf16* q_warp = q_own + warp * 16 * ld_head;
    const bool row_real = i < s.t;
    const size_t probs_row = ((size_t)bh * s.t + i) * (size_t)(s.tp + s.t);

    TcOnline st;
    st.max = -INFINITY;
    st.sum = 0.0f;
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
#pragma unroll
        for (int c = 0; c < 8; c++) st.acc[n][c] = 0.0f;
    }
    const int prompt = prompt_of(of_sequence, s, bi);
    if (prompt >= 0) {
        const size_t p_base = (size_t)prompt * s.tp * kv_channels + (size_t)g * hs;
        const KeyStretch keys{pmask + (size_t)prompt * s.tp, s.tp, 0, false};
        for (int first_key = 0; first_key < s.tp; first_key += TILE) {
            __syncthreads();  // the previous tiles are no longer read (first pass: q_own is written)
            tc_load_rows(k_tile, ld_head, pk, p_base, kv_channels, first_key, TILE, s.tp, hs);
            tc_load_rows(v_tile, ld_head, pv, p_base, kv_channels, first_key, TILE, s.tp, hs);
            __syncthreads();
            tc_forward_tile(st, q_warp, k_tile, v_tile, scratch, weights, ld_head, hs, scale, keys, first_key, i,
                            row_real, probs_row, drop);
        }
    }
    // Own keys up to the block's last query: later tiles are wholly in the future.
    const KeyStretch keys{mask + (size_t)bi * s.t, s.t, s.tp, true};
    const int key_end = min(s.t, first_query + TC_ROWS);
    for (int first_key = 0; first_key < key_end; first_key += TILE) {
        __syncthreads();
        tc_load_rows(k_tile, ld_head, k, kv_base, kv_channels, first_key, TILE, s.t, hs);
        tc_load_rows(v_tile, ld_head, v, kv_base, kv_channels, first_key, TILE, s.t, hs);
        __syncthreads();
        tc_forward_tile(st, q_warp, k_tile, v_tile, scratch, weights, ld_head, hs, scale, keys, first_key, i,
                        row_real, probs_row, drop);
    }
    if (row_real) {
        // sum == 0 only when no key was allowed (else the maximum contributes exp(0) = 1).
        const bool any = st.sum > 0.0f;
        const float inv_sum = any ? 1.0f / st.sum : 0.0f;
        bf16* out_i = out + q_base + (size_t)i * q_channels;
#pragma unroll
        for (int n = 0; n < TC_MAX_BLOCKS; n++) {
            if (n < hs / 16) {
#pragma unroll
                for (int c = 0; c < 8; c++) out_i[n * 16 + half * 8 + c] = __float2bfloat16_rn(st.acc[n][c] * inv_sum);
            }
        }
        if (half == 0) lse[(size_t)bh * s.t + i] = any ? st.max + logf(st.sum) : INFINITY;
    }
}

// The shared memory of the key kernels: own keys and values [TC_ROWS, hs + 8], a query and a
// dout tile [TILE, hs + 8] (bf16); per warp the fp32 scratches S^T, dP^T [16, TILE + 4] and
// the bf16 weights (p f)^T, dS^T [16, TILE + 8]; lse and dot of the query tile [TILE] fp32.
template <int TILE>
struct TcKeyShared {
    bf16 *k_own, *v_own, *q_tile, *dout_tile;
    float *scores, *dprobs, *lse_tile, *dot_tile;
    bf16 *weights, *dscores;

    __device__ explicit TcKeyShared(int hs) {
        const int ld_head = hs + 8, warp = threadIdx.x >> 5;
        k_own = dynamic_shared<bf16>();
        v_own = k_own + TC_ROWS * ld_head;
        q_tile = v_own + TC_ROWS * ld_head;
        dout_tile = q_tile + TILE * ld_head;
        float* scratch_all = reinterpret_cast<float*>(dout_tile + TILE * ld_head);
        scores = scratch_all + warp * 2 * 16 * (TILE + 4);
        dprobs = scores + 16 * (TILE + 4);
        bf16* weights_all = reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 2 * 16 * (TILE + 4));
        weights = weights_all + warp * 2 * 16 * (TILE + 8);
        dscores = weights + 16 * (TILE + 8);
        lse_tile = reinterpret_cast<float*>(weights_all + TC_WARPS * 2 * 16 * (TILE + 8));
        dot_tile = lse_tile + TILE;
    }
};

// The key side of the backward for the warp's 16 own key rows (this lane's row: key j of
// `keys`, allowed as key_ok), against the queries of sequence bi, query head h, from
// first_query_start to t:
//   p_ij = exp(scale q_i·k_j - lse_i), w_ij = p_ij f_ij (f: dropout), ds_ij = p_ij (f_ij dout_i·v_j - D_i),
//   dv_acc += w^T dout, dk_acc += ds^T q (the caller scales dk),
// over the allowed pairs (causal stretches: j <= i).
template <int TILE>
__device__ void tc_key_side(TcAcc (&dk_acc)[TC_MAX_BLOCKS], TcAcc (&dv_acc)[TC_MAX_BLOCKS], const TcKeyShared<TILE>& sh,
                            bool key_ok, int j, const KeyStretch& keys, const bf16* q, const bf16* dout,
                            const float* lse, const float* dot, const CausalShape& s, int bi, int h,
                            int first_query_start, float scale, const CausalDropout& drop) {
    constexpr int HALF = TILE / 2, ld_scratch = TILE + 4, ld_prob = TILE + 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1;
    const int hs = s.hs, ld_head = hs + 8;
    const size_t q_channels = (size_t)s.nh * hs;
    const size_t q_base = (size_t)bi * s.t * q_channels + (size_t)h * hs;
    const size_t bh = (size_t)bi * s.nh + h;
    const bf16* k_warp = sh.k_own + warp * 16 * ld_head;
    const bf16* v_warp = sh.v_own + warp * 16 * ld_head;
    for (int first_query = first_query_start; first_query < s.t; first_query += TILE) {
        __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
        tc_load_rows(sh.q_tile, ld_head, q, q_base, q_channels, first_query, TILE, s.t, hs);
        tc_load_rows(sh.dout_tile, ld_head, dout, q_base, q_channels, first_query, TILE, s.t, hs);
        for (int e = threadIdx.x; e < TILE; e += blockDim.x) {
            const int i = first_query + e;
            sh.lse_tile[e] = i < s.t ? lse[bh * s.t + i] : 0.0f;
            sh.dot_tile[e] = i < s.t ? dot[bh * s.t + i] : 0.0f;
        }
        __syncthreads();
        tc_rows_times_tile_transposed<TILE>(sh.scores, ld_scratch, k_warp, sh.q_tile, ld_head, hs);
        tc_rows_times_tile_transposed<TILE>(sh.dprobs, ld_scratch, v_warp, sh.dout_tile, ld_head, hs);
        __syncwarp();
        for (int c = 0; c < HALF; c++) {
            const int col = half * HALF + c, i = first_query + col;
            float weight = 0.0f, dscore = 0.0f;
            if (key_ok && i < s.t && (!keys.causal || j <= i)) {
                // lse_i = +inf (a row with no allowed key) gives p = 0.
                const float p = expf(scale * sh.scores[row * ld_scratch + col] - sh.lse_tile[col]);
                const size_t index = (bh * s.t + i) * (size_t)(s.tp + s.t) + keys.column + j;
                const float f = dropout_factor(index, drop);
                weight = p * f;
                dscore = p * (f * sh.dprobs[row * ld_scratch + col] - sh.dot_tile[col]);
            }
            sh.weights[row * ld_prob + col] = __float2bfloat16_rn(weight);
            sh.dscores[row * ld_prob + col] = __float2bfloat16_rn(dscore);
        }
        __syncwarp();
#pragma unroll
        for (int n = 0; n < TC_MAX_BLOCKS; n++) {
            if (n < hs / 16) {
                tc_weights_times_tile<TILE>(dv_acc[n], sh.weights, ld_prob, sh.dout_tile, ld_head, n * 16);
                tc_weights_times_tile<TILE>(dk_acc[n], sh.dscores, ld_prob, sh.q_tile, ld_head, n * 16);
            }
        }
    }
}

// dk, dv [b, t, nkv*hs] += the gradients of the sequences' own keys and values. Grid
// (ceil(t / TC_ROWS), b * nkv); block (bi, g) sums over the query heads of group g in order,
// each over its queries from the tile's first key on. Shared: TcKeyShared<TILE>.
template <int TILE>
__device__ void tc_causal_backward_key(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                       const bf16* v, const float* lse, const float* dot, const uint8_t* mask,
                                       CausalShape s, float scale, CausalDropout drop) {
    const int bg = blockIdx.y, bi = bg / s.nkv, g = bg % s.nkv, group = s.nh / s.nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_key = blockIdx.x * TC_ROWS, own_first = first_key + warp * 16, j = own_first + (lane >> 1);
    const int hs = s.hs, ld_head = hs + 8;
    const size_t kv_channels = (size_t)s.nkv * hs;
    const size_t kv_base = (size_t)bi * s.t * kv_channels + (size_t)g * hs;
    const TcKeyShared<TILE> sh(hs);
    tc_load_rows(sh.k_own, ld_head, k, kv_base, kv_channels, first_key, TC_ROWS, s.t, hs);
    tc_load_rows(sh.v_own, ld_head, v, kv_base, kv_channels, first_key, TC_ROWS, s.t, hs);
    const KeyStretch keys{mask + (size_t)bi * s.t, s.t, s.tp, true};
    const bool key_ok = j < s.t && keys.mask[j] != 0;
    TcAcc dk_acc[TC_MAX_BLOCKS], dv_acc[TC_MAX_BLOCKS];
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        nvcuda::wmma::fill_fragment(dk_acc[n], 0.0f);
        nvcuda::wmma::fill_fragment(dv_acc[n], 0.0f);
    }
    for (int h = g * group; h < (g + 1) * group; h++) {
        tc_key_side<TILE>(dk_acc, dv_acc, sh, key_ok, j, keys, q, dout, lse, dot, s, bi, h, first_key, scale, drop);
    }
    tc_add_rows(dk, dk_acc, scale, sh.scores, TILE + 4, kv_base, kv_channels, own_first, s.t, hs);
    tc_add_rows(dv, dv_acc, 1.0f, sh.dprobs, TILE + 4, kv_base, kv_channels, own_first, s.t, hs);
}

// dpk, dpv [prompts, tp, nkv*hs] += the gradients of the prompts' keys and values, summed
// over every sequence that continues the prompt (in batch order) and the query heads of the
// group (in order). Grid (ceil(tp / TC_ROWS), prompts * nkv); shared as the own-key kernel.
template <int TILE>
__device__ void tc_causal_backward_prefix_key(bf16* dpk, bf16* dpv, const bf16* dout, const bf16* q,
                                              const bf16* pk, const bf16* pv, const uint8_t* pmask,
                                              const unsigned* of_sequence, const float* lse, const float* dot,
                                              CausalShape s, float scale, CausalDropout drop) {
    const int pg = blockIdx.y, prompt = pg / s.nkv, g = pg % s.nkv, group = s.nh / s.nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_key = blockIdx.x * TC_ROWS, own_first = first_key + warp * 16, j = own_first + (lane >> 1);
    const int hs = s.hs, ld_head = hs + 8;
    const size_t kv_channels = (size_t)s.nkv * hs;
    const size_t p_base = (size_t)prompt * s.tp * kv_channels + (size_t)g * hs;
    const TcKeyShared<TILE> sh(hs);
    tc_load_rows(sh.k_own, ld_head, pk, p_base, kv_channels, first_key, TC_ROWS, s.tp, hs);
    tc_load_rows(sh.v_own, ld_head, pv, p_base, kv_channels, first_key, TC_ROWS, s.tp, hs);
    const KeyStretch keys{pmask + (size_t)prompt * s.tp, s.tp, 0, false};
    const bool key_ok = j < s.tp && keys.mask[j] != 0;
    TcAcc dk_acc[TC_MAX_BLOCKS], dv_acc[TC_MAX_BLOCKS];
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        nvcuda::wmma::fill_fragment(dk_acc[n], 0.0f);
        nvcuda::wmma::fill_fragment(dv_acc[n], 0.0f);
    }
    for (int bi = 0; bi < s.b; bi++) {
        if (of_sequence[bi] != (unsigned)prompt) continue;  // uniform across the block
        for (int h = g * group; h < (g + 1) * group; h++) {
            tc_key_side<TILE>(dk_acc, dv_acc, sh, key_ok, j, keys, q, dout, lse, dot, s, bi, h, 0, scale, drop);
        }
    }
    tc_add_rows(dpk, dk_acc, scale, sh.scores, TILE + 4, p_base, kv_channels, own_first, s.tp, hs);
    tc_add_rows(dpv, dv_acc, 1.0f, sh.dprobs, TILE + 4, p_base, kv_channels, own_first, s.tp, hs);
}

// Folds one key tile (k_tile, v_tile [TILE, ld_head]) into the warp's dq accumulators:
// S = Q_warp K^T, dP = dO_warp V^T, ds = p (f dP - D), dq_acc += ds K.
template <int TILE>
__device__ __forceinline__ void tc_query_tile(TcAcc (&dq_acc)[TC_MAX_BLOCKS], const bf16* q_warp,
                                              const bf16* dout_warp, const bf16* k_tile, const bf16* v_tile,
                                              float* scores, float* dprobs, bf16* dscores, int hs, float scale,
                                              const KeyStretch& keys, int first_key, int i, bool row_real,
                                              float lse_i, float dot_i, size_t probs_row, const CausalDropout& drop) {
    constexpr int HALF = TILE / 2, ld_scratch = TILE + 4, ld_prob = TILE + 8;
    const int lane = threadIdx.x & 31, row = lane >> 1, half = lane & 1, ld_head = hs + 8;
    tc_rows_times_tile_transposed<TILE>(scores, ld_scratch, q_warp, k_tile, ld_head, hs);
    tc_rows_times_tile_transposed<TILE>(dprobs, ld_scratch, dout_warp, v_tile, ld_head, hs);
    __syncwarp();
    for (int c = 0; c < HALF; c++) {
        const int col = half * HALF + c, j = first_key + col;
        float dscore = 0.0f;
        if (row_real && j < keys.len && keys.mask[j] != 0 && (!keys.causal || j <= i)) {
            const float p = expf(scale * scores[row * ld_scratch + col] - lse_i);
            const float f = dropout_factor(probs_row + keys.column + j, drop);
            dscore = p * (f * dprobs[row * ld_scratch + col] - dot_i);
        }
        dscores[row * ld_prob + col] = __float2bfloat16_rn(dscore);
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) {
        if (n < hs / 16) tc_weights_times_tile<TILE>(dq_acc[n], dscores, ld_prob, k_tile, ld_head, n * 16);
    }
}

// dq [b, t, nh*hs] += scale Σ_j ds_ij k_j over the prefix keys, then the own keys up to the
// diagonal. Grid (ceil(t / TC_ROWS), b * nh). Shared: own queries and douts [TC_ROWS,
// hs + 8], a key and a value tile [TILE, hs + 8] (bf16); per warp the fp32 scratches S, dP
// [16, TILE + 4] and the bf16 dS [16, TILE + 8].
template <int TILE>
__device__ void tc_causal_backward_query(bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                         const float* lse, const float* dot, const uint8_t* mask, const bf16* pk,
                                         const bf16* pv, const uint8_t* pmask, const unsigned* of_sequence,
                                         CausalShape s, float scale, CausalDropout drop) {
    const int bh = blockIdx.y, bi = bh / s.nh, h = bh % s.nh, g = h / (s.nh / s.nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * TC_ROWS, own_first = first_query + warp * 16, i = own_first + (lane >> 1);
    const int hs = s.hs, ld_head = hs + 8;
    const size_t q_channels = (size_t)s.nh * hs, kv_channels = (size_t)s.nkv * hs;
    const size_t q_base = (size_t)bi * s.t * q_channels + (size_t)h * hs;
    const size_t kv_base = (size_t)bi * s.t * kv_channels + (size_t)g * hs;
    bf16* q_own = dynamic_shared<bf16>();          // [TC_ROWS, ld_head]
    bf16* dout_own = q_own + TC_ROWS * ld_head;    // [TC_ROWS, ld_head]
    bf16* k_tile = dout_own + TC_ROWS * ld_head;   // [TILE, ld_head]
    bf16* v_tile = k_tile + TILE * ld_head;        // [TILE, ld_head]
    float* scratch_all = reinterpret_cast<float*>(v_tile + TILE * ld_head);
    float* scores = scratch_all + warp * 2 * 16 * (TILE + 4);  // [16, TILE + 4]: S
    float* dprobs = scores + 16 * (TILE + 4);                  // [16, TILE + 4]: dP
    bf16* dscores = reinterpret_cast<bf16*>(scratch_all + TC_WARPS * 2 * 16 * (TILE + 4)) + warp * 16 * (TILE + 8);  // [16, TILE + 8]
    tc_load_rows(q_own, ld_head, q, q_base, q_channels, first_query, TC_ROWS, s.t, hs);
    tc_load_rows(dout_own, ld_head, dout, q_base, q_channels, first_query, TC_ROWS, s.t, hs);
    const bf16* q_warp = q_own + warp * 16 * ld_head;
    const bf16* dout_warp = dout_own + warp * 16 * ld_head;
    const bool row_real = i < s.t;  // a row past t gets no gradient
    const float lse_i = row_real ? lse[(size_t)bh * s.t + i] : 0.0f;
    const float dot_i = row_real ? dot[(size_t)bh * s.t + i] : 0.0f;
    const size_t probs_row = ((size_t)bh * s.t + i) * (size_t)(s.tp + s.t);

    TcAcc dq_acc[TC_MAX_BLOCKS];
#pragma unroll
    for (int n = 0; n < TC_MAX_BLOCKS; n++) nvcuda::wmma::fill_fragment(dq_acc[n], 0.0f);
    const int prompt = prompt_of(of_sequence, s, bi);
    if (prompt >= 0) {
        const size_t p_base = (size_t)prompt * s.tp * kv_channels + (size_t)g * hs;
        const KeyStretch keys{pmask + (size_t)prompt * s.tp, s.tp, 0, false};
        for (int first_key = 0; first_key < s.tp; first_key += TILE) {
            __syncthreads();  // the previous tiles are no longer read (first pass: own rows written)
            tc_load_rows(k_tile, ld_head, pk, p_base, kv_channels, first_key, TILE, s.tp, hs);
            tc_load_rows(v_tile, ld_head, pv, p_base, kv_channels, first_key, TILE, s.tp, hs);
            __syncthreads();
            tc_query_tile<TILE>(dq_acc, q_warp, dout_warp, k_tile, v_tile, scores, dprobs, dscores, hs, scale, keys,
                                first_key, i, row_real, lse_i, dot_i, probs_row, drop);
        }
    }
    const KeyStretch keys{mask + (size_t)bi * s.t, s.t, s.tp, true};
    const int key_end = min(s.t, first_query + TC_ROWS);
    for (int first_key = 0; first_key < key_end; first_key += TILE) {
        __syncthreads();
        tc_load_rows(k_tile, ld_head, k, kv_base, kv_channels, first_key, TILE, s.t, hs);
        tc_load_rows(v_tile, ld_head, v, kv_base, kv_channels, first_key, TILE, s.t, hs);
        __syncthreads();
        tc_query_tile<TILE>(dq_acc, q_warp, dout_warp, k_tile, v_tile, scores, dprobs, dscores, hs, scale, keys,
                            first_key, i, row_real, lse_i, dot_i, probs_row, drop);
    }
    tc_add_rows(dq, dq_acc, scale, scores, TILE + 4, q_base, q_channels, own_first, s.t, hs);
}

// Version 2's kernels: bf16 only; the same arguments as version 1's. Launch: grid as each kernel states, TC_WARPS * 32 threads, the
// dynamic shared memory each states (src/backend/cuda/decoder_ops.rs computes the same).

extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) causal_attention_tc_forward_bf16(
    bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const uint8_t* mask, const bf16* pk,
    const bf16* pv, const uint8_t* pmask, const unsigned* of_sequence, CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {
    tc_causal_forward(out, lse, q, k, v, mask, pk, pv, pmask, of_sequence, CAUSAL_SHAPE, scale, CAUSAL_DROPOUT);
}
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) causal_attention_tc_backward_key_bf16(
    bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,
    const float* dot, const uint8_t* mask, CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {
    if (tc_backward_tile(hs) == 64) {
        tc_causal_backward_key<64>(dk, dv, dout, q, k, v, lse, dot, mask, CAUSAL_SHAPE, scale, CAUSAL_DROPOUT);
    } else {
        tc_causal_backward_key<32>(dk, dv, dout, q, k, v, lse, dot, mask, CAUSAL_SHAPE, scale, CAUSAL_DROPOUT);
    }
}
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) causal_attention_tc_backward_prefix_key_bf16(
    bf16* dpk, bf16* dpv, const bf16* dout, const bf16* q, const bf16* pk, const bf16* pv, const uint8_t* pmask,
    const unsigned* of_sequence, const float* lse, const float* dot, CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {
    if (tc_backward_tile(hs) == 64) {
        tc_causal_backward_prefix_key<64>(dpk, dpv, dout, q, pk, pv, pmask, of_sequence, lse, dot, CAUSAL_SHAPE,
                                          scale, CAUSAL_DROPOUT);
    } else {
        tc_causal_backward_prefix_key<32>(dpk, dpv, dout, q, pk, pv, pmask, of_sequence, lse, dot, CAUSAL_SHAPE,
                                          scale, CAUSAL_DROPOUT);
    }
}
extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) causal_attention_tc_backward_query_bf16(
    bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse, const float* dot,
    const uint8_t* mask, const bf16* pk, const bf16* pv, const uint8_t* pmask, const unsigned* of_sequence,
    CAUSAL_SHAPE_PARAMS, CAUSAL_DROPOUT_PARAMS) {
    if (tc_backward_tile(hs) == 64) {
        tc_causal_backward_query<64>(dq, dout, q, k, v, lse, dot, mask, pk, pv, pmask, of_sequence, CAUSAL_SHAPE,
                                     scale, CAUSAL_DROPOUT);
    } else {
        tc_causal_backward_query<32>(dq, dout, q, k, v, lse, dot, mask, pk, pv, pmask, of_sequence, CAUSAL_SHAPE,
                                     scale, CAUSAL_DROPOUT);
    }
}
