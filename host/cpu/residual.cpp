// Residual add out = a + b (CPU); its backward is the identity, so none is needed.
#include "univ/cpu/ops.hpp"

namespace univ::cpu {

template <class F>
void residual_forward(F* out, const F* a, const F* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

template void residual_forward<float>(float*, const float*, const float*, int64_t);
template void residual_forward<double>(double*, const double*, const double*, int64_t);

}  // namespace univ::cpu
