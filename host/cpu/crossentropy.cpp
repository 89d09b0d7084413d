// Softmax cross-entropy over the vocabulary, forward and backward fused (CPU):
// the probabilities only ever exist inside dlogits.
#include <algorithm>
#include <cmath>
#include <vector>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

template <class F>
void crossentropy_forward_backward(F* losses, F* dlogits, const F* logits, const int32_t* targets, int M, int N,
                                   int V) {
  std::vector<double> row_loss(int64_t(M) * N);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < int64_t(M) * N; ++row) {
    const F* x = logits + row * V;
    const F max_logit = *std::max_element(x, x + V);
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(x[v] - max_logit));
    const double log_sum = std::log(sum);
    row_loss[row] = log_sum - static_cast<double>(x[targets[row]] - max_logit);
    if (dlogits) {
      F* d = dlogits + row * V;
      const double inv_sum_n = 1.0 / (sum * N);
      for (int v = 0; v < V; ++v) d[v] = static_cast<F>(std::exp(static_cast<double>(x[v] - max_logit)) * inv_sum_n);
      d[targets[row]] -= static_cast<F>(1.0 / N);
    }
  }
  for (int m = 0; m < M; ++m) {  // in row order: deterministic
    double total = 0;
    for (int64_t n = 0; n < N; ++n) total += row_loss[int64_t(m) * N + n];
    losses[m] = static_cast<F>(total / N);
  }
}

template void crossentropy_forward_backward<float>(float*, float*, const float*, const int32_t*, int, int, int);
template void crossentropy_forward_backward<double>(double*, double*, const double*, const int32_t*, int, int, int);

}  // namespace univ::cpu
