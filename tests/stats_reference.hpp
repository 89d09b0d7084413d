// Test data and float64 references for correlation statistics, shared by the CPU
// and GPU accumulator tests.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "univ/stats.hpp"

namespace univ::testing {

// Activations of K models with shared latent factors, float32, token-major [n, N_m];
// every neuron's mean is `offset` times its standard deviation.
inline std::vector<std::vector<float>> correlated_acts(const std::vector<NeuronShape>& shapes, int64_t n, double offset,
                                                uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  const int factors = 4;
  std::vector<std::vector<double>> loading;
  for (const auto& s : shapes) {
    loading.emplace_back(s.neurons() * factors);
    for (double& x : loading.back()) x = normal(rng);
  }
  std::vector<std::vector<float>> acts(shapes.size());
  for (size_t m = 0; m < shapes.size(); ++m) acts[m].resize(n * shapes[m].neurons());
  std::vector<double> z(factors);
  for (int64_t t = 0; t < n; ++t) {
    for (double& f : z) f = normal(rng);
    for (size_t m = 0; m < shapes.size(); ++m) {
      const int64_t N = shapes[m].neurons();
      for (int64_t k = 0; k < N; ++k) {
        double v = normal(rng);
        for (int f = 0; f < factors; ++f) v += loading[m][k * factors + f] * z[f];
        const double scale = 0.5 + 0.1 * k;  // std about sqrt(1 + |loading|^2) * scale
        acts[m][t * N + k] = static_cast<float>(offset * scale * 3 + scale * v);
      }
    }
  }
  return acts;
}

// Two-pass float64 correlations of neuron a of model i with neuron b of model j.
inline double reference_r(const std::vector<float>& x, int64_t Nx, int64_t a, const std::vector<float>& y, int64_t Ny,
                   int64_t b, int64_t n) {
  long double mx = 0, my = 0;
  for (int64_t t = 0; t < n; ++t) mx += x[t * Nx + a], my += y[t * Ny + b];
  mx /= n;
  my /= n;
  long double sxy = 0, sxx = 0, syy = 0;
  for (int64_t t = 0; t < n; ++t) {
    const long double dx = x[t * Nx + a] - mx, dy = y[t * Ny + b] - my;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  return static_cast<double>(sxy / std::sqrt(sxx * syy));
}

// r of neuron a of model i with neuron b of model j from the statistics.
inline double stat_r(const CorrelationStats& s, int i, int64_t a, int j, int64_t b) {
  const auto vi = s.variance_sums(i), vj = s.variance_sums(j);
  const double c = i < j ? s.cross(i, j)[a * s.shapes()[j].neurons() + b] : s.cross(j, i)[b * s.shapes()[i].neurons() + a];
  return c / std::sqrt(vi[a] * vj[b]);
}

// The largest |r - r_float64| over every element of every cross block of s (an
// unwritten one would be off by far more), from statistics of acts' first n tokens;
// infinite where s counts other than n tokens or an r is not finite.
inline double worst_cross_error(const std::vector<std::vector<float>>& acts, const std::vector<NeuronShape>& shapes,
                                const CorrelationStats& s, int64_t n) {
  if (s.count() != n) return INFINITY;
  double worst = 0;
  const int K = static_cast<int>(shapes.size());
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j)
      for (int64_t a = 0; a < shapes[i].neurons(); ++a)
        for (int64_t b = 0; b < shapes[j].neurons(); ++b) {
          const double ref = reference_r(acts[i], shapes[i].neurons(), a, acts[j], shapes[j].neurons(), b, n);
          const double r = stat_r(s, i, a, j, b);
          if (!std::isfinite(r)) return INFINITY;
          worst = std::max(worst, std::abs(r - ref));
        }
  return worst;
}

// The largest |r - r_float64| over the within-layer block of model m's layer l (acts
// its activations), infinite where the block is not exactly symmetric.
inline double worst_within_error(const std::vector<float>& acts, const NeuronShape& shape, const CorrelationStats& s,
                                 int m, int l, int64_t n) {
  const int D = shape.width;
  const auto& w = s.within(m, l);
  double worst = 0;
  for (int a = 0; a < D; ++a)
    for (int b = 0; b < D; ++b) {
      if (w[a * D + b] != w[b * D + a]) return INFINITY;
      const double r = w[a * D + b] / std::sqrt(w[a * (D + 1)] * w[b * (D + 1)]);
      worst = std::max(worst, std::abs(r - reference_r(acts, shape.neurons(), int64_t(l) * D + a, acts,
                                                        shape.neurons(), int64_t(l) * D + b, n)));
    }
  return worst;
}

// The largest relative error of the means against long-double means of acts' first n tokens.
inline double worst_mean_error(const std::vector<std::vector<float>>& acts, const std::vector<NeuronShape>& shapes,
                               const CorrelationStats& s, int64_t n) {
  double worst = 0;
  for (size_t m = 0; m < shapes.size(); ++m)
    for (int64_t k = 0; k < shapes[m].neurons(); ++k) {
      long double mean = 0;
      for (int64_t t = 0; t < n; ++t) mean += acts[m][t * shapes[m].neurons() + k];
      mean /= n;
      worst = std::max(worst, std::abs(s.mean(static_cast<int>(m))[k] - double(mean)) / std::abs(double(mean)));
    }
  return worst;
}

}  // namespace univ::testing
