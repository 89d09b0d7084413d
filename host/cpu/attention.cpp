// Causal multi-head self-attention on packed q|k|v, forward and backward (CPU).
// One (model, sequence, head) at a time; it owns its slices of out and dqkv.
#include <cmath>
#include <limits>
#include <vector>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

template <class F>
void attention_forward(F* out, F* att, const F* qkv, int M, int B, int T, int C, int H) {
  const int hd = C / H;
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(hd)));
#pragma omp parallel for collapse(3) schedule(static)
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const int64_t seq = int64_t(m) * B + b;
        const F* base = qkv + seq * T * 3 * C;
        F* a = att + (seq * H + h) * T * T;
        for (int t = 0; t < T; ++t) {
          const F* q = base + int64_t(t) * 3 * C + h * hd;
          F* arow = a + int64_t(t) * T;
          F max_score = -std::numeric_limits<F>::infinity();
          for (int t2 = 0; t2 <= t; ++t2) {
            const F* k = base + int64_t(t2) * 3 * C + C + h * hd;
            F dot = 0;
            for (int i = 0; i < hd; ++i) dot += q[i] * k[i];
            arow[t2] = dot * scale;
            max_score = std::max(max_score, arow[t2]);
          }
          F sum = 0;
          for (int t2 = 0; t2 <= t; ++t2) {
            arow[t2] = std::exp(arow[t2] - max_score);
            sum += arow[t2];
          }
          const F inv = F(1) / sum;
          for (int t2 = 0; t2 <= t; ++t2) arow[t2] *= inv;
          for (int t2 = t + 1; t2 < T; ++t2) arow[t2] = 0;
          F* o = out + (seq * T + t) * C + h * hd;
          for (int i = 0; i < hd; ++i) o[i] = 0;
          for (int t2 = 0; t2 <= t; ++t2) {
            const F* v = base + int64_t(t2) * 3 * C + 2 * C + h * hd;
            for (int i = 0; i < hd; ++i) o[i] += arow[t2] * v[i];
          }
        }
      }
}

template <class F>
void attention_backward(F* dqkv, const F* dout, const F* qkv, const F* att, int M, int B, int T, int C, int H) {
  const int hd = C / H;
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(hd)));
#pragma omp parallel
  {
    std::vector<F> datt(T);
#pragma omp for collapse(3) schedule(static)
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
          const int64_t seq = int64_t(m) * B + b;
          const F* base = qkv + seq * T * 3 * C;
          F* dbase = dqkv + seq * T * 3 * C;
          const F* a = att + (seq * H + h) * T * T;
          for (int t = 0; t < T; ++t)
            for (int part = 0; part < 3; ++part)
              for (int i = 0; i < hd; ++i) dbase[int64_t(t) * 3 * C + part * C + h * hd + i] = 0;
          for (int t = 0; t < T; ++t) {
            const F* arow = a + int64_t(t) * T;
            const F* dy = dout + (seq * T + t) * C + h * hd;
            const F* q = base + int64_t(t) * 3 * C + h * hd;
            F* dq = dbase + int64_t(t) * 3 * C + h * hd;
            F weighted = 0;  // sum over t2 of att * datt
            for (int t2 = 0; t2 <= t; ++t2) {
              const F* v = base + int64_t(t2) * 3 * C + 2 * C + h * hd;
              F* dv = dbase + int64_t(t2) * 3 * C + 2 * C + h * hd;
              F dot = 0;
              for (int i = 0; i < hd; ++i) {
                dot += dy[i] * v[i];
                dv[i] += arow[t2] * dy[i];
              }
              datt[t2] = dot;
              weighted += arow[t2] * dot;
            }
            for (int t2 = 0; t2 <= t; ++t2) {
              const F dscore = arow[t2] * (datt[t2] - weighted) * scale;
              const F* k = base + int64_t(t2) * 3 * C + C + h * hd;
              F* dk = dbase + int64_t(t2) * 3 * C + C + h * hd;
              for (int i = 0; i < hd; ++i) {
                dq[i] += dscore * k[i];
                dk[i] += dscore * q[i];
              }
            }
          }
        }
  }
}

#define UNIV_INSTANTIATE(F)                                                                \
  template void attention_forward<F>(F*, F*, const F*, int, int, int, int, int); \
  template void attention_backward<F>(F*, const F*, const F*, const F*, int, int, int, int, int);
UNIV_INSTANTIATE(float)
UNIV_INSTANTIATE(double)

}  // namespace univ::cpu
