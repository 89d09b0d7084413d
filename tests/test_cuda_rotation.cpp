// The rotation baseline on the GPU against the host's: the same Haar matrices (cuRAND's
// Philox words are PhiloxStream's) to float64 rounding, the same analysis in every
// match mode, and rotations prepared ahead changing nothing. Skipped without a GPU;
// also run on the host emulator (emulated.gpu_tests).
#include <gtest/gtest.h>

#include <cmath>

#include "stats_reference.hpp"
#include "univ/analysis.hpp"
#include "univ/backend.hpp"

namespace univ {
namespace {

class GpuRotation : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
  }
};

// rotation_matrices_cuda against the host's rotation_matrices for two draws.
void expect_host_draws(int width) {
  SCOPED_TRACE("width " + std::to_string(width));
  const NeuronShape shape{width > 1000 ? 1 : 2, width};
  const int first = 3, draws = 2, model = 1;
  const uint64_t seed = 11;
  const auto gpu = rotation_matrices_cuda(shape, model, first, draws, seed);
  ASSERT_EQ(gpu.size(), size_t(draws));
  for (int d = 0; d < draws; ++d) {
    const auto host = rotation_matrices(shape, model, first + d, seed);
    for (int l = 0; l < shape.layers; ++l) {
      SCOPED_TRACE("draw " + std::to_string(d) + " layer " + std::to_string(l));
      const std::vector<double>& q = gpu[d][l];
      ASSERT_EQ(q.size(), size_t(width) * width);
      double worst = 0, worst_orthogonality = 0;
      for (size_t e = 0; e < q.size(); ++e) {
        ASSERT_TRUE(std::isfinite(q[e]));
        worst = std::max(worst, std::abs(q[e] - host[l][e]));
      }
      for (int a = 0; a < std::min(width, 64); ++a)  // (Q^T Q)_ab for the first columns
        for (int b = 0; b < width; ++b) {
          double dot = 0;
          for (int k = 0; k < width; ++k) dot += q[size_t(k) * width + a] * q[size_t(k) * width + b];
          worst_orthogonality = std::max(worst_orthogonality, std::abs(dot - (a == b)));
        }
      // Both are the Q of the Gaussian's QR with positive diag R: they differ by the
      // rounding of two Householder QRs (and a few ulps of log and cos), which grows
      // with the width.
      EXPECT_LT(worst, 1e-11 + 5e-13 * width);
      EXPECT_LT(worst_orthogonality, 1e-12 * std::max(1.0, width / 256.0));
    }
  }
}

TEST_F(GpuRotation, SmallHaarMatricesEqualTheHostDraws) {
  // Widths 1 and 2 (edge cases of the reflectors) and odd ones; small enough for racecheck.
  for (int width : {1, 2, 37, 70}) expect_host_draws(width);
}

TEST_F(GpuRotation, HaarMatricesEqualTheHostDraws) {
  expect_host_draws(256);   // the seed's width: a QR per thread block
  expect_host_draws(2100);  // wider than 1536: cuSOLVER's QR
}

// Three models whose neurons share latent factors; one neuron of model 1 is dead.
CorrelationStats three_models(const std::vector<NeuronShape>& shapes) {
  const int64_t n = 3000;
  auto acts = testing::correlated_acts(shapes, n, 5.0, 21);
  for (int64_t t = 0; t < n; ++t) acts[1][t * shapes[1].neurons() + 5] = 2.5f;
  CpuStatsAccumulator acc(shapes);
  std::vector<const float*> ptrs;
  for (const auto& a : acts) ptrs.push_back(a.data());
  acc.add(ptrs, n);
  return acc.stats();
}

void expect_same_analysis(const Analysis& gpu, const Analysis& cpu) {
  ASSERT_EQ(gpu.neurons.size(), cpu.neurons.size());
  double worst = 0;
  for (size_t n = 0; n < cpu.neurons.size(); ++n) {
    const NeuronResult &g = gpu.neurons[n], &c = cpu.neurons[n];
    ASSERT_EQ(g.partners.size(), c.partners.size());
    EXPECT_EQ(g.dead, c.dead);
    EXPECT_EQ(g.universal, c.universal) << "neuron " << n;
    for (size_t p = 0; p < c.partners.size(); ++p) {
      ASSERT_TRUE(std::isfinite(g.partners[p].baseline));
      worst = std::max(worst, std::abs(g.partners[p].baseline - c.partners[p].baseline));
    }
  }
  EXPECT_LT(worst, 1e-10);
  ASSERT_EQ(gpu.layers.size(), cpu.layers.size());
  for (size_t l = 0; l < cpu.layers.size(); ++l) {
    EXPECT_EQ(gpu.layers[l].rotation_null.counts, cpu.layers[l].rotation_null.counts) << "layer " << l;
    EXPECT_EQ(gpu.layers[l].permutation_null.counts, cpu.layers[l].permutation_null.counts) << "layer " << l;
  }
  EXPECT_EQ(gpu.verdict, cpu.verdict);
}

TEST_F(GpuRotation, AnalysisEqualsTheHostsInEveryMode) {
  const CorrelationStats equal = three_models({{2, 37}, {2, 37}, {2, 37}});
  struct Case {
    MatchMode match;
    MatchScope scope;
  };
  // Within layers the GPU forms layer blocks, across layers whole matrices.
  for (const Case& c : {Case{MatchMode::index, MatchScope::layer}, Case{MatchMode::max, MatchScope::layer},
                        Case{MatchMode::max, MatchScope::all}, Case{MatchMode::one_to_one, MatchScope::layer},
                        Case{MatchMode::one_to_one, MatchScope::all}}) {
    SCOPED_TRACE(to_string(c.match) + "/" + to_string(c.scope));
    AnalysisOptions o;
    o.match = c.match;
    o.scope = c.scope;
    o.baseline_draws = 3;
    o.null_draws = 4;
    o.seed = 5;
    const Analysis cpu = analyze(equal, o);
    o.device = Device::cuda;
    expect_same_analysis(analyze(equal, o), cpu);
  }
  // Max matching between models of other widths and layer counts.
  for (MatchScope scope : {MatchScope::layer, MatchScope::all}) {
    const CorrelationStats unequal = three_models({{2, 37}, {2, 20}, scope == MatchScope::all ? NeuronShape{3, 9}
                                                                                                : NeuronShape{2, 9}});
    SCOPED_TRACE("max/" + to_string(scope) + " of unequal widths");
    AnalysisOptions o;
    o.match = MatchMode::max;
    o.scope = scope;
    const Analysis cpu = analyze(unequal, o);
    o.device = Device::cuda;
    expect_same_analysis(analyze(unequal, o), cpu);
  }
}

TEST_F(GpuRotation, PreparedRotationsGiveTheSameAnalysis) {
  // Models of two widths (two launches); rotations prepared for another seed are not used.
  const std::vector<NeuronShape> shapes{{2, 37}, {2, 20}, {3, 20}};
  const CorrelationStats stats = three_models(shapes);
  AnalysisOptions o;
  o.match = MatchMode::max;
  o.scope = MatchScope::all;
  o.device = Device::cuda;
  o.baseline_draws = 3;
  o.null_draws = 2;
  const Analysis drawn_here = analyze(stats, o);
  const PreparedRotations prepared(shapes, o);
  ASSERT_NE(prepared.device(), nullptr);
  AnalysisOptions other_seed = o;
  other_seed.seed += 1;
  const PreparedRotations unused(shapes, other_seed);
  for (const PreparedRotations* p : {&prepared, &unused}) {
    const Analysis a = analyze(stats, o, {}, p);
    ASSERT_EQ(a.neurons.size(), drawn_here.neurons.size());
    for (size_t n = 0; n < a.neurons.size(); ++n)
      for (size_t k = 0; k < a.neurons[n].partners.size(); ++k)
        ASSERT_EQ(a.neurons[n].partners[k].baseline, drawn_here.neurons[n].partners[k].baseline) << n;
    EXPECT_EQ(a.verdict, drawn_here.verdict);
  }
}

}  // namespace
}  // namespace univ
