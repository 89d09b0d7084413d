// Layer norm over the channel axis, forward and backward (CPU).
#include <algorithm>
#include <cmath>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

namespace {
constexpr double kLayerNormEps = 1e-5;
constexpr int kChannelBlock = 16;  // parameter gradients: threads own channel blocks, rows summed in order
}  // namespace

template <class F>
void layernorm_forward(F* out, F* mean, F* rstd, const F* inp, const F* weight, const F* bias, int M, int N, int C) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < int64_t(M) * N; ++row) {
    const int64_t m = row / N;
    const F* x = inp + row * C;
    double sum = 0;
    for (int c = 0; c < C; ++c) sum += x[c];
    const double mu = sum / C;
    double sq = 0;
    for (int c = 0; c < C; ++c) sq += (x[c] - mu) * (x[c] - mu);
    const double rs = 1.0 / std::sqrt(sq / C + kLayerNormEps);
    const F* w = weight + m * C;
    const F* b = bias + m * C;
    F* o = out + row * C;
    for (int c = 0; c < C; ++c) o[c] = static_cast<F>((x[c] - mu) * rs) * w[c] + b[c];
    mean[row] = static_cast<F>(mu);
    rstd[row] = static_cast<F>(rs);
  }
}

template <class F>
void layernorm_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp, const F* weight, const F* mean,
                        const F* rstd, int M, int N, int C) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < int64_t(M) * N; ++row) {
    const int64_t m = row / N;
    const F* x = inp + row * C;
    const F* dy = dout + row * C;
    const F* w = weight + m * C;
    const F mu = mean[row], rs = rstd[row];
    double dnorm_mean = 0, dnorm_norm_mean = 0;
    for (int c = 0; c < C; ++c) {
      const F dnorm = w[c] * dy[c];
      dnorm_mean += dnorm;
      dnorm_norm_mean += dnorm * (x[c] - mu) * rs;
    }
    dnorm_mean /= C;
    dnorm_norm_mean /= C;
    F* dx = dinp + row * C;
    for (int c = 0; c < C; ++c) {
      const double norm = (x[c] - mu) * rs;
      dx[c] += static_cast<F>((w[c] * dy[c] - dnorm_mean - norm * dnorm_norm_mean) * rs);
    }
  }
  const int blocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for collapse(2) schedule(static)
  for (int m = 0; m < M; ++m)
    for (int blk = 0; blk < blocks; ++blk) {
      const int c0 = blk * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      double dw[kChannelBlock] = {}, db[kChannelBlock] = {};
      for (int64_t n = 0; n < N; ++n) {
        const int64_t row = int64_t(m) * N + n;
        const F* x = inp + row * C;
        const F* dy = dout + row * C;
        for (int c = c0; c < c1; ++c) {
          db[c - c0] += dy[c];
          dw[c - c0] += (x[c] - mean[row]) * rstd[row] * dy[c];
        }
      }
      for (int c = c0; c < c1; ++c) {
        dweight[int64_t(m) * C + c] += static_cast<F>(dw[c - c0]);
        dbias[int64_t(m) * C + c] += static_cast<F>(db[c - c0]);
      }
    }
}

#define UNIV_INSTANTIATE(F)                                                                              \
  template void layernorm_forward<F>(F*, F*, F*, const F*, const F*, const F*, int, int, int);          \
  template void layernorm_backward<F>(F*, F*, F*, const F*, const F*, const F*, const F*, const F*, int, \
                                      int, int);
UNIV_INSTANTIATE(float)
UNIV_INSTANTIATE(double)

}  // namespace univ::cpu
