// Row-major GEMM (one overload per float type) and Gram matrices on the CPU through
// CBLAS (OpenBLAS).
#pragma once
#include <cblas.h>

namespace univ::cpu {

// C[m,n] = alpha * op(A)[m,k] op(B)[k,n] + beta * C, all row-major.
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha,
              a, lda, b, ldb, beta, c, ldc);
}
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha,
              a, lda, b, ldb, beta, c, ldc);
}

// C[n,n] = alpha * A^T A + beta * C for row-major A [k, n]: both triangles of C are
// written (BLAS forms the upper one, the lower is its mirror, so C is exactly symmetric).
inline void gram(int n, int k, double alpha, const double* a, int lda, double beta, double* c, int ldc) {
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, n, k, alpha, a, lda, beta, c, ldc);
  for (int r = 1; r < n; ++r)
    for (int col = 0; col < r; ++col) c[r * ldc + col] = c[col * ldc + r];
}

}  // namespace univ::cpu
