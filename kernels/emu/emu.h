// The CUDA execution model on the CPU, so that kernels/*.cu run without a GPU (tests only).
// Force-included ahead of a kernel file compiled as C++:
//   g++ -std=c++20 -DRCX_EMULATE -include kernels/emu/emu.h -x c++ kernels/X.cu
// Every emulated thread is a fiber of emu.cpp's scheduler; the blocks of a launch run one
// after another on the calling OS thread, so `__shared__` can be a function-local static
// and the built-in indices are read from the running fiber's record. Only what the kernels
// use is here; a kernel that needs more fails to compile, it never runs wrong.
#pragma once
#ifdef RCX_EMULATE

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <string>
#include <type_traits>

// Kernels are the only symbols a kernel library exports (it is built -fvisibility=hidden),
// so the helpers of two kernel files can never bind to each other.
#define __global__ __attribute__((visibility("default")))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// One block runs at a time, so one static per declaration is the block's shared memory.
#define __shared__ static

// The 16-byte vector the kernels move 8 bf16 values with.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct rcx_emu_dim3 {
    unsigned x, y, z;
};
typedef rcx_emu_dim3 dim3;
typedef rcx_emu_dim3 uint3;

// The running emulated thread: its threadIdx, and the launch's other built-ins.
struct rcx_emu_thread_record {
    rcx_emu_dim3 thread_idx;
};

extern "C" {
extern rcx_emu_thread_record* rcx_emu_current;
extern rcx_emu_dim3 rcx_emu_block_idx, rcx_emu_block_dim, rcx_emu_grid_dim;
void* rcx_emu_dynamic_shared(void);
// Block barrier: kind 0 plain, 1 or, 2 and, 3 count; returns the reduction of `predicate`.
int rcx_emu_block_barrier(int kind, int predicate);
// Warp collective over the lanes of `mask`: every lane gives `bits` and the lane it reads
// (`source`); returns that lane's bits. kind names the intrinsic (lanes must agree).
uint64_t rcx_emu_warp_exchange(int kind, unsigned mask, uint64_t bits, int source);
// Ends the launch with an error: a use of a CUDA API that the hardware leaves undefined.
[[noreturn]] void rcx_emu_fail(const char* why);
}

#define threadIdx (rcx_emu_current->thread_idx)
#define blockIdx (rcx_emu_block_idx)
#define blockDim (rcx_emu_block_dim)
#define gridDim (rcx_emu_grid_dim)
#define warpSize 32

inline void __syncthreads() { rcx_emu_block_barrier(0, 0); }
inline int __syncthreads_or(int predicate) { return rcx_emu_block_barrier(1, predicate != 0); }
inline int __syncthreads_and(int predicate) { return rcx_emu_block_barrier(2, predicate != 0); }
inline int __syncthreads_count(int predicate) { return rcx_emu_block_barrier(3, predicate != 0); }
inline void __threadfence() {}
inline void __threadfence_block() {}

inline int rcx_emu_lane() {
    const rcx_emu_dim3 t = threadIdx;
    return (int)((t.x + blockDim.x * (t.y + blockDim.y * t.z)) & 31u);
}

enum { RCX_EMU_SHFL = 1, RCX_EMU_SHFL_XOR, RCX_EMU_SHFL_DOWN, RCX_EMU_SHFL_UP, RCX_EMU_VOTE, RCX_EMU_SYNCWARP, RCX_EMU_WMMA };

template <typename T> inline T rcx_emu_shuffle(int kind, unsigned mask, T value, int source) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "warp shuffles move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    bits = rcx_emu_warp_exchange(kind, mask, bits, source);
    memcpy(&value, &bits, sizeof(T));
    return value;
}

// Source lanes as CUDA defines them for a segment of `width` lanes: a lane outside the
// caller's segment (above it for xor/down, below for up) leaves the value unchanged.
template <typename T> inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
    const int lane = rcx_emu_lane(), base = lane & ~(width - 1);
    return rcx_emu_shuffle(RCX_EMU_SHFL, mask, value, base + (src_lane & (width - 1)));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
    const int lane = rcx_emu_lane(), end = (lane & ~(width - 1)) + width;
    const int source = lane ^ lane_mask;
    return rcx_emu_shuffle(RCX_EMU_SHFL_XOR, mask, value, source < end ? source : lane);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
    const int lane = rcx_emu_lane(), end = (lane & ~(width - 1)) + width;
    const int source = lane + (int)delta;
    return rcx_emu_shuffle(RCX_EMU_SHFL_DOWN, mask, value, source < end ? source : lane);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
    const int lane = rcx_emu_lane(), base = lane & ~(width - 1);
    const int source = lane - (int)delta;
    return rcx_emu_shuffle(RCX_EMU_SHFL_UP, mask, value, source >= base ? source : lane);
}
// Votes: every lane reads the ballot (bit i = predicate of lane i), which the scheduler
// assembles when `source` is -1.
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return (unsigned)rcx_emu_warp_exchange(RCX_EMU_VOTE, mask, predicate != 0, -1);
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { rcx_emu_warp_exchange(RCX_EMU_SYNCWARP, mask, 0, -1); }

// Fibers never preempt each other, so a plain read-modify-write is atomic.
template <typename T> inline T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}
template <typename T> inline T atomicMax(T* address, T value) {
    const T old = *address;
    if (value > old) *address = value;
    return old;
}

template <typename T> inline T __ldg(const T* address) { return *address; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int_as_float(int x) {
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}
inline int __float_as_int(float x) {
    int i;
    memcpy(&i, &x, sizeof i);
    return i;
}

// bf16, bit for bit CUDA's conversions: fp32 -> bf16 rounds to nearest, ties to even;
// any NaN becomes the canonical NaN 0x7fff, as cuda_bf16.h and cvt.rn.bf16.f32 give.
struct __nv_bfloat16 {
    uint16_t bits;
};

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = 0x7fff;
    } else {
        const uint32_t lsb = (u >> 16) & 1u;
        r.bits = (uint16_t)((u + 0x7fffu + lsb) >> 16);
    }
    return r;
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline float __bfloat162float(__nv_bfloat16 x) {
    const uint32_t u = (uint32_t)x.bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// Warp matrix multiply-accumulate (mma.h), the m16n16k16 shape with bf16 inputs and fp32
// accumulators. CUDA leaves unspecified which lane holds which element of a fragment, so a
// correct kernel never depends on it; here every lane holds the whole tile (loads and mma
// are computed by each lane), and store_matrix_sync writes only this lane's share (element
// e by lane e % 32), so a kernel that reads a stored tile without a __syncwarp reads stale
// values, as it could on a GPU. mma_sync is a warp collective: all 32 lanes must call it.
// Pointers must be 256-bit aligned and ldm a multiple of 16 bytes, as the hardware needs.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulation has the m16n16k16 shape only");
    static constexpr int num_elements = 256;  // [16, 16] row-major: (row, col) at row * 16 + col
    T x[256];
};

inline void rcx_emu_wmma_check(const void* ptr, unsigned ldm, size_t element_bytes, const char* what) {
    if ((uintptr_t)ptr % 32 != 0) rcx_emu_fail((std::string(what) + ": pointer not 256-bit aligned").c_str());
    if (ldm * element_bytes % 16 != 0) rcx_emu_fail((std::string(what) + ": ldm not a multiple of 16 bytes").c_str());
}

// Element (row, col) of a tile in memory, by its layout.
inline size_t rcx_emu_wmma_at(int row, int col, unsigned ldm, bool col_major) {
    return col_major ? (size_t)col * ldm + row : (size_t)row * ldm + col;
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& a, const T* ptr, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load names its layout");
    rcx_emu_wmma_check(ptr, ldm, sizeof(T), "wmma::load_matrix_sync");
    const bool column_major = std::is_same<Layout, col_major>::value;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) a.x[r * 16 + c] = ptr[rcx_emu_wmma_at(r, c, ldm, column_major)];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& a, const float* ptr, unsigned ldm,
                             layout_t layout) {
    rcx_emu_wmma_check(ptr, ldm, sizeof(float), "wmma::load_matrix_sync");
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) a.x[r * 16 + c] = ptr[rcx_emu_wmma_at(r, c, ldm, layout == mem_col_major)];
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& a, unsigned ldm,
                              layout_t layout) {
    rcx_emu_wmma_check(ptr, ldm, sizeof(float), "wmma::store_matrix_sync");
    for (int e = rcx_emu_lane(); e < 256; e += 32)
        ptr[rcx_emu_wmma_at(e / 16, e % 16, ldm, layout == mem_col_major)] = a.x[e];
}

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& a, T value) {
    for (int e = 0; e < 256; e++) a.x[e] = value;
}

// d = a b + c: products of bf16 values are exact in fp32; sums in fp32, k ascending.
template <typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    rcx_emu_warp_exchange(RCX_EMU_WMMA, 0xffffffffu, 0, -1);
    float out[256];
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) {
            float sum = c.x[r * 16 + n];
            for (int k = 0; k < 16; k++) sum += __bfloat162float(a.x[r * 16 + k]) * __bfloat162float(b.x[k * 16 + n]);
            out[r * 16 + n] = sum;
        }
    memcpy(d.x, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda

#endif  // RCX_EMULATE
