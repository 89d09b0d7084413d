// `mpirun -n 2 correlate ...` against one process: the float64 statistics agree to
// 1e-12 relative, and so do the reports. On the CPU: GPU statistics sum float32
// partials over spans that depend on the split, so there they agree to about 1e-7.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "process.hpp"
#include "test_util.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"
#include "univ/stats.hpp"
#include "univ/train.hpp"

namespace univ {
namespace {

using testing::ProcessResult;
using testing::TempDir;
namespace fs = std::filesystem;

const std::string kCorrelate = UNIV_CORRELATE;
const std::string kMpirun = UNIV_MPIRUN;

ProcessResult mpirun(const TempDir& scratch, int ranks, std::vector<std::string> args) {
  ::setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);  // CI runs as root
  ::setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  args.insert(args.begin(), {"-n", std::to_string(ranks), "--oversubscribe", kCorrelate});
  return testing::run_process(kMpirun, args, scratch.path());
}

double relative(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0, r = 0;
  for (size_t k = 0; k < a.size(); ++k) d += (a[k] - b[k]) * (a[k] - b[k]), r += b[k] * b[k];
  return std::sqrt(d / std::max(r, 1e-300));
}

void expect_same_stats(const fs::path& a_file, const fs::path& b_file) {
  const CorrelationStats a = CorrelationStats::load(a_file, nullptr), b = CorrelationStats::load(b_file, nullptr);
  ASSERT_EQ(a.count(), b.count());
  ASSERT_EQ(a.shapes(), b.shapes());
  for (int m = 0; m < a.models(); ++m) {
    EXPECT_LT(relative(a.mean(m), b.mean(m)), 1e-12);
    for (int l = 0; l < a.shapes()[m].layers; ++l) EXPECT_LT(relative(a.within(m, l), b.within(m, l)), 1e-12);
    for (int j = m + 1; j < a.models(); ++j) EXPECT_LT(relative(a.cross(m, j), b.cross(m, j)), 1e-12);
  }
}

TEST(Mpi, TwoRanksGiveTheStatisticsOfOneProcess) {
  TempDir dir;
  TrainOptions o;
  o.config.model = {0, 8, 16, 2, 24, 2, Activation::relu, PosEncoding::learned};
  o.config.data.test_samples = 301;  // an odd split between the ranks
  o.config.seeds = {1, 2};
  o.config.samples = 128;
  o.config.batch = 16;
  o.config.steps = 20;
  o.out_dir = dir / "run";
  train(o, {});
  const ProcessResult one = testing::run_process(
      kCorrelate, {(dir / "run").string(), "--device", "cpu", "--out", (dir / "one").string(), "--save-stats", (dir / "one.stats").string()},
      dir.path());
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const ProcessResult two = mpirun(dir, 2, {(dir / "run").string(), "--device", "cpu", "--out", (dir / "two").string(), "--save-stats",
                                            (dir / "two.stats").string()});
  ASSERT_EQ(two.exit_code, 0) << two.err;
  expect_same_stats(dir / "two.stats", dir / "one.stats");
  const auto a = nlohmann::json::parse(read_file(dir / "one" / "summary.json"));
  const auto b = nlohmann::json::parse(read_file(dir / "two" / "summary.json"));
  EXPECT_EQ(a.at("layers"), b.at("layers"));
  EXPECT_EQ(b.at("data").at("processes"), 2);
  for (int m = 0; m < 2; ++m)  // float32 batch means over other batches: float32 agreement
    EXPECT_NEAR(a.at("model_loss")[m].get<double>(), b.at("model_loss")[m].get<double>(), 1e-6);
  // --shard under mpirun would split twice: refused on every rank.
  const ProcessResult both = mpirun(dir, 2, {(dir / "run").string(), "--shard", "0/2", "--save-stats",
                                             (dir / "x.stats").string()});
  EXPECT_NE(both.exit_code, 0);
  EXPECT_NE(both.err.find("--shard and mpirun both split the tokens"), std::string::npos) << both.err;
}

TEST(Mpi, ActivationFilesSplitAcrossRanks) {
  TempDir dir;
  std::vector<float> a(1001 * 12), b(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = static_cast<float>(std::sin(0.37 * i) * 100 + 1000);  // large means
    b[i] = static_cast<float>(std::cos(0.11 * i) + a[i] * 0.01);
  }
  write_file_durable(dir / "a.npy", npy_bytes("<f4", {1001, 12}, {reinterpret_cast<const char*>(a.data()), a.size() * 4}));
  write_file_durable(dir / "b.npy", npy_bytes("<f4", {1001, 12}, {reinterpret_cast<const char*>(b.data()), b.size() * 4}));
  const std::vector<std::string> acts{"--acts", "a=" + (dir / "a.npy").string(), "--acts",
                                      "b=" + (dir / "b.npy").string(), "--layers", "2x6", "--match", "max"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), acts.begin(), acts.end());
    return extra;
  };
  ASSERT_EQ(testing::run_process(kCorrelate, with({"--device", "cpu", "--out", (dir / "one").string(), "--save-stats",
                                                   (dir / "one.stats").string()}),
                                 dir.path())
                .exit_code,
            0);
  const ProcessResult three =
      mpirun(dir, 3, with({"--device", "cpu", "--out", (dir / "three").string(), "--save-stats", (dir / "three.stats").string()}));
  ASSERT_EQ(three.exit_code, 0) << three.err;
  expect_same_stats(dir / "three.stats", dir / "one.stats");
}

}  // namespace
}  // namespace univ
