// DeBERTa-v2/v3's disentangled self-attention, as two ops; the CPU twin is
// src/backend/cpu/disentangled_attention.rs (its doc comments define the semantics).
//
// 1. position_products_*: per head, the content-by-position products out [b, nh, t, rows] =
//    x [b, t, nh*hs] times pos [rows, nh*hs]ᵀ (c2p = q · pos_kᵀ, p2c = k · pos_qᵀ), and their
//    backward. A kernel rather than cuBLAS: cublasGemmEx is one GEMM per call, so the
//    [b, nh] batch with its head-interleaved strides would take b·nh launches, and dpos sums
//    over the sequences, which per-sequence GEMMs would round to T after each one. Here one
//    launch per product, fp32 accumulation, each output element summed by one thread in a
//    fixed order (deterministic). Blocks of 16 x 16 threads over 16 x 16 output tiles, the
//    reduction in chunks of 16 through shared memory (rows padded to 17: no bank conflicts).
//
// 2. disentangled_attention_*: softmax over keys j of scale · (q_i·k_j + c2p[i, r_ij] +
//    p2c[j, r_ij]), r = relative [t, t], padded keys masked (a sequence with no real token
//    attends uniformly to every key, as the CPU), dropout on the probabilities (element
//    ((bi*nh + h)*t + i)*t + j of the virtual probs, kernels/attention.cu's rule), times v.
//    A term whose products pointer is null is absent (`pos_att_type` without it).
//    Flash-style, as kernels/attention.cu's version 2 (FlashAttention-2 on CUDA cores, fp32
//    arithmetic, tiles in shared memory as fp32 whatever T is): the two position terms are
//    gathered inside the score loop from the products in global memory (each query reads its
//    own c2p row, each key its own p2c row: cached reads), the forward saves one log-sum-exp
//    per query row and out in fp32 (the backward's row dots D_i = dout_i · out_i; the trait's
//    backward gets no ctx). The backward recomputes the probabilities in three launches:
//      disentangled_attention_backward_dot: D per query row;
//      disentangled_attention_backward_key: dk, dv and dp2c per tile of own keys;
//      disentangled_attention_backward_query: dq and dc2p per tile of own queries.
//    The products' gradients are scattered WITHOUT atomics, deterministically: dc2p row i is
//    written only by the block that owns query i, dp2c row j only by the block that owns key
//    j. That block keeps its own rows' gradients in a shared fp32 accumulator
//    [FLASH_ROWS, rows]; within a warp the 32 streamed pairs of a tile can land on the same
//    position row (log buckets, the clamp), so lane 0 adds them one after another, in key
//    (or query) order; at the end the block adds scale · accumulator to the products'
//    gradients (one rounding to T). The same bits every run.
//
// Blocks are FLASH_WARPS warps over FLASH_ROWS own rows, streaming the other side in tiles
// of FLASH_TILE rows (lane l: row l), every lane accumulating head dims d = lane + 32c, so
// hs <= 128; the host checks the shapes. Launch: 128 threads, grid (ceil(t / FLASH_ROWS),
// b * nh), dynamic shared memory as each kernel states (4 bytes per float;
// src/backend/cuda/deberta_ops.rs computes the same).
#include "common.cuh"

// ---- 1. position products ----------------------------------------------------------------

#define PRODUCT_TILE 16

// acc += sum_kk a[ty][kk] * b[kk][tx] over one chunk of the reduction.
__device__ __forceinline__ float tile_product(float acc, const float (*a)[PRODUCT_TILE + 1],
                                              const float (*b)[PRODUCT_TILE + 1], int ty, int tx) {
#pragma unroll
    for (int kk = 0; kk < PRODUCT_TILE; kk++) acc += a[ty][kk] * b[kk][tx];
    return acc;
}

// out [b, nh, t, rows] = x · posᵀ per head: out[bh, i, r] = sum_d x[bi, i, h*hs + d] ·
// pos[r, h*hs + d]. Grid (ceil(rows / 16), ceil(t / 16), b*nh), 256 threads: tx = r, ty = i.
template <typename T>
__device__ void position_products_forward(T* out, const T* x, const T* pos, int t, int nh, int hs, int rows) {
    __shared__ float x_tile[PRODUCT_TILE][PRODUCT_TILE + 1];    // [i][d]
    __shared__ float pos_tile[PRODUCT_TILE][PRODUCT_TILE + 1];  // [d][r]
    const int tx = threadIdx.x % PRODUCT_TILE, ty = threadIdx.x / PRODUCT_TILE;
    const int bh = blockIdx.z, bi = bh / nh, h = bh % nh;
    const int r0 = blockIdx.x * PRODUCT_TILE, i0 = blockIdx.y * PRODUCT_TILE;
    const size_t channels = (size_t)nh * hs;
    float acc = 0.0f;
    for (int d0 = 0; d0 < hs; d0 += PRODUCT_TILE) {
        const int i = i0 + ty, d = d0 + tx, r = r0 + ty;
        x_tile[ty][tx] = i < t && d < hs ? to_float(x[((size_t)bi * t + i) * channels + (size_t)h * hs + d]) : 0.0f;
        // pos_tile[d][r]: this thread loads (r0 + ty, d0 + tx) into the transposed slot.
        pos_tile[tx][ty] = r < rows && d < hs ? to_float(pos[(size_t)r * channels + (size_t)h * hs + d]) : 0.0f;
        __syncthreads();
        acc = tile_product(acc, x_tile, pos_tile, ty, tx);
        __syncthreads();
    }
    const int i = i0 + ty, r = r0 + tx;
    if (i < t && r < rows) out[((size_t)bh * t + i) * rows + r] = from_float<T>(acc);
}

// dx [b, t, nh*hs] += dout · pos per head: dx[bi, i, h*hs + d] += sum_r dout[bh, i, r] ·
// pos[r, h*hs + d]. Grid (ceil(hs / 16), ceil(t / 16), b*nh), 256 threads: tx = d, ty = i.
template <typename T>
__device__ void position_products_backward_x(T* dx, const T* dout, const T* pos, int t, int nh, int hs, int rows) {
    __shared__ float dout_tile[PRODUCT_TILE][PRODUCT_TILE + 1];  // [i][r]
    __shared__ float pos_tile[PRODUCT_TILE][PRODUCT_TILE + 1];   // [r][d]
    const int tx = threadIdx.x % PRODUCT_TILE, ty = threadIdx.x / PRODUCT_TILE;
    const int bh = blockIdx.z, bi = bh / nh, h = bh % nh;
    const int d0 = blockIdx.x * PRODUCT_TILE, i0 = blockIdx.y * PRODUCT_TILE;
    const size_t channels = (size_t)nh * hs;
    float acc = 0.0f;
    for (int r0 = 0; r0 < rows; r0 += PRODUCT_TILE) {
        const int i = i0 + ty, r = r0 + tx;
        dout_tile[ty][tx] = i < t && r < rows ? to_float(dout[((size_t)bh * t + i) * rows + r]) : 0.0f;
        const int pr = r0 + ty, d = d0 + tx;
        pos_tile[ty][tx] = pr < rows && d < hs ? to_float(pos[(size_t)pr * channels + (size_t)h * hs + d]) : 0.0f;
        __syncthreads();
        acc = tile_product(acc, dout_tile, pos_tile, ty, tx);
        __syncthreads();
    }
    const int i = i0 + ty, d = d0 + tx;
    if (i < t && d < hs) {
        const size_t at = ((size_t)bi * t + i) * channels + (size_t)h * hs + d;
        dx[at] = from_float<T>(to_float(dx[at]) + acc);
    }
}

// dpos [rows, nh*hs] += sum over the sequences of doutᵀ · x per head: dpos[r, h*hs + d] +=
// sum_bi sum_i dout[bh, i, r] · x[bi, i, h*hs + d], summed in (bi, i) order by one thread.
// Grid (ceil(hs / 16), ceil(rows / 16), nh), 256 threads: tx = d, ty = r.
template <typename T>
__device__ void position_products_backward_pos(T* dpos, const T* dout, const T* x, int b, int t, int nh, int hs,
                                               int rows) {
    __shared__ float dout_tile[PRODUCT_TILE][PRODUCT_TILE + 1];  // [r][i]
    __shared__ float x_tile[PRODUCT_TILE][PRODUCT_TILE + 1];     // [i][d]
    const int tx = threadIdx.x % PRODUCT_TILE, ty = threadIdx.x / PRODUCT_TILE;
    const int h = blockIdx.z;
    const int d0 = blockIdx.x * PRODUCT_TILE, r0 = blockIdx.y * PRODUCT_TILE;
    const size_t channels = (size_t)nh * hs;
    float acc = 0.0f;
    for (int bi = 0; bi < b; bi++) {
        const size_t bh = (size_t)bi * nh + h;
        for (int i0 = 0; i0 < t; i0 += PRODUCT_TILE) {
            // dout_tile[r][i]: this thread loads (i0 + ty, r0 + tx), coalesced along r.
            const int i = i0 + ty, r = r0 + tx, d = d0 + tx;
            dout_tile[tx][ty] = i < t && r < rows ? to_float(dout[(bh * t + i) * rows + r]) : 0.0f;
            x_tile[ty][tx] = i < t && d < hs ? to_float(x[((size_t)bi * t + i) * channels + (size_t)h * hs + d]) : 0.0f;
            __syncthreads();
            acc = tile_product(acc, dout_tile, x_tile, ty, tx);
            __syncthreads();
        }
    }
    const int r = r0 + ty, d = d0 + tx;
    if (r < rows && d < hs) {
        const size_t at = (size_t)r * channels + (size_t)h * hs + d;
        dpos[at] = from_float<T>(to_float(dpos[at]) + acc);
    }
}

// ---- 2. the attention ----------------------------------------------------------------------

#define FLASH_WARPS 4
#define FLASH_ROWS_PER_WARP 4
#define FLASH_ROWS (FLASH_WARPS * FLASH_ROWS_PER_WARP)
#define FLASH_TILE 32
#define FLASH_DIMS_PER_LANE 4

// The position terms of one call: c2p, p2c [b, nh, t, rows] (null when absent) and
// relative [t, t] (entries below rows; the host checks them).
template <typename T>
struct PositionTerms {
    const T* c2p;
    const T* p2c;
    const unsigned* relative;
    int rows;
};

// The unscaled score of query i and key j (both < t) of head bh: (q_i·k_j + c2p[i, r]) +
// p2c[j, r], summed in the CPU's order; *relative_row = r.
template <typename T>
__device__ __forceinline__ float raw_score(float content, const PositionTerms<T>& terms, size_t bh, int t, int i,
                                           int j, int* relative_row) {
    const int r = terms.relative == nullptr ? 0 : (int)terms.relative[(size_t)i * t + j];
    *relative_row = r;
    float score = content;
    if (terms.c2p != nullptr) score += to_float(terms.c2p[(bh * t + i) * terms.rows + r]);
    if (terms.p2c != nullptr) score += to_float(terms.p2c[(bh * t + j) * terms.rows + r]);
    return score;
}

// Whether sequence bi has a real token at all; when none, every key is allowed (uniform
// attention, as the CPU). Block-wide: every thread must call it (it synchronises).
__device__ __forceinline__ bool sequence_has_real_token(const uint8_t* mask_b, int t) {
    bool local_real = false;
    for (int j = threadIdx.x; j < t; j += blockDim.x) local_real |= mask_b[j] != 0;
    return __syncthreads_or(local_real);
}

// Whether key j of a sequence of t gets weight.
__device__ __forceinline__ bool key_allowed(const uint8_t* mask_b, bool any_real, int j, int t) {
    return j < t && (!any_real || mask_b[j] != 0);
}

// tile[rows, stride] (fp32) = rows first_row.. of one head of x [b, t, nh*hs] (head_base:
// element (bi, 0, h*hs)), zero past t. The caller synchronises before the tile is read.
template <typename T>
__device__ __forceinline__ void load_head_rows(float* tile, int stride, const T* x, size_t head_base,
                                               size_t channels, int first_row, int rows, int t, int hs) {
    for (int e = threadIdx.x; e < rows * hs; e += blockDim.x) {
        const int r = e / hs, d = e % hs;
        const int row = first_row + r;
        tile[r * stride + d] = row < t ? to_float(x[head_base + (size_t)row * channels + d]) : 0.0f;
    }
}

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

// out [b, t, nh*hs] (T) and out32 (the same in fp32), lse [b, nh, t] = log sum_j exp(s_ij)
// over the allowed keys. Online softmax per own query row as kernels/attention.cu's
// flash_attention_forward. Shared: FLASH_ROWS * hs + FLASH_TILE * (hs | 1) + FLASH_TILE * hs
// floats.
template <typename T>
__device__ void disentangled_attention_forward(T* out, float* out32, float* lse, const T* q, const T* k, const T* v,
                                               PositionTerms<T> terms, const uint8_t* mask, int t, int nh, int hs,
                                               float scale, double drop_p, float drop_scale, uint64_t seed) {
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * FLASH_ROWS;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int key_stride = hs | 1;
    float* q_own = dynamic_shared<float>();           // [FLASH_ROWS, hs]
    float* k_tile = q_own + FLASH_ROWS * hs;           // [FLASH_TILE, key_stride]
    float* v_tile = k_tile + FLASH_TILE * key_stride;  // [FLASH_TILE, hs]
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
#pragma unroll
        for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
            const int own = warp * FLASH_ROWS_PER_WARP + r, i = first_query + own;
            // Rows past t are computed on zero queries (never stored): no position terms.
            const bool allowed = key_allowed(mask_b, any_real, j, t);
            float score = -INFINITY;
            if (allowed) {
                const float content = head_dot(q_own + own * hs, k_tile + lane * key_stride, hs);
                int relative_row;
                score = scale * (i < t ? raw_score(content, terms, bh, t, i, j, &relative_row) : content);
            }
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
            // running_sum >= 1: the row's maximum contributes exp(0) (some key is allowed).
            const float inv_sum = 1.0f / running_sum[r];
            const size_t at = head_base + (size_t)i * channels;
#pragma unroll
            for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                const int d = lane + 32 * c;
                if (d < hs) {
                    const float o = acc[r][c] * inv_sum;
                    out[at + d] = from_float<T>(o);
                    out32[at + d] = o;
                }
            }
            if (lane == 0) lse[(size_t)bh * t + i] = running_max[r] + logf(running_sum[r]);
        }
    }
}

// dot [b, nh, t] = D_i = dout_i · out_i (out in fp32, as the forward saved it): the softmax
// backward's sum_j p_ij dp_ij, dropout or not (kernels/attention.cu's
// flash_attention_backward_dot says why). One warp per row (bi*nh + h)*t + i.
template <typename T>
__device__ void disentangled_attention_backward_dot(float* dot, const T* dout, const float* out32, int b, int t,
                                                    int nh, int hs) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)b * nh * t) return;  // whole warps leave together; no block sync below
    const size_t i = row % t, bh = row / t, bi = bh / nh, h = bh % nh;
    const size_t at = (bi * t + i) * nh * hs + h * hs;
    float sum = 0.0f;
    for (int d = lane; d < hs; d += 32) sum += to_float(dout[at + d]) * out32[at + d];
    sum = warp_sum(sum);
    if (lane == 0) dot[row] = sum;
}

// grad rows [b, nh, t, rows] (first_row.. of head bh) += scale · acc [FLASH_ROWS, rows]
// (shared), rows past t skipped. The block cooperates; the caller synchronised.
template <typename T>
__device__ __forceinline__ void add_position_grads(T* grad, const float* acc, size_t bh, int first_row, int t,
                                                   int rows, float scale) {
    for (int e = threadIdx.x; e < FLASH_ROWS * rows; e += blockDim.x) {
        const int own = e / rows, r = e % rows, row = first_row + own;
        if (row < t) {
            const size_t at = (bh * t + row) * rows + r;
            grad[at] = from_float<T>(to_float(grad[at]) + scale * acc[e]);
        }
    }
}

// dk, dv [b, t, nh*hs] and dp2c [b, nh, t, rows] (when p2c is present) += the key-side
// gradients, per tile of own KEY rows j, streaming the query tiles (lane l: query
// first_query + l):
//   p_ij = exp(s_ij - lse_i) (allowed keys), f_ij the dropout factor,
//   ds_ij = p_ij (f_ij dout_i·v_j - D_i),
//   dv_j += sum_i p_ij f_ij dout_i, dk_j += scale sum_i ds_ij q_i,
//   dp2c[j, r_ij] += scale ds_ij (in the shared accumulator first, see the top).
// Shared: 2 * FLASH_ROWS * hs + 2 * FLASH_TILE * (hs | 1) floats, then FLASH_ROWS * rows
// when p2c is present.
template <typename T>
__device__ void disentangled_attention_backward_key(T* dk, T* dv, T* dp2c, const T* dout, const T* q, const T* k,
                                                    const T* v, PositionTerms<T> terms, const float* lse,
                                                    const float* dot, const uint8_t* mask, int t, int nh, int hs,
                                                    float scale, double drop_p, float drop_scale, uint64_t seed) {
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_key = blockIdx.x * FLASH_ROWS;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int stride = hs | 1;
    float* k_own = dynamic_shared<float>();           // [FLASH_ROWS, hs]
    float* v_own = k_own + FLASH_ROWS * hs;            // [FLASH_ROWS, hs]
    float* q_tile = v_own + FLASH_ROWS * hs;           // [FLASH_TILE, stride]
    float* dout_tile = q_tile + FLASH_TILE * stride;   // [FLASH_TILE, stride]
    float* dp2c_acc = dout_tile + FLASH_TILE * stride;  // [FLASH_ROWS, rows] when p2c
    const bool with_p2c = terms.p2c != nullptr;
    if (with_p2c) {
        for (int e = threadIdx.x; e < FLASH_ROWS * terms.rows; e += blockDim.x) dp2c_acc[e] = 0.0f;
    }
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
        const bool query_real = i < t;
        const float lse_i = query_real ? lse[(size_t)bh * t + i] : 0.0f;
        const float dot_i = query_real ? dot[(size_t)bh * t + i] : 0.0f;
#pragma unroll
        for (int r = 0; r < FLASH_ROWS_PER_WARP; r++) {
            const int own = warp * FLASH_ROWS_PER_WARP + r, j = first_key + own;
            // Uniform across the warp: a disallowed key (padding, or past t) gets nothing.
            if (!key_allowed(mask_b, any_real, j, t)) continue;
            float weight = 0.0f, dscore = 0.0f;
            int relative_row = 0;
            if (query_real) {
                const float content = head_dot(q_tile + lane * stride, k_own + own * hs, hs);
                const float s = scale * raw_score(content, terms, bh, t, i, j, &relative_row);
                const float p = expf(s - lse_i);
                const float f = dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
                weight = p * f;
                dscore = p * (f * head_dot(dout_tile + lane * stride, v_own + own * hs, hs) - dot_i);
            }
            for (int query = 0; query < FLASH_TILE; query++) {
                const float w = __shfl_sync(0xffffffffu, weight, query);
                const float ds = __shfl_sync(0xffffffffu, dscore, query);
                const int row = __shfl_sync(0xffffffffu, relative_row, query);
#pragma unroll
                for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hs) {
                        acc_v[r][c] += w * dout_tile[query * stride + d];
                        acc_k[r][c] += ds * q_tile[query * stride + d];
                    }
                }
                if (with_p2c && lane == 0 && first_query + query < t) dp2c_acc[own * terms.rows + row] += ds;
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
    if (with_p2c) {
        __syncthreads();  // every warp's accumulator rows are complete
        add_position_grads(dp2c, dp2c_acc, bh, first_key, t, terms.rows, scale);
    }
}

// dq [b, t, nh*hs] and dc2p [b, nh, t, rows] (when c2p is present) += the query-side
// gradients, per tile of own QUERY rows i, streaming the key tiles (lane l: key
// first_key + l): dq_i += scale sum_j ds_ij k_j, dc2p[i, r_ij] += scale ds_ij, ds as in the
// key kernel. Shared: as the key kernel, the accumulator FLASH_ROWS * rows when c2p is
// present.
template <typename T>
__device__ void disentangled_attention_backward_query(T* dq, T* dc2p, const T* dout, const T* q, const T* k,
                                                      const T* v, PositionTerms<T> terms, const float* lse,
                                                      const float* dot, const uint8_t* mask, int t, int nh, int hs,
                                                      float scale, double drop_p, float drop_scale, uint64_t seed) {
    const int bh = blockIdx.y, bi = bh / nh, h = bh % nh;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_query = blockIdx.x * FLASH_ROWS;
    const size_t channels = (size_t)nh * hs;
    const size_t head_base = (size_t)bi * t * channels + (size_t)h * hs;
    const int stride = hs | 1;
    float* q_own = dynamic_shared<float>();           // [FLASH_ROWS, hs]
    float* dout_own = q_own + FLASH_ROWS * hs;         // [FLASH_ROWS, hs]
    float* k_tile = dout_own + FLASH_ROWS * hs;        // [FLASH_TILE, stride]
    float* v_tile = k_tile + FLASH_TILE * stride;      // [FLASH_TILE, stride]
    float* dc2p_acc = v_tile + FLASH_TILE * stride;    // [FLASH_ROWS, rows] when c2p
    const bool with_c2p = terms.c2p != nullptr;
    if (with_c2p) {
        for (int e = threadIdx.x; e < FLASH_ROWS * terms.rows; e += blockDim.x) dc2p_acc[e] = 0.0f;
    }
    const uint8_t* mask_b = mask + (size_t)bi * t;
    const bool any_real = sequence_has_real_token(mask_b, t);
    load_head_rows(q_own, hs, q, head_base, channels, first_query, FLASH_ROWS, t, hs);
    load_head_rows(dout_own, hs, dout, head_base, channels, first_query, FLASH_ROWS, t, hs);

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
            int relative_row = 0;
            if (allowed) {
                const float content = head_dot(q_own + own * hs, k_tile + lane * stride, hs);
                const float s = scale * raw_score(content, terms, bh, t, i, j, &relative_row);
                const float p = expf(s - lse_own[r]);
                const float f = dropout_factor(((size_t)bh * t + i) * t + j, drop_p, drop_scale, seed);
                dscore = p * (f * head_dot(dout_own + own * hs, v_tile + lane * stride, hs) - dot_own[r]);
            }
            for (int key = 0; key < FLASH_TILE; key++) {
                const float ds = __shfl_sync(0xffffffffu, dscore, key);
                const int row = __shfl_sync(0xffffffffu, relative_row, key);
#pragma unroll
                for (int c = 0; c < FLASH_DIMS_PER_LANE; c++) {
                    const int d = lane + 32 * c;
                    if (d < hs) acc[r][c] += ds * k_tile[key * stride + d];
                }
                if (with_c2p && lane == 0 && first_key + key < t) dc2p_acc[own * terms.rows + row] += ds;
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
    if (with_c2p) {
        __syncthreads();  // every warp's accumulator rows are complete
        add_position_grads(dc2p, dc2p_acc, bh, first_query, t, terms.rows, scale);
    }
}

// The arguments every attention kernel but the dot pass ends with, in this order.
#define ATTENTION_PARAMS(T)                                                                              \
    const T *c2p, const T *p2c, const unsigned *relative, int rows, const uint8_t *mask, int t, int nh, int hs, \
        float scale, double drop_p, float drop_scale, uint64_t seed
#define TERMS(T) PositionTerms<T>{c2p, p2c, relative, rows}

#define KERNELS(T, SUFFIX)                                                                                        \
    extern "C" __global__ void position_products_forward_##SUFFIX(T* out, const T* x, const T* pos, int t,      \
                                                                  int nh, int hs, int rows) {                   \
        position_products_forward<T>(out, x, pos, t, nh, hs, rows);                                             \
    }                                                                                                             \
    extern "C" __global__ void position_products_backward_x_##SUFFIX(T* dx, const T* dout, const T* pos, int t, \
                                                                     int nh, int hs, int rows) {                \
        position_products_backward_x<T>(dx, dout, pos, t, nh, hs, rows);                                        \
    }                                                                                                             \
    extern "C" __global__ void position_products_backward_pos_##SUFFIX(T* dpos, const T* dout, const T* x,      \
                                                                       int b, int t, int nh, int hs, int rows) { \
        position_products_backward_pos<T>(dpos, dout, x, b, t, nh, hs, rows);                                   \
    }                                                                                                             \
    extern "C" __global__ void disentangled_attention_forward_##SUFFIX(                                           \
        T* out, float* out32, float* lse, const T* q, const T* k, const T* v, ATTENTION_PARAMS(T)) {              \
        disentangled_attention_forward<T>(out, out32, lse, q, k, v, TERMS(T), mask, t, nh, hs, scale, drop_p,     \
                                          drop_scale, seed);                                                      \
    }                                                                                                             \
    extern "C" __global__ void disentangled_attention_backward_dot_##SUFFIX(float* dot, const T* dout,           \
                                                                            const float* out32, int b, int t,    \
                                                                            int nh, int hs) {                    \
        disentangled_attention_backward_dot<T>(dot, dout, out32, b, t, nh, hs);                                   \
    }                                                                                                             \
    extern "C" __global__ void disentangled_attention_backward_key_##SUFFIX(                                      \
        T* dk, T* dv, T* dp2c, const T* dout, const T* q, const T* k, const T* v, const float* lse,               \
        const float* dot, ATTENTION_PARAMS(T)) {                                                                  \
        disentangled_attention_backward_key<T>(dk, dv, dp2c, dout, q, k, v, TERMS(T), lse, dot, mask, t, nh, hs,  \
                                               scale, drop_p, drop_scale, seed);                                  \
    }                                                                                                             \
    extern "C" __global__ void disentangled_attention_backward_query_##SUFFIX(                                    \
        T* dq, T* dc2p, const T* dout, const T* q, const T* k, const T* v, const float* lse, const float* dot,    \
        ATTENTION_PARAMS(T)) {                                                                                    \
        disentangled_attention_backward_query<T>(dq, dc2p, dout, q, k, v, TERMS(T), lse, dot, mask, t, nh, hs,    \
                                                 scale, drop_p, drop_scale, seed);                                \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
