// Correlation statistics: accuracy against a float64 two-pass reference when means
// dwarf deviations, shards merging into one pass, files.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "stats_reference.hpp"
#include "test_util.hpp"
#include "univ/error.hpp"
#include "univ/stats.hpp"

namespace univ {
namespace {

using testing::correlated_acts;
using testing::reference_r;
using testing::stat_r;
using testing::TempDir;

void accumulate(CpuStatsAccumulator& acc, const std::vector<std::vector<float>>& acts,
                const std::vector<NeuronShape>& shapes, int64_t begin, int64_t end, int64_t chunk) {
  for (int64_t t = begin; t < end; t += chunk) {
    const int64_t n = std::min(chunk, end - t);
    std::vector<const float*> ptrs;
    for (size_t m = 0; m < shapes.size(); ++m) ptrs.push_back(acts[m].data() + t * shapes[m].neurons());
    acc.add(ptrs, n);
  }
}

TEST(Stats, MatchTwoPassFloat64WhenMeansAreAThousandDeviations) {
  const std::vector<NeuronShape> shapes{{2, 5}, {2, 5}, {1, 7}};
  const int64_t n = 20000;
  const auto acts = correlated_acts(shapes, n, 1e3, 1);
  CpuStatsAccumulator acc(shapes);
  accumulate(acc, acts, shapes, 0, n, 1500);  // the last chunk is partial
  const CorrelationStats& s = acc.stats();
  EXPECT_EQ(s.count(), n);
  double worst = 0;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      if (i == j) continue;
      for (int64_t a = 0; a < shapes[i].neurons(); ++a)
        for (int64_t b = 0; b < shapes[j].neurons(); ++b) {
          const double ref = reference_r(acts[i], shapes[i].neurons(), a, acts[j], shapes[j].neurons(), b, n);
          worst = std::max(worst, std::abs(stat_r(s, i, a, j, b) - ref));
        }
    }
  EXPECT_LT(worst, 1e-6);
  // Within-layer blocks too (they feed the rotation baseline).
  for (int64_t a = 0; a < 5; ++a)
    for (int64_t b = 0; b < 5; ++b) {
      const auto& w = s.within(1, 1);
      const double r = w[a * 5 + b] / std::sqrt(w[a * 6] * w[b * 6]);
      EXPECT_NEAR(r, reference_r(acts[1], 10, 5 + a, acts[1], 10, 5 + b, n), 1e-6);
    }
  // The textbook one-pass formula (sum xy - sum x sum y / n) in float32, as streaming
  // code in a framework's default precision computes it, is useless on the same data.
  float sx = 0, sy = 0, sxy = 0, sxx = 0, syy = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float x = acts[0][t * 10], y = acts[1][t * 10];
    sx += x, sy += y, sxy += x * y, sxx += x * x, syy += y * y;
  }
  const float fn = static_cast<float>(n);
  const double naive = (sxy - sx * sy / fn) / std::sqrt((sxx - sx * sx / fn) * (syy - sy * sy / fn));
  EXPECT_FALSE(std::abs(naive - reference_r(acts[0], 10, 0, acts[1], 10, 0, n)) < 1e-2) << naive;
}

TEST(Stats, ShardsMergeIntoOnePass) {
  const std::vector<NeuronShape> shapes{{2, 4}, {2, 4}};
  const int64_t n = 9000;
  const auto acts = correlated_acts(shapes, n, 50.0, 2);
  CpuStatsAccumulator whole(shapes), first(shapes), second(shapes), third(shapes);
  accumulate(whole, acts, shapes, 0, n, 1000);
  accumulate(first, acts, shapes, 0, 2500, 700);
  accumulate(second, acts, shapes, 2500, 6100, 1000);
  accumulate(third, acts, shapes, 6100, n, 333);
  CorrelationStats merged = first.stats();
  merged.merge(second.stats());
  merged.merge(third.stats());
  const CorrelationStats& w = whole.stats();
  EXPECT_EQ(merged.count(), w.count());
  auto rel = [](const std::vector<double>& a, const std::vector<double>& b) {
    double d = 0, r = 0;
    for (size_t k = 0; k < a.size(); ++k) d += (a[k] - b[k]) * (a[k] - b[k]), r += b[k] * b[k];
    return std::sqrt(d / r);
  };
  for (int m = 0; m < 2; ++m) {
    EXPECT_LT(rel(merged.mean(m), w.mean(m)), 1e-12);
    for (int l = 0; l < 2; ++l) EXPECT_LT(rel(merged.within(m, l), w.within(m, l)), 1e-12);
  }
  EXPECT_LT(rel(merged.cross(0, 1), w.cross(0, 1)), 1e-12);
  // Merging the empty set changes nothing; different models are refused.
  CorrelationStats copy = merged;
  copy.merge(CorrelationStats(shapes));
  EXPECT_EQ(copy, merged);
  EXPECT_THROW(copy.merge(CorrelationStats({{2, 4}, {1, 4}})), UserError);
}

TEST(Stats, CrossRowsTransposeTheStoredBlock) {
  // Widths that are not multiples of the transpose's tiles, three models.
  const std::vector<NeuronShape> shapes{{2, 37}, {3, 21}, {1, 70}};
  const int64_t n = 500;
  CpuStatsAccumulator acc(shapes);
  accumulate(acc, correlated_acts(shapes, n, 3.0, 4), shapes, 0, n, n);
  const CorrelationStats& s = acc.stats();
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      if (i == j) continue;
      const int64_t Ni = shapes[i].neurons(), Nj = shapes[j].neurons();
      const std::vector<double> rows = s.cross_rows(i, j);
      ASSERT_EQ(rows.size(), size_t(Ni * Nj));
      const std::vector<double>& stored = i < j ? s.cross(i, j) : s.cross(j, i);
      for (int64_t a = 0; a < Ni; ++a)
        for (int64_t b = 0; b < Nj; ++b)
          ASSERT_EQ(rows[a * Nj + b], i < j ? stored[a * Nj + b] : stored[b * Ni + a]) << i << ", " << j;
    }
}

TEST(Stats, FilesRoundTripAndCorruptionIsCaught) {
  TempDir dir;
  const std::vector<NeuronShape> shapes{{1, 3}, {2, 2}};
  const auto acts = correlated_acts(shapes, 500, 1.0, 3);
  CpuStatsAccumulator acc(shapes);
  accumulate(acc, acts, shapes, 0, 500, 128);
  acc.stats().save(dir / "s.stats", {{"univ.site", "pre"}});
  std::map<std::string, std::string> meta;
  const CorrelationStats back = CorrelationStats::load(dir / "s.stats", &meta);
  EXPECT_EQ(back, acc.stats());
  EXPECT_EQ(meta.at("univ.site"), "pre");
  std::string bytes = testing::read_bytes(dir / "s.stats");
  bytes[bytes.size() / 2] ^= 1;
  testing::write_bytes(dir / "bad.stats", bytes);
  EXPECT_THROW(CorrelationStats::load(dir / "bad.stats", nullptr), UserError);
}

}  // namespace
}  // namespace univ
