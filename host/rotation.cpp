// Householder QR (LAPACK's blocked dgeqrf) and Haar-random orthogonal matrices.
#include "univ/rotation.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

extern "C" {  // LAPACK (OpenBLAS ships it): blocked Householder QR and forming Q
void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work, const int* lwork,
             int* info);
void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau, double* work,
             const int* lwork, int* info);
}

namespace univ {

std::vector<double> householder_qr(std::vector<double>& a, int n) {
  if (n == 0) return {};
  // LAPACK works column-major: the transpose of the row-major matrix is its layout.
  std::vector<double> cm(size_t(n) * n), tau(std::max(n, 1)), work(size_t(std::max(n, 1)) * 64);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) cm[size_t(j) * n + i] = a[size_t(i) * n + j];
  const int lwork = static_cast<int>(work.size());
  int info = 0;
  dgeqrf_(&n, &n, cm.data(), &n, tau.data(), work.data(), &lwork, &info);
  if (info != 0) throw std::runtime_error("dgeqrf failed: info " + std::to_string(info));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) a[size_t(i) * n + j] = i <= j ? cm[size_t(j) * n + i] : 0.0;
  dorgqr_(&n, &n, &n, cm.data(), &n, tau.data(), work.data(), &lwork, &info);
  if (info != 0) throw std::runtime_error("dorgqr failed: info " + std::to_string(info));
  std::vector<double> q(size_t(n) * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) q[size_t(i) * n + j] = cm[size_t(j) * n + i];
  return q;
}

std::vector<double> haar_orthogonal(int n, PhiloxStream& rng) {
  std::vector<double> g(size_t(n) * n);
  for (double& x : g) x = rng.next_normal();
  std::vector<double> q = householder_qr(g, n);
  // Q diag(sign(diag R)) makes the factorisation unique, and Q exactly Haar.
  for (int j = 0; j < n; ++j)
    if (g[size_t(j) * n + j] < 0)
      for (int i = 0; i < n; ++i) q[size_t(i) * n + j] = -q[size_t(i) * n + j];
  return q;
}

}  // namespace univ
