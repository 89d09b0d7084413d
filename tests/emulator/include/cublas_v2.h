// The cuBLAS calls of the training backend, the statistics and the rotation baseline,
// emulated on the host: a plain column-major GEMM per batch, enqueued on the handle's
// stream.
#pragma once
#include <vector>

#include "cuda_fp16.h"
#include "cuda_runtime.h"

typedef int cublasStatus_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_ALLOC_FAILED = 3 };
enum cublasOperation_t { CUBLAS_OP_N, CUBLAS_OP_T };
enum cublasMath_t { CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH };
struct EmuCublas {
  cudaStream_t stream = nullptr;
  bool tf32 = false;  // CUBLAS_TF32_TENSOR_OP_MATH
};
typedef EmuCublas* cublasHandle_t;
inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new EmuCublas;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s) {
  *s = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
  h->tf32 = mode == CUBLAS_TF32_TENSOR_OP_MATH;
  return CUBLAS_STATUS_SUCCESS;
}
inline const char* cublasGetStatusName(cublasStatus_t) { return "emulated"; }
// C = alpha op(A) op(B) + beta C per batch, column-major; beta 0 does not read C. The
// operands are read (read_a, read_b: element offset -> T) into rows of op(A) and columns
// of op(B) once per batch entry; each product adds its terms in order.
template <class T, class ReadA, class ReadB>
cublasStatus_t emulated_gemm(cudaStream_t stream, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k,
                             T al, ReadA read_a, int lda, long long stride_a, ReadB read_b, int ldb,
                             long long stride_b, T be, T* C, int ldc, long long stride_c, int batch) {
  emu::enqueue(stream, [=] {
    std::vector<T> rows(size_t(m) * k), cols(size_t(n) * k);
    for (int b = 0; b < batch; ++b) {
      for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p) {
          const long long at = op_a == CUBLAS_OP_N ? i + (long long)p * lda : p + (long long)i * lda;
          rows[size_t(i) * k + p] = read_a(b * stride_a + at);
        }
      for (int j = 0; j < n; ++j)
        for (int p = 0; p < k; ++p) {
          const long long at = op_b == CUBLAS_OP_N ? p + (long long)j * ldb : j + (long long)p * ldb;
          cols[size_t(j) * k + p] = read_b(b * stride_b + at);
        }
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
          T acc = 0;
          for (int p = 0; p < k; ++p) acc += rows[size_t(i) * k + p] * cols[size_t(j) * k + p];
          T& c = C[b * stride_c + i + (long long)j * ldc];
          c = be == T(0) ? al * acc : al * acc + be * c;
        }
    }
  }, "cublas gemm");
  return CUBLAS_STATUS_SUCCESS;
}
// In TF32 math the operands are rounded to TF32 first, to nearest as kernels/common.cuh's
// round_tf32 (not included here; the tensor cores' sums, and whether cuBLAS rounds or
// truncates, are cuBLAS's own: a TF32 tolerance).
inline float emulated_tf32(float x) {
  const unsigned bits = std::bit_cast<unsigned>(x);
  return (bits & 0x7f800000u) == 0x7f800000u ? x : std::bit_cast<float>((bits + 0x1000u) & 0xffffe000u);
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b,
                                                int m, int n, int k, const float* alpha, const float* A, int lda,
                                                long long stride_a, const float* B, int ldb, long long stride_b,
                                                const float* beta, float* C, int ldc, long long stride_c, int batch) {
  const bool tf32 = h->tf32;
  return emulated_gemm(h->stream, op_a, op_b, m, n, k, *alpha,
                       [A, tf32](long long i) { return tf32 ? emulated_tf32(A[i]) : A[i]; }, lda, stride_a,
                       [B, tf32](long long i) { return tf32 ? emulated_tf32(B[i]) : B[i]; }, ldb, stride_b, *beta, C,
                       ldc, stride_c, batch);
}
inline cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b,
                                                int m, int n, int k, const double* alpha, const double* A, int lda,
                                                long long stride_a, const double* B, int ldb, long long stride_b,
                                                const double* beta, double* C, int ldc, long long stride_c, int batch) {
  return emulated_gemm(h->stream, op_a, op_b, m, n, k, *alpha, [A](long long i) { return A[i]; }, lda, stride_a,
                       [B](long long i) { return B[i]; }, ldb, stride_b, *beta, C, ldc, stride_c, batch);
}

// The same with operands of FP16 or float32 (TF32 operands arrive rounded) and a
// float32 result.
enum cudaDataType_t { CUDA_R_16F, CUDA_R_32F };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT };
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b,
                                                 int m, int n, int k, const void* alpha, const void* A,
                                                 cudaDataType_t type_a, int lda, long long stride_a, const void* B,
                                                 cudaDataType_t type_b, int ldb, long long stride_b, const void* beta,
                                                 void* C, cudaDataType_t, int ldc, long long stride_c, int batch,
                                                 cublasComputeType_t, cublasGemmAlgo_t) {
  auto reader = [](const void* p, cudaDataType_t type) {
    return [p, type](long long i) {
      if (type == CUDA_R_16F) return static_cast<float>(static_cast<const __half*>(p)[i]);
      return static_cast<const float*>(p)[i];
    };
  };
  return emulated_gemm(h->stream, op_a, op_b, m, n, k, *static_cast<const float*>(alpha), reader(A, type_a), lda,
                       stride_a, reader(B, type_b), ldb, stride_b, *static_cast<const float*>(beta),
                       static_cast<float*>(C), ldc, stride_c, batch);
}
