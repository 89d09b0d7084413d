// Token embedding plus positional encoding, forward and backward (CPU).
#include <cmath>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

template <class F>
void embedding_forward(F* out, const int32_t* tokens, const F* wte, const F* pos, int64_t pos_model_stride, int M,
                       int B, int T, int C, int V) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t) {
        const int64_t row = (int64_t(m) * B + b) * T + t;
        const F* e = wte + (int64_t(m) * V + tokens[row]) * C;
        const F* p = pos + m * pos_model_stride + int64_t(t) * C;
        F* o = out + row * C;
        for (int c = 0; c < C; ++c) o[c] = e[c] + p[c];
      }
}

template <class F>
void embedding_backward(F* dwte, F* dwpe, const F* dout, const int32_t* tokens, int M, int B, int T, int C, int V) {
  // One thread per model, rows in order: the sums over repeated tokens are deterministic.
#pragma omp parallel for schedule(static)
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t) {
        const int64_t row = (int64_t(m) * B + b) * T + t;
        const F* d = dout + row * C;
        F* e = dwte + (int64_t(m) * V + tokens[row]) * C;
        for (int c = 0; c < C; ++c) e[c] += d[c];
        if (dwpe) {
          F* p = dwpe + (int64_t(m) * T + t) * C;
          for (int c = 0; c < C; ++c) p[c] += d[c];
        }
      }
}

template <class F>
void sinusoidal_positions(F* table, int T, int C) {
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < C / 2; ++i) {
      const double angle = t / std::pow(10000.0, 2.0 * i / C);
      table[int64_t(t) * C + 2 * i] = static_cast<F>(std::sin(angle));
      table[int64_t(t) * C + 2 * i + 1] = static_cast<F>(std::cos(angle));
    }
}

#define UNIV_INSTANTIATE(F)                                                                                  \
  template void embedding_forward<F>(F*, const int32_t*, const F*, const F*, int64_t, int, int, int, int, int); \
  template void embedding_backward<F>(F*, F*, const F*, const int32_t*, int, int, int, int, int);              \
  template void sinusoidal_positions<F>(F*, int, int);
UNIV_INSTANTIATE(float)
UNIV_INSTANTIATE(double)

}  // namespace univ::cpu
