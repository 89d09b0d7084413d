// Elementwise MLP activations (ReLU, exact GELU), forward and backward (CPU).
#include <cmath>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

namespace {
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
}  // namespace

template <class F>
void activation_forward(F* out, const F* inp, int64_t n, Activation act) {
  if (act == Activation::relu) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = inp[i] < F(0) ? F(0) : inp[i];  // NaN passes, as in PyTorch
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = F(0.5) * inp[i] * (F(1) + std::erf(inp[i] * F(kInvSqrt2)));
  }
}

template <class F>
void activation_backward(F* dinp, const F* dout, const F* inp, int64_t n, Activation act) {
  if (act == Activation::relu) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) dinp[i] = inp[i] > F(0) ? dout[i] : F(0);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const F x = inp[i];
      const F cdf = F(0.5) * (F(1) + std::erf(x * F(kInvSqrt2)));
      const F pdf = F(kInvSqrt2Pi) * std::exp(F(-0.5) * x * x);
      dinp[i] = dout[i] * (cdf + x * pdf);
    }
  }
}

#define UNIV_INSTANTIATE(F)                                                        \
  template void activation_forward<F>(F*, const F*, int64_t, Activation); \
  template void activation_backward<F>(F*, const F*, const F*, int64_t, Activation);
UNIV_INSTANTIATE(float)
UNIV_INSTANTIATE(double)

}  // namespace univ::cpu
