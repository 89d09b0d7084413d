// Correlation statistics from float32 activation chunks on the CPU (BLAS products).
#include <algorithm>

#include "cpu/blas.hpp"
#include "univ/stats.hpp"

namespace univ {

CpuStatsAccumulator::CpuStatsAccumulator(std::vector<NeuronShape> shapes)
    : stats_(shapes), chunk_(shapes), shift_(shapes.size()), shifted_(shapes.size()) {}

void CpuStatsAccumulator::add(const std::vector<const float*>& acts, int64_t n) {
  const int K = stats_.models();
  if (n <= 0) return;
  if (static_cast<int>(acts.size()) != K) throw std::invalid_argument("CpuStatsAccumulator::add: one pointer per model");
  // The shift: each neuron's mean over the first chunk, rounded to float so that
  // x - shift is exact for x near it.
  if (stats_.count() == 0 && shift_[0].empty())
    for (int m = 0; m < K; ++m) {
      const int64_t N = stats_.shapes_[m].neurons();
      std::vector<double> sum(N, 0.0);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t k = 0; k < N; ++k) sum[k] += acts[m][t * N + k];
      shift_[m].resize(N);
      for (int64_t k = 0; k < N; ++k) shift_[m][k] = static_cast<float>(sum[k] / static_cast<double>(n));
    }
  // Chunk statistics in float64 from the shifted values: means, then raw products
  // corrected to centered ones (small corrections: the shifted means are small).
  chunk_.count_ = n;
  for (int m = 0; m < K; ++m) {
    const int64_t N = stats_.shapes_[m].neurons();
    shifted_[m].resize(n * N);
    std::vector<double>& y = shifted_[m];
    const float* x = acts[m];
    const float* s = shift_[m].data();
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < N; ++k) y[t * N + k] = double(x[t * N + k]) - double(s[k]);
    std::vector<double>& mean = chunk_.means_[m];
    std::fill(mean.begin(), mean.end(), 0.0);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < N; ++k) mean[k] += y[t * N + k];
    for (int64_t k = 0; k < N; ++k) mean[k] /= static_cast<double>(n);
  }
  const double nn = static_cast<double>(n);
  auto center = [&](std::vector<double>& out, const double* mean_a, const double* mean_b, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] -= nn * mean_a[r] * mean_b[c];
  };
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j) {
      const int64_t Ni = stats_.shapes_[i].neurons(), Nj = stats_.shapes_[j].neurons();
      std::vector<double>& block = chunk_.cross_[stats_.pair_index(i, j)];
      cpu::gemm(true, false, static_cast<int>(Ni), static_cast<int>(Nj), static_cast<int>(n), 1.0, shifted_[i].data(),
                static_cast<int>(Ni), shifted_[j].data(), static_cast<int>(Nj), 0.0, block.data(), static_cast<int>(Nj));
      center(block, chunk_.means_[i].data(), chunk_.means_[j].data(), Ni, Nj);
    }
  for (int m = 0; m < K; ++m) {  // within-layer blocks are symmetric: half the products
    const int64_t N = stats_.shapes_[m].neurons(), D = stats_.shapes_[m].width;
    for (int l = 0; l < stats_.shapes_[m].layers; ++l) {
      std::vector<double>& block = chunk_.within_[m][l];
      cpu::gram(static_cast<int>(D), static_cast<int>(n), 1.0, shifted_[m].data() + l * D, static_cast<int>(N), 0.0,
                block.data(), static_cast<int>(D));
      const double* mean = chunk_.means_[m].data() + l * D;
      center(block, mean, mean, D, D);
    }
  }
  // The chunk's means of x itself, then the pairwise merge into the masters.
  for (int m = 0; m < K; ++m)
    for (size_t k = 0; k < chunk_.means_[m].size(); ++k) chunk_.means_[m][k] += double(shift_[m][k]);
  stats_.merge(chunk_);
}

}  // namespace univ
