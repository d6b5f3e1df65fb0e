// Kernels that test the emulator itself (tests/kernel_emu.rs, `emulator_*`): the
// semantics of its built-ins, and the errors it must report instead of hanging or crashing.
// Compiled for the emulator only (build.rs takes kernels/*.cu, not this folder).
#include "common.cuh"

// out[linear thread of the grid, 0..12]: threadIdx, blockIdx, blockDim, gridDim.
extern "C" __global__ void emu_indices(unsigned* out) {
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned* o = out + ((size_t)block * blockDim.x * blockDim.y * blockDim.z + thread) * 12;
    const unsigned values[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                                 blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
    for (int i = 0; i < 12; i++) o[i] = values[i];
}

// out[thread, 0..8]: every warp intrinsic on value = 100 * thread, then the block votes
// on (thread % 3 == 0) and a block_sum of thread.
extern "C" __global__ void emu_collectives(int* out) {
    const int t = threadIdx.x, v = 100 * t;
    int* o = out + t * 9;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_down_sync(0xffffffffu, v, 3);
    o[2] = __shfl_up_sync(0xffffffffu, v, 2);
    o[3] = __shfl_sync(0xffffffffu, v, 7);
    o[4] = (int)__ballot_sync(0xffffffffu, t % 3 == 0);
    o[5] = __syncthreads_or(t == 37);
    o[6] = __syncthreads_and(t % 3 == 0);
    o[7] = __syncthreads_count(t % 3 == 0);
    o[8] = block_sum(t);
}

// Shared memory persists across a barrier and is the block's own: every thread writes its
// slot, then reads its neighbour's.
extern "C" __global__ void emu_shared_exchange(float* out) {
    float* slots = dynamic_shared<float>();
    __shared__ float statics[256];
    slots[threadIdx.x] = (float)(blockIdx.x * 1000 + threadIdx.x);
    statics[threadIdx.x] = -(float)threadIdx.x;
    __syncthreads();
    const unsigned next = (threadIdx.x + 1) % blockDim.x;
    out[blockIdx.x * blockDim.x + threadIdx.x] = slots[next] + statics[next];
}

// bits[i] = __float2bfloat16_rn(in[i]); back[i] = __bfloat162float of that.
extern "C" __global__ void emu_bf16(uint16_t* bits, float* back, const float* in, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bf16 b = __float2bfloat16_rn(in[i]);
    memcpy(&bits[i], &b, sizeof b);
    back[i] = __bfloat162float(b);
}

// Thread `exiting` returns before a __syncthreads the others wait at.
extern "C" __global__ void emu_exit_before_barrier(int exiting) {
    if ((int)threadIdx.x == exiting) return;
    __syncthreads();
}

// Even and odd threads wait at different __syncthreads.
extern "C" __global__ void emu_divergent_barriers(int* out) {
    if (threadIdx.x % 2) {
        __syncthreads();
        out[threadIdx.x] = 1;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2;
    }
}

// A full-mask warp sum in a block whose last warp is partial.
extern "C" __global__ void emu_partial_warp(float* out) { out[threadIdx.x] = warp_sum(1.0f); }

// Lane 0 of each warp leaves before the shuffle its warp waits in.
extern "C" __global__ void emu_lane_exits(float* out) {
    if (threadIdx.x % 32 == 0) return;
    out[threadIdx.x] = warp_sum(1.0f);
}

// Writes element `at` of a buffer (out of bounds when at >= its length).
extern "C" __global__ void emu_write_at(float* out, int at) {
    if (threadIdx.x == 0) out[at] = 1.0f;
}

// Writes float `at` of the dynamic shared memory.
extern "C" __global__ void emu_shared_write_at(int at) {
    if (threadIdx.x == 0) dynamic_shared<float>()[at] = 1.0f;
}

// An integer division by `divisor`.
extern "C" __global__ void emu_divide(int* out, int divisor) { out[threadIdx.x] = 1000 / divisor; }

// emu_shared_exchange without its barrier: a race on a GPU, poison (NaN) read here, in
// one block or the other (even blocks run their threads forward, odd ones backward).
extern "C" __global__ void emu_missing_barrier(float* out) {
    float* slots = dynamic_shared<float>();
    slots[threadIdx.x] = (float)threadIdx.x;
    out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// d [16, 16] = a [16, 16] · b [16, 16] + c [16, 16] on one warp through wmma, all row-major
// in memory; b_transposed: b is loaded as the col_major operand of its transpose stored
// row-major (b_memory[n * 16 + k] = B[k][n]).
extern "C" __global__ void emu_wmma_product(float* d, const bf16* a, const bf16* b, const float* c,
                                            int b_transposed) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
    if (b_transposed) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, b, 16);
        wmma::mma_sync(acc, fa, fb, acc);
    } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b, 16);
        wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// A tile of ones stored to shared memory, then read back by each lane at elements other
// lanes stored, with or without the __syncwarp between: without it, a race on a GPU, and
// poison (NaN) read here. out [32].
extern "C" __global__ void emu_wmma_store_then_read(float* out, int sync) {
    using namespace nvcuda;
    float* tile = dynamic_shared<float>();  // [16, 16]
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> ones;
    wmma::fill_fragment(ones, 1.0f);
    wmma::store_matrix_sync(tile, ones, 16, wmma::mem_row_major);
    if (sync) __syncwarp();
    float sum = 0.0f;
    for (int e = 0; e < 256; e++) sum += tile[e];
    out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// A wmma load from `offset` floats into a buffer: misaligned unless offset % 8 == 0.
extern "C" __global__ void emu_wmma_load_at(const float* in, int offset) {
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, in + offset, 16, wmma::mem_row_major);
}
