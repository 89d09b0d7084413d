// Householder QR and Haar-random orthogonal matrices.
#include "univ/rotation.hpp"

#include <algorithm>
#include <cmath>

namespace univ {

namespace {

// rows [k, n) and columns [col0, n) of the row-major m -= beta v (v^T m), row by row.
void reflect(std::vector<double>& m, int n, int k, int col0, const std::vector<double>& v, double beta,
             std::vector<double>& w) {
  std::fill(w.begin() + col0, w.end(), 0.0);
  for (int i = k; i < n; ++i) {
    const double vi = v[i - k];
    const double* row = m.data() + size_t(i) * n;
    for (int j = col0; j < n; ++j) w[j] += vi * row[j];
  }
  for (int i = k; i < n; ++i) {
    const double vi = beta * v[i - k];
    double* row = m.data() + size_t(i) * n;
    for (int j = col0; j < n; ++j) row[j] -= vi * w[j];
  }
}

}  // namespace

std::vector<double> householder_qr(std::vector<double>& a, int n) {
  // Reflector k, H_k = I - beta_k v_k v_k^T, zeroes column k below the diagonal;
  // Q = H_0 H_1 ... H_{n-2}, formed by applying the reflectors to I in reverse.
  std::vector<std::vector<double>> reflectors(n);
  std::vector<double> betas(n, 0.0), w(n);
  for (int k = 0; k + 1 < n; ++k) {
    std::vector<double>& v = reflectors[k];
    v.resize(n - k);
    double norm = 0;
    for (int i = k; i < n; ++i) {
      v[i - k] = a[size_t(i) * n + k];
      norm += v[i - k] * v[i - k];
    }
    norm = std::sqrt(norm);
    if (norm == 0) continue;
    v[0] += v[0] > 0 ? norm : -norm;  // the sign that avoids cancellation
    double vv = 0;
    for (double x : v) vv += x * x;
    betas[k] = 2.0 / vv;
    reflect(a, n, k, k, v, betas[k], w);
    for (int i = k + 1; i < n; ++i) a[size_t(i) * n + k] = 0.0;
  }
  std::vector<double> q(size_t(n) * n, 0.0);
  for (int i = 0; i < n; ++i) q[size_t(i) * n + i] = 1.0;
  for (int k = n - 2; k >= 0; --k)
    if (betas[k] != 0) reflect(q, n, k, 0, reflectors[k], betas[k], w);
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
