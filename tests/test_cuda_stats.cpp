// correlate on the GPU against float64 references and the CPU path: the split-FP16 and
// split-TF32 co-moments on data whose means are a thousand deviations, odd shapes,
// spans and groups of spans, the FP16 split's overflow and the fallback to TF32,
// bitwise reproducibility, the GPU forward feeding them, and activation files through
// pinned buffers. Skipped without a GPU; also run on the host emulator
// (emulated.gpu_tests).
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

#include "gpu_stats.hpp"
#include "stats_reference.hpp"
#include "test_util.hpp"
#include "univ/activations.hpp"
#include "univ/analysis.hpp"
#include "univ/backend.hpp"
#include "univ/correlate.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"
#include "univ/train.hpp"

namespace univ {
namespace {

using testing::correlated_acts;
using testing::gpu_stats;
using testing::stat_r;
using testing::worst_cross_error;
using testing::worst_mean_error;
using testing::worst_within_error;
using testing::TempDir;
namespace fs = std::filesystem;

constexpr double kGpuR = 1e-5;  // |r - r_float64| on the GPU (DESIGN.md)

class GpuStats : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
  }
};

TEST_F(GpuStats, MatchTwoPassFloat64WhenMeansAreAThousandDeviations) {
  // Widths that are not multiples of 16, chunks of 1 and of token counts off the
  // 1024-token float32 spans; both splits.
  const std::vector<NeuronShape> shapes{{2, 37}, {1, 150}, {3, 21}};
  const std::vector<int64_t> chunks{1999, 1, 3000, 517};
  const int64_t n = 1999 + 1 + 3000 + 517;
  const auto acts = correlated_acts(shapes, n, 1e3, 7);
  for (SplitPrecision split : {SplitPrecision::f16, SplitPrecision::tf32}) {
    SCOPED_TRACE(split == SplitPrecision::f16 ? "fp16 split" : "tf32 split");
    EXPECT_LT(worst_cross_error(acts, shapes, gpu_stats(acts, shapes, chunks, 0, split), n), kGpuR);
  }
  const CorrelationStats s = gpu_stats(acts, shapes, chunks);
  // Within-layer blocks (the rotation baseline's), and the means.
  EXPECT_LT(worst_within_error(acts[2], shapes[2], s, 2, 1, n), kGpuR);
  EXPECT_LT(worst_mean_error(acts, shapes, s, n), 1e-9);
}

TEST_F(GpuStats, GroupsOfSpansPerFloat64PassKeepTheAccuracy) {
  // 9000 tokens: groups of 3, 3 and 2 spans of 1024, a span of 808, then 517 tokens;
  // then spans of 512 in groups of 5. Within-layer blocks exactly symmetric.
  const std::vector<NeuronShape> shapes{{1, 40}, {2, 24}};
  const int64_t n = 9000 + 517;
  const auto acts = correlated_acts(shapes, n, 1e3, 9);
  for (SplitPrecision split : {SplitPrecision::tf32, SplitPrecision::f16}) {
    SCOPED_TRACE(split == SplitPrecision::f16 ? "fp16 split" : "tf32 split");
    EXPECT_LT(worst_cross_error(acts, shapes, gpu_stats(acts, shapes, {9000, 517}, 1024, split, 3), n), kGpuR);
    const CorrelationStats s = gpu_stats(acts, shapes, {9000, 517}, 512, split, 5);
    EXPECT_LT(worst_cross_error(acts, shapes, s, n), kGpuR);
    EXPECT_LT(worst_within_error(acts[1], shapes[1], s, 1, 1, n), kGpuR);  // infinite unless exactly symmetric
  }
}

TEST_F(GpuStats, Fp16SplitOverflowIsReported) {
  // Values a million times the first chunk's leave FP16's range even after scaling.
  const std::vector<NeuronShape> shapes{{1, 4}, {1, 4}};
  auto acts = correlated_acts(shapes, 200, 0.0, 10);
  for (size_t i = 100 * 4; i < acts[1].size(); ++i) acts[1][i] *= 1e6f;
  EXPECT_THROW(gpu_stats(acts, shapes, {100, 100}, 0, SplitPrecision::f16), Fp16SplitOverflow);
  EXPECT_NO_THROW(gpu_stats(acts, shapes, {100, 100}, 0, SplitPrecision::tf32));
}

TEST_F(GpuStats, AreBitwiseReproducibleAndMatchTheCpu) {
  const std::vector<NeuronShape> shapes{{2, 130}, {2, 130}};
  const int64_t n = 4100;
  const auto acts = correlated_acts(shapes, n, 20.0, 8);
  const CorrelationStats first = gpu_stats(acts, shapes, {2048, 2052});
  EXPECT_TRUE(first == gpu_stats(acts, shapes, {2048, 2052}));
  CpuStatsAccumulator cpu(shapes);
  cpu.add({acts[0].data(), acts[1].data()}, n);
  const auto g = correlation_matrix(first, 0, 1), c = correlation_matrix(cpu.stats(), 0, 1);
  double worst = 0;
  for (size_t k = 0; k < g.size(); ++k) worst = std::max(worst, std::abs(g[k] - c[k]));
  EXPECT_LT(worst, kGpuR);
}

TEST_F(GpuStats, CorrelateForwardOnTheGpuMatchesTheCpu) {
  TempDir dir;
  train(testing::tiny_run(dir.path()), {});
  const auto models = load_models({dir.path()});
  const HeldOutTokens tokens = held_out_tokens(models[0], std::nullopt, 300 * 8 - 5, {});  // the last one cut
  for (Site site : {Site::pre, Site::post}) {
    const StreamResult cpu = stream_statistics(models, tokens, site, 70, {}, Device::cpu);
    const StreamResult gpu = stream_statistics(models, tokens, site, 70, {}, Device::cuda);  // last batch partial
    ASSERT_EQ(gpu.stats.count(), cpu.stats.count());
    for (int m = 0; m < 2; ++m) EXPECT_NEAR(gpu.loss[m], cpu.loss[m], 1e-5 * cpu.loss[m]);
    const auto g = correlation_matrix(gpu.stats, 0, 1), c = correlation_matrix(cpu.stats, 0, 1);
    double worst = 0;
    for (size_t k = 0; k < g.size(); ++k) worst = std::max(worst, std::abs(g[k] - c[k]));
    // Both are float32 forward passes in different summation orders: activations agree
    // to about 1e-6 relative, correlations to a few times that.
    EXPECT_LT(worst, 1e-4) << to_string(site);
    for (int m = 0; m < 2; ++m) EXPECT_LT(testing::relative_error(gpu.stats.mean(m), cpu.stats.mean(m)), 1e-5);
  }
}

// Model m's activations acts[m] [n, width] as .npy files in dir, opened for streaming.
std::vector<ActivationModel> activation_files(const TempDir& dir, const std::vector<std::vector<float>>& acts,
                                              int64_t n, int64_t width) {
  std::vector<ActivationModel> files;
  for (size_t m = 0; m < acts.size(); ++m) {
    const fs::path path = dir / ("m" + std::to_string(m) + ".npy");
    const std::string_view bytes(reinterpret_cast<const char*>(acts[m].data()), acts[m].size() * 4);
    write_file_durable(path, npy_bytes("<f4", {n, width}, bytes));
    files.push_back(open_activation_model("m" + std::to_string(m) + "=" + path.string(), {}));
  }
  return files;
}

TEST_F(GpuStats, ActivationFilesThroughPinnedBuffersMatchTheCpu) {
  TempDir dir;
  const std::vector<NeuronShape> shapes{{1, 48}, {1, 48}};
  const int64_t n = 20000;
  const auto acts = correlated_acts(shapes, n, 5.0, 9);
  const std::vector<ActivationModel> files = activation_files(dir, acts, n, 48);
  const StreamResult cpu = stream_activation_statistics(files, {}, 3000, {}, Device::cpu);
  const StreamResult gpu = stream_activation_statistics(files, {}, 3000, {}, Device::cuda);  // 7 chunks, last partial
  ASSERT_EQ(gpu.stats.count(), n);
  EXPECT_EQ(gpu.bytes_read, cpu.bytes_read);
  const auto g = correlation_matrix(gpu.stats, 0, 1), c = correlation_matrix(cpu.stats, 0, 1);
  for (size_t k = 0; k < g.size(); ++k) ASSERT_NEAR(g[k], c[k], kGpuR);
}

TEST_F(GpuStats, ActivationsPastTheFp16RangeFallBackToTf32) {
  // The second of two chunks a million times the first: the stream runs again with the
  // TF32 split and equals the CPU's statistics.
  TempDir dir;
  const std::vector<NeuronShape> shapes{{1, 8}, {1, 8}};
  const int64_t n = 4000;
  auto acts = correlated_acts(shapes, n, 3.0, 11);
  for (size_t i = 2000 * 8; i < acts[1].size(); ++i) acts[1][i] *= 1e6f;
  const std::vector<ActivationModel> files = activation_files(dir, acts, n, 8);
  const StreamResult cpu = stream_activation_statistics(files, {}, 2000, {}, Device::cpu);
  const StreamResult gpu = stream_activation_statistics(files, {}, 2000, {}, Device::cuda);
  ASSERT_EQ(gpu.stats.count(), n);
  const auto g = correlation_matrix(gpu.stats, 0, 1), c = correlation_matrix(cpu.stats, 0, 1);
  for (size_t k = 0; k < g.size(); ++k) ASSERT_NEAR(g[k], c[k], kGpuR);
}

}  // namespace
}  // namespace univ
