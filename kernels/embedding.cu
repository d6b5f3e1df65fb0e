// BERT embeddings: out = wte[token] + wpe[position] + wtt[token type]. Tables are fp32
// (master weights); the output may be bf16. The backward never uses atomics: the word and
// type tables are updated one row per block over a host-built list of the positions that
// use the row (ascending), and the position table one element per thread summing over the
// batch, so gradients are identical run to run. Rows used by many positions (the type
// table) take the tiled variant, a column reduction over their positions.
#include "common.cuh"

// out[b*t, c]; input_ids, token_type_ids [b*t]; wte[v, c]; wpe[maxpos, c]; wtt[ntypes, c].
// Ids were checked on the host (< v, < ntypes) and t <= maxpos.
template <typename T>
__device__ void embedding_forward(T* out, const uint32_t* input_ids, const uint32_t* token_type_ids,
                                  const float* wte, const float* wpe, const float* wtt, int bt, int t,
                                  int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)bt * c) return;
    const size_t row = idx / c, ch = idx % c;
    const size_t position = row % t;
    const float x = wte[(size_t)input_ids[row] * c + ch] + wpe[position * c + ch] +
                    wtt[(size_t)token_type_ids[row] * c + ch];
    out[idx] = from_float<T>(x);
}

// dtable[rows, c] += sum of dout[p, :] over the positions p of each used row.
// rows[u]: the table row of block u; starts[u]..starts[u+1] index `positions` [b*t].
template <typename T>
__device__ void embedding_backward_rows(float* dtable, const T* dout, const int* rows, const int* starts,
                                        const int* positions, int c) {
    const int u = blockIdx.x;
    const size_t row = rows[u];
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float acc = 0.0f;
        for (int k = starts[u]; k < starts[u + 1]; k++) acc += to_float(dout[(size_t)positions[k] * c + ch]);
        dtable[row * c + ch] += acc;
    }
}

// embedding_backward_rows as a block-tiled column reduction, for rows used by many
// positions: grid (ceil(c / 32), distinct rows); block (x, u) covers columns 32x..32x+31 of
// table row rows[u] with 1024 threads, thread (warp w, lane l) sums column 32x + l over the
// positions starts[u] + w, + 32, ... (each warp reads 32 consecutive columns of a dout row),
// column_tile_sum adds the 32 slices in a fixed order: deterministic.
template <typename T>
__device__ void embedding_backward_rows_tiled(float* dtable, const T* dout, const int* rows, const int* starts,
                                              const int* positions, int c) {
    const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
    const int u = blockIdx.y;
    const int col = blockIdx.x * 32 + lane;
    float acc = 0.0f;
    if (col < c) {
        for (int k = starts[u] + slice; k < starts[u + 1]; k += 32) acc += to_float(dout[(size_t)positions[k] * c + col]);
    }
    const float total = column_tile_sum(acc);  // column blockIdx.x * 32 + slice
    const int out_col = blockIdx.x * 32 + slice;
    if (lane == 0 && out_col < c) dtable[(size_t)rows[u] * c + out_col] += total;
}

// dwpe[0..t, c] += sum over the batch of dout[b, position, c].
template <typename T>
__device__ void embedding_backward_positions(float* dwpe, const T* dout, int b, int t, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)t * c) return;
    float acc = 0.0f;
    for (int bi = 0; bi < b; bi++) acc += to_float(dout[(size_t)bi * t * c + idx]);
    dwpe[idx] += acc;
}

// Decoders' embedding: out[b*t, c] = wte[input_ids] (positions enter through RoPE, and
// there is no type table). Its backward is embedding_backward_rows over the word table.
template <typename T>
__device__ void token_embedding_forward(T* out, const uint32_t* input_ids, const float* wte, int bt, int c) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)bt * c) return;
    out[idx] = from_float<T>(wte[(size_t)input_ids[idx / c] * c + idx % c]);
}

#define KERNELS(T, SUFFIX)                                                                             \
    extern "C" __global__ void embedding_forward_##SUFFIX(                                            \
        T* out, const uint32_t* input_ids, const uint32_t* token_type_ids, const float* wte,           \
        const float* wpe, const float* wtt, int bt, int t, int c) {                                     \
        embedding_forward<T>(out, input_ids, token_type_ids, wte, wpe, wtt, bt, t, c);                 \
    }                                                                                                  \
    extern "C" __global__ void embedding_backward_rows_##SUFFIX(                                      \
        float* dtable, const T* dout, const int* rows, const int* starts, const int* positions, int c) { \
        embedding_backward_rows<T>(dtable, dout, rows, starts, positions, c);                         \
    }                                                                                                  \
    extern "C" __global__ void embedding_backward_rows_tiled_##SUFFIX(                                \
        float* dtable, const T* dout, const int* rows, const int* starts, const int* positions, int c) { \
        embedding_backward_rows_tiled<T>(dtable, dout, rows, starts, positions, c);                   \
    }                                                                                                  \
    extern "C" __global__ void embedding_backward_positions_##SUFFIX(float* dwpe, const T* dout, int b, \
                                                                     int t, int c) {                   \
        embedding_backward_positions<T>(dwpe, dout, b, t, c);                                          \
    }                                                                                                  \
    extern "C" __global__ void token_embedding_forward_##SUFFIX(T* out, const uint32_t* input_ids,    \
                                                                const float* wte, int bt, int c) {      \
        token_embedding_forward<T>(out, input_ids, wte, bt, c);                                        \
    }
KERNELS(float, f32)
KERNELS(bf16, bf16)
