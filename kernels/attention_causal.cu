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
// Scores are scale · q·k, scale = 1/sqrt(hs); no dropout (decoders train without it).
//
// Flash-style, as kernels/attention.cu's version 2 (FlashAttention-2's algorithm on CUDA
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

// Per own query row of a warp: the online softmax's running max m, running sum l of
// exp(score - m), and acc[d] = running sum of exp(score - m) v[d].
struct OnlineRows {
    float max[CAUSAL_ROWS_PER_WARP], sum[CAUSAL_ROWS_PER_WARP];
    float acc[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE];
};

// Folds one streamed key tile (k_tile [CAUSAL_TILE, hs|1], v_tile [CAUSAL_TILE, hs]) into
// the warp's rows. Lane l's key is allowed when lane_allowed and, for own keys
// (causal_first_key >= 0: the tile's first own key index), key <= the query's index.
__device__ __forceinline__ void forward_tile(OnlineRows& rows, const float* q_own, const float* k_tile,
                                             const float* v_tile, int hs, float scale, bool lane_allowed,
                                             int causal_first_key, int first_query) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int own = warp * CAUSAL_ROWS_PER_WARP + r, i = first_query + own;
        const bool allowed = lane_allowed && (causal_first_key < 0 || causal_first_key + lane <= i);
        const float score = allowed ? scale * head_dot(q_own + own * hs, k_tile + lane * (hs | 1), hs) : -INFINITY;
        const float new_max = fmaxf(rows.max[r], warp_max(score));
        // new_max == -inf: no allowed key yet, nothing accumulated; avoid -inf - -inf.
        const float rescale = new_max == -INFINITY ? 1.0f : expf(rows.max[r] - new_max);
        const float e = score == -INFINITY ? 0.0f : expf(score - new_max);
        rows.sum[r] = rows.sum[r] * rescale + warp_sum(e);
        rows.max[r] = new_max;
#pragma unroll
        for (int c = 0; c < CAUSAL_DIMS_PER_LANE; c++) rows.acc[r][c] *= rescale;
        for (int key = 0; key < CAUSAL_TILE; key++) {
            const float w = __shfl_sync(0xffffffffu, e, key);
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
                                         const unsigned* of_sequence, CausalShape s, float scale) {
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
            forward_tile(rows, q_own, k_tile, v_tile, hs, scale, lane_allowed, -1, first_query);
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
        forward_tile(rows, q_own, k_tile, v_tile, hs, scale, lane_allowed, first_key, first_query);
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
// allowed per row as key_ok), against the queries of sequence bi, query head h, from
// first_query_start to t (lane l: query first_query + l):
//   p_ij = exp(scale q_i·k_j - lse_i), ds_ij = p_ij (dout_i·v_j - D_i),
//   acc_v_j += p_ij dout_i, acc_k_j += ds_ij q_i,
// over the allowed pairs: causal (own_first_key >= 0, the own rows' first key index): j <= i.
template <typename T>
__device__ void key_side(float (&acc_k)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE],
                         float (&acc_v)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE], const float* k_own,
                         const float* v_own, float* q_tile, float* dout_tile, const bool (&key_ok)[CAUSAL_ROWS_PER_WARP],
                         const T* q, const T* dout, const float* lse, const float* dot, const CausalShape& s,
                         int bi, int h, int first_query_start, int own_first_key, float scale) {
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
            const bool allowed = query_real && (own_first_key < 0 || own_first_key + own <= i);
            float weight = 0.0f, dscore = 0.0f;
            if (allowed) {
                weight = expf(scale * head_dot(q_tile + lane * stride, k_own + own * hs, hs) - lse_i);
                dscore = weight * (head_dot(dout_tile + lane * stride, v_own + own * hs, hs) - dot_i);
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
                                              CausalShape s, float scale) {
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
                 first_key, scale);
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
                                                     float scale) {
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
            key_side(acc_k, acc_v, k_own, v_own, q_tile, dout_tile, key_ok, q, dout, lse, dot, s, bi, h, 0, -1,
                     scale);
        }
    }
    add_key_grads(dpk, dpv, p_base, kv_channels, first_key, s.tp, hs, scale, acc_k, acc_v);
}

// Folds one streamed key tile (k_tile, v_tile [CAUSAL_TILE, hs|1]) into the warp's dq
// accumulators: acc_i += ds_ij k_j. Allowance as forward_tile's.
__device__ __forceinline__ void query_tile(float (&acc)[CAUSAL_ROWS_PER_WARP][CAUSAL_DIMS_PER_LANE],
                                           const float* q_own, const float* dout_own, const float* k_tile,
                                           const float* v_tile, const float (&lse_own)[CAUSAL_ROWS_PER_WARP],
                                           const float (&dot_own)[CAUSAL_ROWS_PER_WARP], int hs, int t,
                                           float scale, bool lane_allowed, int causal_first_key, int first_query) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, stride = hs | 1;
#pragma unroll
    for (int r = 0; r < CAUSAL_ROWS_PER_WARP; r++) {
        const int own = warp * CAUSAL_ROWS_PER_WARP + r, i = first_query + own;
        if (i >= t) continue;  // uniform across the warp
        const bool allowed = lane_allowed && (causal_first_key < 0 || causal_first_key + lane <= i);
        float dscore = 0.0f;
        if (allowed) {
            const float p = expf(scale * head_dot(q_own + own * hs, k_tile + lane * stride, hs) - lse_own[r]);
            dscore = p * (head_dot(dout_own + own * hs, v_tile + lane * stride, hs) - dot_own[r]);
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
                                                const unsigned* of_sequence, CausalShape s, float scale) {
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
            query_tile(acc, q_own, dout_own, k_tile, v_tile, lse_own, dot_own, hs, s.t, scale, lane_allowed, -1,
                       first_query);
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
        query_tile(acc, q_own, dout_own, k_tile, v_tile, lse_own, dot_own, hs, s.t, scale, lane_allowed,
                   first_key, first_query);
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

#define KERNELS(T, SUFFIX)                                                                                        \
    extern "C" __global__ void causal_attention_forward_##SUFFIX(                                                 \
        T* out, float* lse, const T* q, const T* k, const T* v, const uint8_t* mask, const T* pk, const T* pv,    \
        const uint8_t* pmask, const unsigned* of_sequence, CAUSAL_SHAPE_PARAMS) {                                 \
        causal_attention_forward<T>(out, lse, q, k, v, mask, pk, pv, pmask, of_sequence, CAUSAL_SHAPE, scale);    \
    }                                                                                                             \
    extern "C" __global__ void causal_attention_backward_dot_##SUFFIX(float* dot, const T* dout, const T* out,   \
                                                                      int b, int t, int nh, int hs) {             \
        causal_attention_backward_dot<T>(dot, dout, out, b, t, nh, hs);                                           \
    }                                                                                                             \
    extern "C" __global__ void causal_attention_backward_key_##SUFFIX(                                            \
        T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* dot,      \
        const uint8_t* mask, CAUSAL_SHAPE_PARAMS) {                                                               \
        causal_attention_backward_key<T>(dk, dv, dout, q, k, v, lse, dot, mask, CAUSAL_SHAPE, scale);             \
    }                                                                                                             \
    extern "C" __global__ void causal_attention_backward_prefix_key_##SUFFIX(                                     \
        T* dpk, T* dpv, const T* dout, const T* q, const T* pk, const T* pv, const uint8_t* pmask,                \
        const unsigned* of_sequence, const float* lse, const float* dot, CAUSAL_SHAPE_PARAMS) {                   \
        causal_attention_backward_prefix_key<T>(dpk, dpv, dout, q, pk, pv, pmask, of_sequence, lse, dot,          \
                                                CAUSAL_SHAPE, scale);                                             \
    }                                                                                                             \
    extern "C" __global__ void causal_attention_backward_query_##SUFFIX(                                          \
        T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* dot,             \
        const uint8_t* mask, const T* pk, const T* pv, const uint8_t* pmask, const unsigned* of_sequence,         \
        CAUSAL_SHAPE_PARAMS) {                                                                                    \
        causal_attention_backward_query<T>(dq, dout, q, k, v, lse, dot, mask, pk, pv, pmask, of_sequence,         \
                                           CAUSAL_SHAPE, scale);                                                  \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
