// A fake cuBLAS (libcublas.so) for the emulated device (fake_cuda.cpp): the handle calls
// rcx makes and cublasGemmEx, computed on the host straight from cuBLAS's definition, so
// that rcx's GEMM calls (transposes, leading dimensions, types) are checked independently:
//   C = alpha op(A) op(B) + beta C, column-major, op(A) m x k, op(B) k x n, C m x n;
//   op(X) = X for CUBLAS_OP_N, X^T for CUBLAS_OP_T; element (i, j) of a matrix with
//   leading dimension ld is X[i + j ld]; with beta = 0, C is not read (it may hold NaN).
// Types: A and B both CUDA_R_32F or both CUDA_R_16BF, C either, CUBLAS_COMPUTE_32F with
// alpha and beta float host pointers; products are summed in double, C rounded once.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

extern "C" size_t rcx_emu_extent(const void* p);

typedef int cublasStatus_t;
typedef struct FakeBlas* cublasHandle_t;
typedef void* cudaStream_t;

struct FakeBlas {
    cudaStream_t stream;
};

enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_OP_N = 0,
    CUBLAS_OP_T = 1,
    CUDA_R_32F = 0,
    CUDA_R_16BF = 14,
    CUBLAS_COMPUTE_32F = 68,
};

#define API extern "C" __attribute__((visibility("default")))

namespace {

double load(const void* base, int type, long index) {
    if (type == CUDA_R_32F) return ((const float*)base)[index];
    const uint32_t bits = (uint32_t)((const uint16_t*)base)[index] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// fp32 -> bf16 rounds to nearest, ties to even; NaN stays NaN.
void store(void* base, int type, long index, float value) {
    if (type == CUDA_R_32F) {
        ((float*)base)[index] = value;
        return;
    }
    uint32_t u;
    memcpy(&u, &value, sizeof u);
    ((uint16_t*)base)[index] =
        (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fff : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

cublasStatus_t invalid(const char* why) {
    fprintf(stderr, "fake cuBLAS: cublasGemmEx: %s\n", why);
    return CUBLAS_STATUS_INVALID_VALUE;
}

// Whether a rows x cols operand with leading dimension ld lies inside its allocation: the
// check a GPU does not make (it reads or writes past it), so a wrong shape or leading
// dimension of the caller shows here instead of as garbage.
bool inside(const char* name, const void* base, int type, long rows, long cols, long ld) {
    if (rows == 0 || cols == 0) return true;
    const size_t bytes = (size_t)((cols - 1) * ld + rows) * (type == CUDA_R_32F ? 4 : 2);
    const size_t extent = rcx_emu_extent(base);
    if (extent >= bytes) return true;
    fprintf(stderr,
            "fake cuBLAS: cublasGemmEx: %s (%ld x %ld, leading dimension %ld) needs %zu bytes, its allocation holds "
            "%zu from there (0: no allocation)\n",
            name, rows, cols, ld, bytes, extent);
    return false;
}

}  // namespace

API cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    *handle = new FakeBlas{nullptr};
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasGemmEx(cublasHandle_t, int transa, int transb, int m, int n, int k, const void* alpha,
                                const void* A, int a_type, int lda, const void* B, int b_type, int ldb,
                                const void* beta, void* C, int c_type, int ldc, int compute_type, int) {
    if ((transa != CUBLAS_OP_N && transa != CUBLAS_OP_T) || (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T))
        return invalid("only CUBLAS_OP_N and CUBLAS_OP_T are emulated");
    if (m < 0 || n < 0 || k < 0) return invalid("a negative dimension");
    // The documented leading-dimension rules: A is m x k (lda >= m) untransposed, k x m
    // (lda >= k) transposed; likewise B; C is m x n.
    const int a_rows = transa == CUBLAS_OP_N ? m : k, b_rows = transb == CUBLAS_OP_N ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1)) return invalid("lda is less than the rows of A");
    if (ldb < (b_rows > 1 ? b_rows : 1)) return invalid("ldb is less than the rows of B");
    if (ldc < (m > 1 ? m : 1)) return invalid("ldc is less than m");
    if (compute_type != CUBLAS_COMPUTE_32F) {
        fprintf(stderr, "fake cuBLAS: cublasGemmEx: compute type %d is not emulated\n", compute_type);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    const bool types_ok = a_type == b_type && (a_type == CUDA_R_32F || a_type == CUDA_R_16BF) &&
                          (c_type == CUDA_R_32F || c_type == CUDA_R_16BF);
    if (!types_ok) {
        fprintf(stderr, "fake cuBLAS: cublasGemmEx: types A %d, B %d, C %d are not emulated\n", a_type, b_type,
                c_type);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    const long a_cols = transa == CUBLAS_OP_N ? k : m, b_cols = transb == CUBLAS_OP_N ? n : k;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (!inside("A", A, a_type, k ? a_rows : 0, a_cols, lda) || !inside("B", B, b_type, k ? b_rows : 0, b_cols, ldb) ||
        !inside("C", C, c_type, m, n, ldc))
        return CUBLAS_STATUS_EXECUTION_FAILED;
    const float a_scale = *(const float*)alpha, c_scale = *(const float*)beta;
    for (long j = 0; j < n; j++) {
        for (long i = 0; i < m; i++) {
            double sum = 0;
            for (long l = 0; l < k; l++) {
                const double a = load(A, a_type, transa == CUBLAS_OP_N ? i + l * lda : l + i * lda);
                const double b = load(B, b_type, transb == CUBLAS_OP_N ? l + j * ldb : j + l * ldb);
                sum += a * b;
            }
            double value = a_scale * sum;
            if (c_scale != 0.0f) value += c_scale * load(C, c_type, i + j * ldc);
            store(C, c_type, i + j * ldc, (float)value);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}
