// train_pair as a user meets it: --help, a short run, Ctrl-C and resume, and every
// kind of bad input answered with one clear line, a non-zero exit, nothing destroyed.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "process.hpp"
#include "test_util.hpp"
#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"

namespace univ {
namespace {

using testing::ProcessResult;
using testing::TempDir;
namespace fs = std::filesystem;

const std::string kTrainPair = UNIV_TRAIN_PAIR;

std::vector<std::string> tiny_flags(const fs::path& out, int steps) {
  return testing::tiny_train_flags(out, {"--steps", std::to_string(steps)});
}

ProcessResult train_pair(const TempDir& scratch, std::vector<std::string> args) {
  return testing::run_process(kTrainPair, args, scratch.path());
}

std::vector<std::string> with(std::vector<std::string> base, const std::vector<std::string>& extra) {
  base.insert(base.end(), extra.begin(), extra.end());
  return base;
}

std::string checkpoint_bytes(const fs::path& dir) {
  std::string all;
  for (int m = 0; m < 2; ++m) all += read_file(model_file(dir, m)) + read_file(optimizer_file(dir, m));
  return all;
}

TEST(TrainPairCli, HelpNamesEveryFlag) {
  TempDir scratch;
  const ProcessResult r = train_pair(scratch, {"--help"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"--models", "--seed", "--samples", "--batch", "--epochs", "--steps", "--lr",
                           "--weight-decay", "--clip", "--warmup", "--seq-len", "--d-model", "--heads", "--d-mlp",
                           "--layers", "--activation", "--pos", "--data", "--device", "--out", "--resume",
                           "--same-init", "--same-data"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag;
}

TEST(TrainPairCli, ShortRunWritesCheckpointsAndASummary) {
  TempDir scratch;
  const ProcessResult r = train_pair(scratch, tiny_flags(scratch / "run", 20));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("test loss"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("step 20/20"), std::string::npos) << r.err;
  for (const char* f : {"model_0.safetensors", "model_1.safetensors", "optim_0.safetensors", "optim_1.safetensors",
                        "train_log.csv", "train_summary.json"})
    EXPECT_TRUE(fs::exists(scratch / "run" / f)) << f;
  const ModelCheckpoint m = load_model(scratch / "run" / "model_1.safetensors");
  EXPECT_EQ(m.step, 20);
  EXPECT_EQ(m.seed, 1u);
  EXPECT_EQ(m.run.model.d_model, 16);
}

class Interrupt : public ::testing::TestWithParam<int> {};

TEST_P(Interrupt, SavesACheckpointThatResumesBitExactly) {
  const int sig = GetParam();
  TempDir scratch, whole_scratch;
  const fs::path run = scratch / "run", whole = whole_scratch / "run";
  const auto flags = tiny_flags(run, 600);
  testing::Process child(kTrainPair, flags, scratch.path());
  // Wait until a few steps are logged, then interrupt.
  for (int i = 0; i < 2000; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::error_code ec;
    if (fs::exists(run / "train_log.csv") && fs::file_size(run / "train_log.csv", ec) > 200) break;
  }
  child.signal(sig);
  const ProcessResult r = child.wait();
  ASSERT_EQ(r.exit_code, 128 + sig) << r.err;
  EXPECT_NE(r.err.find("interrupted at step"), std::string::npos) << r.err;
  const int64_t stopped = load_checkpoint(run).state.step;
  EXPECT_GT(stopped, 0);
  EXPECT_LT(stopped, 600);

  TempDir resume_scratch;
  const ProcessResult resumed = train_pair(resume_scratch, {"--resume", run.string(), "--device", "cpu"});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("resuming at step " + std::to_string(stopped)), std::string::npos) << resumed.err;
  ASSERT_EQ(train_pair(whole_scratch, tiny_flags(whole, 600)).exit_code, 0);
  EXPECT_EQ(checkpoint_bytes(run), checkpoint_bytes(whole));
}

INSTANTIATE_TEST_SUITE_P(Signals, Interrupt, ::testing::Values(SIGINT, SIGTERM));

// One line on stderr naming the problem, a non-zero exit, no stdout.
void expect_clear_error(const ProcessResult& r, const std::string& fragment) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(fragment), std::string::npos) << "stderr: " << r.err;
  EXPECT_EQ(r.out, "");
}

TEST(TrainPairCli, BadFlagsAndValues) {
  TempDir scratch;
  const fs::path out = scratch / "run";
  const auto base = tiny_flags(out, 5);
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{"--bogus"}, "--bogus"},
      {{"--d-model", "30", "--heads", "4"}, "--d-model 30 is not divisible by --heads 4"},
      {{"--d-model", "0"}, "--d-model must be positive"},
      {{"--layers", "0"}, "--layers must be positive"},
      {{"--lr", "-1"}, "--lr must be a positive number"},
      {{"--lr", "abc"}, "--lr"},
      {{"--weight-decay", "-0.5"}, "--weight-decay"},
      {{"--activation", "tanh"}, "unknown activation 'tanh'"},
      {{"--pos", "rotary"}, "unknown positional encoding 'rotary'"},
      {{"--seed", "1,2,3"}, "--seed takes one value or one per model"},
      {{"--samples", "8"}, "smaller than --batch"},
      {{"--models", "0"}, "--models must be positive"},
      {{"--device", "tpu"}, "unknown --device 'tpu'"},
      {{"--precision", "fp16"}, "unknown --precision 'fp16'"},
      {{"--data", "synthetic:zipf"}, "unknown synthetic language 'zipf'"},
  };
  for (const auto& [extra, fragment] : cases) {
    SCOPED_TRACE(extra[0]);
    expect_clear_error(train_pair(scratch, with(base, extra)), fragment);
    EXPECT_FALSE(fs::exists(out / "model_0.safetensors"));
  }
  expect_clear_error(train_pair(scratch, {"--steps", "5"}), "--out DIR is required");
}

TEST(TrainPairCli, BadDataFiles) {
  TempDir scratch;
  write_file_durable(scratch / "empty.txt", "");
  write_file_durable(scratch / "short.txt", "tiny");
  const std::vector<int32_t> ids(200, 7);
  std::vector<int32_t> high = ids;
  high[123] = 99;
  write_file_durable(scratch / "high.npy",
                     npy_bytes("<i4", {200}, {reinterpret_cast<const char*>(high.data()), high.size() * 4}));
  write_file_durable(scratch / "floats.npy", npy_bytes("<f4", {2}, std::string(8, '\0')));
  const auto base = tiny_flags(scratch / "run", 5);
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{"--data", (scratch / "missing.txt").string()}, "No such file or directory"},
      {{"--data", (scratch / "empty.txt").string()}, "is empty"},
      {{"--data", scratch.path().string()}, "is a directory"},
      {{"--data", (scratch / "short.txt").string()}, "fewer than one sequence of 9"},
      {{"--data", (scratch / "high.npy").string(), "--vocab", "50"},
       "token id 99 at position 123 is outside the vocabulary of 50"},
      {{"--data", (scratch / "floats.npy").string()}, "integer dtype"},
      {{"--data", (scratch / "short.txt").string(), "--vocab", "100"}, "text files are read as bytes"},
  };
  for (const auto& [extra, fragment] : cases) {
    SCOPED_TRACE(extra[1]);
    expect_clear_error(train_pair(scratch, with(base, extra)), fragment);
  }
  if (geteuid() != 0) {  // root reads any file
    write_file_durable(scratch / "locked.txt", std::string(1000, 'a'));
    fs::permissions(scratch / "locked.txt", fs::perms::none);
    expect_clear_error(train_pair(scratch, with(base, {"--data", (scratch / "locked.txt").string()})),
                       "Permission denied");
  }
}

TEST(TrainPairCli, BadResumeDirectoriesLeaveTheirFilesAlone) {
  TempDir scratch;
  const fs::path run = scratch / "run";
  ASSERT_EQ(train_pair(scratch, tiny_flags(run, 5)).exit_code, 0);
  const std::string good = checkpoint_bytes(run);

  expect_clear_error(train_pair(scratch, {"--resume", (scratch / "nowhere").string()}), "no checkpoint directory");
  fs::create_directories(scratch / "empty-run");
  expect_clear_error(train_pair(scratch, {"--resume", (scratch / "empty-run").string()}), "no checkpoint in");
  expect_clear_error(train_pair(scratch, {"--resume", run.string(), "--d-model", "32"}),
                     "--resume: the flags change model.d_model from 16 to 32");
  EXPECT_EQ(checkpoint_bytes(run), good);

  // Truncated, bit-flipped, missing: copies of the run, each damaged one way.
  auto damaged = [&](const std::string& name, auto&& damage) {
    const fs::path dir = scratch / name;
    fs::copy(run, dir);
    damage(dir);
    const std::string before = read_file(model_file(dir, 0));
    ProcessResult r = train_pair(scratch, {"--resume", dir.string()});
    EXPECT_EQ(read_file(model_file(dir, 0)), before);
    return r;
  };
  expect_clear_error(damaged("truncated", [](const fs::path& d) {
                       fs::resize_file(model_file(d, 1), fs::file_size(model_file(d, 1)) / 2);
                     }),
                     "truncated");
  expect_clear_error(damaged("flipped", [](const fs::path& d) {
                       std::string bytes = read_file(optimizer_file(d, 1));
                       bytes[bytes.size() - 5] ^= 0x10;
                       write_file_durable(optimizer_file(d, 1), bytes);
                     }),
                     "is corrupt: its checksum does not match");
  expect_clear_error(damaged("missing", [](const fs::path& d) { fs::remove(optimizer_file(d, 0)); }),
                     "optim_0.safetensors is missing");
  expect_clear_error(damaged("garbage", [](const fs::path& d) { write_file_durable(model_file(d, 0), "garbage!"); }),
                     "not a valid safetensors file");
}

TEST(TrainPairCli, UnwritableOutputAndMissingGpu) {
  TempDir scratch;
  write_file_durable(scratch / "a-file", "x");
  expect_clear_error(train_pair(scratch, tiny_flags(scratch / "a-file" / "run", 5)), "cannot create output directory");
  if (geteuid() != 0) {  // root writes anywhere
    fs::create_directories(scratch / "read-only");
    fs::permissions(scratch / "read-only", fs::perms::owner_read | fs::perms::owner_exec);
    expect_clear_error(train_pair(scratch, tiny_flags(scratch / "read-only", 5)), "Permission denied");
  }
  if (cuda_device_count() == 0)
    expect_clear_error(train_pair(scratch, with(tiny_flags(scratch / "run", 5), {"--device", "cuda"})),
                       "--device cuda");
}

}  // namespace
}  // namespace univ
