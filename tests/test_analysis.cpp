// The analysis: Hungarian assignment, Haar rotations, the algebraic rotation against
// an explicit one, and a planted case with known universal neurons.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "univ/analysis.hpp"
#include "univ/error.hpp"
#include "univ/rotation.hpp"

namespace univ {
namespace {

TEST(Assignment, MatchesBruteForce) {
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int trial = 0; trial < 200; ++trial) {
    const int rows = 1 + trial % 5, cols = rows + trial % 3;
    std::vector<double> cost(rows * cols);
    for (double& c : cost) c = u(rng);
    const std::vector<int> got = min_cost_assignment(cost, rows, cols);
    std::set<int> used(got.begin(), got.end());
    ASSERT_EQ(static_cast<int>(used.size()), rows);
    double got_total = 0;
    for (int r = 0; r < rows; ++r) got_total += cost[r * cols + got[r]];
    // Brute force over injections rows -> cols.
    std::vector<int> perm(cols);
    std::iota(perm.begin(), perm.end(), 0);
    double best = 1e300;
    do {
      double t = 0;
      for (int r = 0; r < rows; ++r) t += cost[r * cols + perm[r]];
      best = std::min(best, t);
    } while (std::next_permutation(perm.begin(), perm.end()));
    ASSERT_NEAR(got_total, best, 1e-12);
  }
}

TEST(Rotation, HouseholderQrFactorsTheMatrix) {
  std::mt19937_64 rng(2);
  std::normal_distribution<double> normal;
  const int n = 9;
  std::vector<double> a(n * n);
  for (double& x : a) x = normal(rng);
  const std::vector<double> original = a;
  const std::vector<double> q = householder_qr(a, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      if (i > j) {
        EXPECT_EQ(a[i * n + j], 0.0);  // R is upper triangular
      }
      double qr = 0;
      for (int k = 0; k < n; ++k) qr += q[i * n + k] * a[k * n + j];
      EXPECT_NEAR(qr, original[i * n + j], 1e-13);
    }
}

TEST(Rotation, HaarMatricesAreOrthogonal) {
  for (int n : {1, 2, 7, 64, 130}) {
    PhiloxStream rng(3, n);
    const std::vector<double> q = haar_orthogonal(n, rng);
    double worst = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        double dot = 0;
        for (int k = 0; k < n; ++k) dot += q[k * n + i] * q[k * n + j];
        worst = std::max(worst, std::abs(dot - (i == j)));
      }
    EXPECT_LT(worst, 1e-12) << n;
  }
}

TEST(Rotation, TracesFollowTheHaarDistribution) {
  // For Haar O(n), n >= 2: E[tr Q] = 0 and E[(tr Q)^2] = 1. QR without the sign fix
  // (Q from Householder alone) is far from it.
  const int n = 6, draws = 4000;
  double sum = 0, sum_sq = 0, unfixed = 0;
  PhiloxStream rng(4, 0);
  for (int d = 0; d < draws; ++d) {
    std::vector<double> g(n * n);
    for (double& x : g) x = rng.next_normal();
    std::vector<double> copy = g;
    const std::vector<double> raw = householder_qr(copy, n);
    PhiloxStream again(4, 1000 + d);
    const std::vector<double> q = haar_orthogonal(n, again);
    double tr = 0, tr_raw = 0;
    for (int i = 0; i < n; ++i) tr += q[i * n + i], tr_raw += raw[i * n + i];
    sum += tr;
    sum_sq += tr * tr;
    unfixed += tr_raw;
  }
  EXPECT_NEAR(sum / draws, 0.0, 0.08);
  EXPECT_NEAR(sum_sq / draws, 1.0, 0.1);
  EXPECT_GT(std::abs(unfixed / draws), 0.5);
}

// Activations of two models, token-major float32, and their statistics.
struct TwoModels {
  std::vector<NeuronShape> shapes;
  std::vector<std::vector<float>> acts;
  CorrelationStats stats;
};

CorrelationStats stats_of(const std::vector<NeuronShape>& shapes, const std::vector<std::vector<float>>& acts,
                          int64_t n) {
  CpuStatsAccumulator acc(shapes);
  for (int64_t t = 0; t < n; t += 1000) {
    std::vector<const float*> ptrs;
    for (size_t m = 0; m < shapes.size(); ++m) ptrs.push_back(acts[m].data() + t * shapes[m].neurons());
    acc.add(ptrs, std::min<int64_t>(1000, n - t));
  }
  return acc.stats();
}

double pearson(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  const double mx = std::accumulate(x.begin(), x.end(), 0.0) / n, my = std::accumulate(y.begin(), y.end(), 0.0) / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t t = 0; t < x.size(); ++t)
    sxy += (x[t] - mx) * (y[t] - my), sxx += (x[t] - mx) * (x[t] - mx), syy += (y[t] - my) * (y[t] - my);
  return sxy / std::sqrt(sxx * syy);
}

TEST(Rotation, AlgebraicRotationEqualsRotatingTheActivations) {
  const std::vector<NeuronShape> shapes{{2, 6}, {2, 5}};
  const int64_t n = 3000;
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  std::vector<std::vector<float>> acts(2);
  for (int m = 0; m < 2; ++m) acts[m].resize(n * shapes[m].neurons());
  for (int64_t t = 0; t < n; ++t) {
    const double shared = normal(rng);
    for (int m = 0; m < 2; ++m)
      for (int64_t k = 0; k < shapes[m].neurons(); ++k)
        acts[m][t * shapes[m].neurons() + k] = static_cast<float>(3.0 + 0.3 * k + shared * (k % 3) + normal(rng));
  }
  const CorrelationStats stats = stats_of(shapes, acts, n);
  const auto q = rotation_matrices(shapes[1], 1, 0, 99);
  const std::vector<double> algebraic = correlation_matrix(stats, 0, 1, q);
  // Explicitly: b' = Q_l b per layer and token, then Pearson against a.
  const int D = shapes[1].width;
  for (int l = 0; l < 2; ++l)
    for (int k = 0; k < D; ++k) {
      std::vector<double> rotated(n);
      for (int64_t t = 0; t < n; ++t)
        for (int c = 0; c < D; ++c) rotated[t] += q[l][k * D + c] * acts[1][t * 10 + l * D + c];
      for (int64_t a = 0; a < 12; ++a) {
        std::vector<double> x(n);
        for (int64_t t = 0; t < n; ++t) x[t] = acts[0][t * 12 + a];
        EXPECT_NEAR(algebraic[a * 10 + l * D + k], pearson(x, rotated), 1e-9);
      }
    }
  // And the transposed direction (model 1's neurons against rotated model 0) uses cross^T.
  const auto q0 = rotation_matrices(shapes[0], 0, 3, 99);
  const std::vector<double> back = correlation_matrix(stats, 1, 0, q0);
  std::vector<double> x(n), rotated(n);
  for (int64_t t = 0; t < n; ++t) {
    x[t] = acts[1][t * 10 + 7];
    for (int c = 0; c < 6; ++c) rotated[t] += q0[1][2 * 6 + c] * acts[0][t * 12 + 6 + c];
  }
  EXPECT_NEAR(back[7 * 12 + 6 + 2], pearson(x, rotated), 1e-9);
}

TEST(Rotation, BaselinesFromLayerBlocksEqualMatchingTheWholeRotatedMatrix) {
  // The baseline is computed layer by layer of the rotated model (within layers only
  // the layer's own rows, for index matching only the diagonal; max across layers as
  // the max of the layers' maxima), each model's rotations drawn once for all its
  // partners; here against matching the whole rotated correlation matrix, for every
  // ordered pair of three models.
  const std::vector<NeuronShape> shapes{{3, 7}, {3, 7}, {3, 7}};
  const int64_t n = 2000;
  std::mt19937_64 rng(17);
  std::normal_distribution<double> normal;
  std::vector<std::vector<float>> acts(3, std::vector<float>(n * 21));
  for (int64_t t = 0; t < n; ++t) {
    const double shared = normal(rng);
    for (int m = 0; m < 3; ++m)
      for (int k = 0; k < 21; ++k)
        acts[m][t * 21 + k] = static_cast<float>(1.0 + 0.2 * k + shared * ((k + m) % 4) + normal(rng));
  }
  const CorrelationStats stats = stats_of(shapes, acts, n);
  const std::pair<MatchMode, MatchScope> cases[] = {{MatchMode::index, MatchScope::layer},
                                                    {MatchMode::max, MatchScope::layer},
                                                    {MatchMode::one_to_one, MatchScope::layer},
                                                    {MatchMode::max, MatchScope::all}};
  for (const auto& [mode, scope] : cases) {
    SCOPED_TRACE(to_string(mode) + "/" + to_string(scope));
    AnalysisOptions o;
    o.match = mode;
    o.scope = scope;
    o.baseline_draws = 3;
    o.null_draws = 0;
    o.seed = 4;
    const Analysis a = analyze(stats, o);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        if (j == i) continue;
        const int partner = j < i ? j : j - 1;  // partners in model order
        std::vector<double> expected(21, 0.0);
        for (int d = 0; d < o.baseline_draws; ++d) {
          const std::vector<double> r = correlation_matrix(stats, i, j, rotation_matrices(shapes[j], j, d, o.seed));
          if (scope == MatchScope::all) {
            for (int k = 0; k < 21; ++k)
              expected[k] += *std::max_element(r.begin() + k * 21, r.begin() + k * 21 + 21) / o.baseline_draws;
            continue;
          }
          for (int l = 0; l < 3; ++l) {
            std::vector<double> block(49);
            for (int k = 0; k < 7; ++k)
              for (int c = 0; c < 7; ++c) block[k * 7 + c] = r[(l * 7 + k) * 21 + l * 7 + c];
            std::vector<int> column(7);
            if (mode == MatchMode::index) std::iota(column.begin(), column.end(), 0);
            else if (mode == MatchMode::max)
              for (int k = 0; k < 7; ++k)
                column[k] = static_cast<int>(std::max_element(block.begin() + k * 7, block.begin() + k * 7 + 7) -
                                             (block.begin() + k * 7));
            else {
              std::vector<double> cost(49);
              for (int e = 0; e < 49; ++e) cost[e] = -block[e];
              column = min_cost_assignment(cost, 7, 7);
            }
            for (int k = 0; k < 7; ++k) expected[l * 7 + k] += block[k * 7 + column[k]] / o.baseline_draws;
          }
        }
        for (int k = 0; k < 21; ++k) {
          ASSERT_EQ(a.neurons[i * 21 + k].partners[partner].partner, j);
          EXPECT_NEAR(a.neurons[i * 21 + k].partners[partner].baseline, expected[k], 1e-12)
              << "model " << i << " partner " << j << " neuron " << k;
        }
      }
  }
}

// Model b copies 8 neurons of each layer of model a, with a little noise, to other
// positions of the same layer; everything else is independent noise of the same scale.
struct Planted {
  std::vector<NeuronShape> shapes{{2, 64}, {2, 64}};
  CorrelationStats stats;
  std::set<int> sources, destinations;  // neuron indices in a and in b
};

Planted planted_case() {
  Planted p;
  const int64_t n = 4000, N = 128;
  std::mt19937_64 rng(6);
  std::normal_distribution<double> normal;
  std::vector<std::vector<float>> acts(2, std::vector<float>(n * N));
  std::vector<int> src_of(N, -1);
  for (int l = 0; l < 2; ++l) {
    std::vector<int> idx(64);
    std::iota(idx.begin(), idx.end(), l * 64);
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int i = 0; i < 8; ++i) {
      const int src = idx[i], dst = idx[(i + 1) % 8];  // never its own index
      src_of[dst] = src;
      p.sources.insert(src);
      p.destinations.insert(dst);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int k = 0; k < N; ++k) acts[0][t * N + k] = static_cast<float>(5.0 + normal(rng));
    for (int k = 0; k < N; ++k)
      acts[1][t * N + k] = static_cast<float>(src_of[k] >= 0 ? acts[0][t * N + src_of[k]] + 0.1 * normal(rng)
                                                              : normal(rng));
  }
  p.stats = stats_of(p.shapes, acts, n);
  return p;
}

std::set<int> universal_of(const Analysis& a, int model) {
  std::set<int> out;
  for (const auto& nr : a.neurons)
    if (nr.model == model && nr.universal) out.insert(nr.layer * 64 + nr.neuron);
  return out;
}

TEST(Analysis, PlantedCopiesAreFoundByMaxAndOneToOneButNotByIndex) {
  const Planted p = planted_case();
  for (MatchMode mode : {MatchMode::max, MatchMode::one_to_one}) {
    for (MatchScope scope : {MatchScope::layer, MatchScope::all}) {
      if (mode == MatchMode::one_to_one && scope == MatchScope::all) continue;  // covered by layer, slower
      AnalysisOptions o;
      o.match = mode;
      o.scope = scope;
      o.null_draws = 4;
      const Analysis a = analyze(p.stats, o);
      SCOPED_TRACE(to_string(mode) + "/" + to_string(scope));
      EXPECT_EQ(universal_of(a, 0), p.sources);
      EXPECT_EQ(universal_of(a, 1), p.destinations);
      EXPECT_EQ(a.universal, 32);
      EXPECT_TRUE(a.exceeds_chance) << a.verdict;
      EXPECT_FALSE(a.permutation_null.applies());
      EXPECT_LT(a.rotation_null.mean(), 1.0);
      for (const auto& nr : a.neurons)
        if (nr.universal && nr.model == 1) {  // the matched partner is the planted source
          const int matched = nr.partners[0].layer * 64 + nr.partners[0].index;
          EXPECT_TRUE(p.sources.contains(matched));
          EXPECT_GT(nr.partners[0].r, 0.99);
        }
    }
  }
  AnalysisOptions o;
  const Analysis index = analyze(p.stats, o);
  EXPECT_EQ(index.universal, 0);
  EXPECT_TRUE(index.permutation_null.applies());
  EXPECT_EQ(index.permutation_null.counts.size(), 8u);
  EXPECT_FALSE(index.exceeds_chance);
  EXPECT_NE(index.verdict.find("does not exceed"), std::string::npos) << index.verdict;
}

TEST(Analysis, SingleCorrelationsEqualTheMatrixEntries) {
  // Models of unequal widths, both orders of each pair, a constant neuron (r 0).
  const std::vector<NeuronShape> shapes{{2, 6}, {1, 9}, {3, 4}};
  const int64_t n = 700;
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal;
  std::vector<std::vector<float>> acts(3);
  for (int m = 0; m < 3; ++m) {
    const int64_t N = shapes[m].neurons();
    acts[m].resize(n * N);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < N; ++k)
        acts[m][t * N + k] = static_cast<float>(k == 2 && m == 1 ? 1.5 : 2.0 + normal(rng));
  }
  const CorrelationStats stats = stats_of(shapes, acts, n);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      if (i == j) continue;
      const int64_t Ni = shapes[i].neurons(), Nj = shapes[j].neurons();
      const std::vector<double> r = correlation_matrix(stats, i, j);
      const PairCorrelations single(stats, i, j);
      for (int64_t a = 0; a < Ni; ++a)
        for (int64_t b = 0; b < Nj; ++b) ASSERT_EQ(single(a, b), r[a * Nj + b]) << i << ", " << j;
    }
}

TEST(Analysis, MatchedCorrelationsAreThoseOfTheWholeMatrix) {
  // Index matching reads single correlations, the other modes the whole matrix: each
  // matched r is the matrix's entry at its partner, to the bit, in both partner orders.
  const Planted p = planted_case();
  for (MatchMode mode : {MatchMode::index, MatchMode::max}) {
    AnalysisOptions o;
    o.match = mode;
    o.baseline_draws = 1;
    o.null_draws = 0;
    const Analysis a = analyze(p.stats, o);
    for (int i = 0; i < 2; ++i) {
      const int j = 1 - i;
      const std::vector<double> r = correlation_matrix(p.stats, i, j);
      for (const auto& nr : a.neurons) {
        if (nr.model != i) continue;
        const PartnerMatch& m = nr.partners[0];
        const int64_t row = nr.layer * 64 + nr.neuron, col = m.layer * 64 + m.index;
        if (mode == MatchMode::index) {
          EXPECT_EQ(col, row);
        }
        ASSERT_EQ(m.r, r[row * 128 + col]) << to_string(mode) << " model " << i << " neuron " << row;
      }
    }
  }
}

TEST(Analysis, IndexMatchingOfIdenticalModelsIsUniversalAndBeatsChance) {
  // Two copies of one model (same init, same data): every neuron matches itself.
  const std::vector<NeuronShape> shapes{{1, 32}, {1, 32}};
  const int64_t n = 2000;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::vector<std::vector<float>> acts(2, std::vector<float>(n * 32));
  for (int64_t i = 0; i < n * 32; ++i) acts[0][i] = acts[1][i] = static_cast<float>(normal(rng));
  const Analysis a = analyze(stats_of(shapes, acts, n), AnalysisOptions{});
  EXPECT_EQ(a.universal, 64);
  EXPECT_TRUE(a.exceeds_chance);
  // A random permutation of 32 partners fixes about one neuron: about 2 of 64 flagged.
  EXPECT_LT(a.permutation_null.mean(), 6.0);
  for (const auto& nr : a.neurons) EXPECT_NEAR(nr.partners[0].r, 1.0, 1e-9);
}

TEST(Analysis, ProgressFollowsEveryRotationDraw) {
  const std::vector<NeuronShape> shapes{{1, 8}, {1, 8}, {1, 8}};
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal;
  std::vector<std::vector<float>> acts(3, std::vector<float>(300 * 8));
  for (auto& a : acts)
    for (float& x : a) x = static_cast<float>(normal(rng));
  AnalysisOptions o;
  o.baseline_draws = 3;
  o.null_draws = 2;
  std::vector<int> seen;
  analyze(stats_of(shapes, acts, 300), o, [&](int done, int total) {
    EXPECT_EQ(total, 3 * 2 * 5);  // ordered model pairs times draws
    seen.push_back(done);
  });
  std::vector<int> expected(30);
  std::iota(expected.begin(), expected.end(), 1);
  EXPECT_EQ(seen, expected);
}

TEST(Analysis, ModesThatDoNotFitTheModelsAreRefused) {
  const std::vector<NeuronShape> shapes{{2, 8}, {2, 6}};
  std::vector<std::vector<float>> acts{std::vector<float>(100 * 16), std::vector<float>(100 * 12)};
  std::mt19937_64 rng(8);
  std::normal_distribution<float> normal;
  for (auto& a : acts)
    for (float& x : a) x = normal(rng);
  const CorrelationStats stats = stats_of(shapes, acts, 100);
  AnalysisOptions o;
  EXPECT_THROW(analyze(stats, o), UserError);  // index needs equal widths
  o.match = MatchMode::one_to_one;
  EXPECT_THROW(analyze(stats, o), UserError);
  o.match = MatchMode::max;
  EXPECT_NO_THROW(analyze(stats, o));
  o.threshold = 1.5;
  EXPECT_THROW(analyze(stats, o), UserError);
  o.threshold = 0;
  EXPECT_THROW(analyze(stats, o), UserError);
}

TEST(Analysis, DeadNeuronsAreNeverUniversal) {
  const std::vector<NeuronShape> shapes{{1, 4}, {1, 4}};
  std::vector<std::vector<float>> acts(2, std::vector<float>(500 * 4));
  std::mt19937_64 rng(9);
  std::normal_distribution<float> normal;
  for (int64_t t = 0; t < 500; ++t)
    for (int k = 0; k < 4; ++k) acts[0][t * 4 + k] = acts[1][t * 4 + k] = k == 2 ? 0.0f : normal(rng);
  const Analysis a = analyze(stats_of(shapes, acts, 500), AnalysisOptions{});
  for (const auto& nr : a.neurons) {
    EXPECT_EQ(nr.dead, nr.neuron == 2);
    if (nr.dead) {
      EXPECT_FALSE(nr.universal);
    }
  }
  EXPECT_EQ(a.layers[0].dead, 1);
}

}  // namespace
}  // namespace univ
