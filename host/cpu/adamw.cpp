// AdamW update and the squared norm used for gradient clipping (CPU).
#include <algorithm>
#include <cmath>
#include <vector>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

namespace {
constexpr int64_t kNormChunk = 4096;
}

template <class F>
void adamw_update(F* params, const F* grads, F* exp_avg, F* exp_avg_sq, int64_t n, double grad_scale,
                  const AdamWStep& h) {
  // PyTorch's AdamW: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  const F step_size = static_cast<F>(h.lr / bc1);
  const F inv_sqrt_bc2 = static_cast<F>(1.0 / std::sqrt(bc2));
  const F decay = static_cast<F>(1.0 - h.lr * h.weight_decay);
  const F b1 = static_cast<F>(h.beta1), b2 = static_cast<F>(h.beta2), eps = static_cast<F>(h.eps);
  const F scale = static_cast<F>(grad_scale);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const F g = grads[i] * scale;
    const F m = b1 * exp_avg[i] + (F(1) - b1) * g;
    const F v = b2 * exp_avg_sq[i] + (F(1) - b2) * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    params[i] = params[i] * decay - step_size * m / (std::sqrt(v) * inv_sqrt_bc2 + eps);
  }
}

template <class F>
double sum_squares(const F* x, int64_t n) {
  const int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0;
    for (int64_t i = c * kNormChunk; i < std::min(n, (c + 1) * kNormChunk); ++i) s += double(x[i]) * double(x[i]);
    partial[c] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

#define UNIV_INSTANTIATE(F)                                                                      \
  template void adamw_update<F>(F*, const F*, F*, F*, int64_t, double, const AdamWStep&); \
  template double sum_squares<F>(const F*, int64_t);
UNIV_INSTANTIATE(float)
UNIV_INSTANTIATE(double)

}  // namespace univ::cpu
