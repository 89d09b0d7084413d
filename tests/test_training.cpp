// The training loop end to end on the CPU backend: learning, determinism, bit-exact
// resume, same-init/same-data, divergence handling, protection of earlier outputs.
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.hpp"
#include "training_faults.hpp"
#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/train.hpp"

namespace univ {
namespace {

using testing::run_files;
using testing::TempDir;
namespace fs = std::filesystem;

TrainOptions small_options(const fs::path& out, int64_t steps = 40) {
  TrainOptions o;
  RunConfig& c = o.config;
  c.model.seq_len = 16;
  c.model.d_model = 32;
  c.model.heads = 2;
  c.model.d_mlp = 64;
  c.model.layers = 1;
  c.data.source = "synthetic:markov";
  c.data.test_samples = 200;
  c.models = 2;
  c.seeds = {3, 4};
  c.samples = 640;
  c.batch = 32;
  c.steps = steps;
  c.optim.lr = 3e-3;
  c.optim.warmup = 10;
  o.out_dir = out;
  o.save_every = 1000;
  return o;
}

TEST(Training, LossFallsWellBelowTheUnigramEntropy) {
  TempDir dir;
  TrainOptions o = small_options(dir.path(), 300);
  o.config.samples = 3200;
  const TrainResult r = train(o, {});
  EXPECT_FALSE(r.interrupted);
  EXPECT_EQ(r.step, 300);
  ASSERT_EQ(r.test_loss.size(), 2u);
  EXPECT_GT(r.unigram_entropy, 3.5);
  for (double loss : r.test_loss) EXPECT_LT(loss, r.unigram_entropy - 1.5);
  EXPECT_TRUE(fs::exists(dir / "train_log.csv"));
  EXPECT_TRUE(fs::exists(dir / "train_summary.json"));
}

TEST(Training, TwoRunsGiveIdenticalCheckpointBytes) {
  TempDir a, b;
  train(small_options(a.path()), {});
  train(small_options(b.path()), {});
  EXPECT_EQ(run_files(a.path(), 2), run_files(b.path(), 2));
  EXPECT_EQ(read_file(a / "train_log.csv"), read_file(b / "train_log.csv"));
}

TEST(Training, ResumedRunEqualsUninterruptedRunBitForBit) {
  TempDir whole, parts;
  train(small_options(whole.path()), {});
  TrainHooks stop_after_17;
  int64_t steps_seen = 0;
  stop_after_17.on_step = [&](const TrainProgress& p) { steps_seen = p.step; };
  stop_after_17.stop_requested = [&] { return steps_seen == 17; };
  const TrainResult first = train(small_options(parts.path()), stop_after_17);
  EXPECT_TRUE(first.interrupted);
  EXPECT_EQ(first.step, 17);
  EXPECT_EQ(load_checkpoint(parts.path()).state.step, 17);

  TrainOptions resume = small_options(parts.path());
  resume.resume = load_checkpoint(parts.path());
  const TrainResult rest = train(resume, {});
  EXPECT_EQ(rest.step, 40);
  EXPECT_EQ(run_files(whole.path(), 2), run_files(parts.path(), 2));
  EXPECT_EQ(read_file(whole / "train_log.csv"), read_file(parts / "train_log.csv"));
}

TEST(Training, SameInitAndSameDataMakeTwinModels) {
  TempDir twins, same_init;
  TrainOptions o = small_options(twins.path(), 10);
  o.config.same_init = o.config.same_data = true;
  train(o, {});
  const LoadedCheckpoint t = load_checkpoint(twins.path());
  const ParamLayout layout(t.config.model, 2);
  for (const auto& tensor : layout.tensors())
    for (int64_t i = 0; i < tensor.numel; ++i)
      ASSERT_EQ(t.state.params[layout.offset(tensor, 0) + i], t.state.params[layout.offset(tensor, 1) + i]);
  EXPECT_EQ(load_model(model_file(twins.path(), 1)).seed, 3u);  // the first seed

  TrainOptions p = small_options(same_init.path(), 10);
  p.config.same_init = true;  // same start, different data: the models drift apart
  train(p, {});
  const LoadedCheckpoint s = load_checkpoint(same_init.path());
  const auto& fc = layout.at("blocks.0.mlp.fc.weight");
  EXPECT_NE(s.state.params[layout.offset(fc, 0)], s.state.params[layout.offset(fc, 1)]);
}

TEST(Training, NonFiniteLossStopsAndKeepsTheLastCheckpoint) {
  TempDir dir;
  testing::expect_nan_stops_resumed_training(small_options(dir.path()), "blocks.0.mlp.fc.weight");
}

// steps() is step() n times, and stops after the first step that is not finite.
TEST(Training, StepsAreStepCallsThatStopAtTheFirstNonFiniteStep) {
  RunConfig c = small_options("unused").config;
  c.model.vocab = 64;
  const ParamLayout layout(c.model, c.models);
  TrainState init{testing::random_vector<float>(layout.total(), 91, 0.05), std::vector<float>(layout.total()),
                  std::vector<float>(layout.total()), 0};
  auto many = make_backend(Device::cpu, c), one = make_backend(Device::cpu, c);
  many->set_state(init);
  one->set_state(init);
  const int n = 3;
  const size_t per_step = size_t(c.models) * c.batch * c.model.seq_len;
  const auto tokens = testing::random_tokens(per_step * n, 64, 92);
  const std::vector<double> lr(n, 1e-3);
  const std::vector<StepStats> done = many->steps(tokens.data(), tokens.data(), lr.data(), n);
  ASSERT_EQ(done.size(), size_t(n));
  for (int k = 0; k < n; ++k)
    EXPECT_EQ(done[k].loss, one->step(tokens.data() + k * per_step, tokens.data() + k * per_step, lr[k]).loss);
  EXPECT_EQ(many->state().params, one->state().params);
  init.params[layout.offset(layout.at("lm_head.weight"), 0)] = NAN;
  many->set_state(init);
  const std::vector<StepStats> stopped = many->steps(tokens.data(), tokens.data(), lr.data(), n);
  ASSERT_EQ(stopped.size(), 1u);
  EXPECT_FALSE(stopped[0].finite);
  EXPECT_EQ(many->state().step, 0);
}

TEST(Training, EarlierOutputsAreNotOverwrittenByAccident) {
  TempDir dir;
  train(small_options(dir.path(), 5), {});
  const auto before = run_files(dir.path(), 2);
  EXPECT_THROW(train(small_options(dir.path(), 5), {}), UserError);
  EXPECT_EQ(run_files(dir.path(), 2), before);
  TrainOptions o = small_options(dir.path(), 6);
  o.overwrite = true;
  EXPECT_EQ(train(o, {}).step, 6);
}

TEST(Training, AnOutputPathThatCannotBeADirectoryIsRefusedBeforeTraining) {
  TempDir dir;
  write_file_durable(dir / "file", "x");
  bool started = false;
  TrainHooks hooks;
  hooks.on_start = [&](const RunConfig&, int64_t) { started = true; };
  EXPECT_THROW(train(small_options(dir / "file" / "run"), hooks), UserError);
  EXPECT_THROW(train(small_options(dir / "file"), hooks), UserError);
  EXPECT_FALSE(started);
}

}  // namespace
}  // namespace univ
