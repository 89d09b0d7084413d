// What real runs meet: SIGKILL in the middle of checkpoint writes, a full disk, a
// file-size limit. The previous checkpoint must always survive, loadable.
#include <gtest/gtest.h>
#include <sys/mount.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "process.hpp"
#include "test_util.hpp"
#include "univ/checkpoint.hpp"
#include "univ/fileio.hpp"

namespace univ {
namespace {

using testing::ProcessResult;
using testing::TempDir;
using testing::tiny_train_flags;
namespace fs = std::filesystem;

const std::string kTrainPair = UNIV_TRAIN_PAIR;

bool write_in_progress(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".tmp") || name == "checkpoint.commit") return true;
  }
  return false;
}

TEST(Faults, SigkillDuringCheckpointWritesAlwaysLeavesALoadableCheckpoint) {
  TempDir scratch;
  const fs::path run = scratch / "run";
  // Large weights, one-sequence batches, a checkpoint after every step: the program
  // spends most of its time writing checkpoints, so random kills land inside writes.
  const auto fresh = tiny_train_flags(run, {"--d-model", "128", "--d-mlp", "512", "--layers", "2", "--batch", "1", "--seq-len",
                                "4", "--samples", "64", "--steps", "1000000", "--save-every", "1"});
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> delay_ms(40, 300), write_delay_us(0, 20000);
  int64_t last_step = 0;
  // At least 50 kills, and more (up to 150) until 10 have landed inside a write: how
  // many do varies with the machine's load (9 of 50 seen under the sanitizers).
  const int min_trials = 50, max_trials = 150, wanted_interrupts = 10;
  int interrupted_writes = 0, trials = 0;
  for (int trial = 0; trial < max_trials && (trial < min_trials || interrupted_writes < wanted_interrupts);
       ++trial, ++trials) {
    const bool resume = fs::exists(run) && has_checkpoint(run);
    testing::Process child(
        kTrainPair, resume ? std::vector<std::string>{"--resume", run.string(), "--save-every", "1", "--device", "cpu"} : fresh,
        scratch.path());
    if (!resume) {
      // The first run writes its first checkpoint before its kill: on a busy machine
      // (ctest -j on two cores) that takes longer than any kill delay below, and no
      // trial would ever resume.
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
      while (!has_checkpoint(run) && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (trial % 2 == 0) {
      // Every other kill waits for a write to start, then lands 0-20 ms into it.
      for (int i = 0; i < 10000 && !(fs::exists(run) && write_in_progress(run)); ++i)
        std::this_thread::sleep_for(std::chrono::microseconds(300));
      std::this_thread::sleep_for(std::chrono::microseconds(write_delay_us(rng)));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
    }
    child.signal(SIGKILL);
    const ProcessResult r = child.wait();
    ASSERT_EQ(r.exit_code, 128 + SIGKILL) << r.err;
    if (!fs::exists(run)) continue;
    interrupted_writes += write_in_progress(run);
    if (!has_checkpoint(run)) {
      ASSERT_EQ(last_step, 0) << "trial " << trial << ": the checkpoint disappeared";
      continue;
    }
    recover_checkpoint(run);
    const LoadedCheckpoint c = load_checkpoint(run);  // throws (fails the test) when damaged
    EXPECT_GE(c.state.step, last_step) << "trial " << trial;
    last_step = c.state.step;
  }
  EXPECT_GT(last_step, 0);
  EXPECT_GE(interrupted_writes, wanted_interrupts) << "too few kills landed inside a checkpoint write to test anything";
  std::cout << "[          ] " << interrupted_writes << " of " << trials
            << " kills interrupted a checkpoint write; every time a checkpoint loaded\n";
}

// After the progress lines, one error line naming the problem; exit 1.
void expect_clear_error(const ProcessResult& r, const std::string& fragment) {
  EXPECT_EQ(r.exit_code, 1) << r.err;
  const size_t at = r.err.rfind('\n', r.err.size() - 2);
  const std::string last = r.err.substr(at == std::string::npos ? 0 : at + 1);
  EXPECT_TRUE(last.starts_with("train_pair: error: ")) << r.err;
  EXPECT_NE(last.find(fragment), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("error"), r.err.rfind("error")) << r.err;
}

int64_t disk_usage(const fs::path& dir) {
  int64_t pages = 2;  // the log and the summary
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) pages += (static_cast<int64_t>(e.file_size()) + 4095) / 4096;
  return pages * 4096;
}

TEST(Faults, AFullDiskStopsWithAClearErrorAndKeepsTheLastCheckpoint) {
  TempDir scratch;
  // How much one checkpoint takes, measured on a normal directory.
  ASSERT_EQ(testing::run_process(kTrainPair, tiny_train_flags(scratch / "probe", {"--steps", "5"}), scratch.path()).exit_code, 0);
  const int64_t one_checkpoint = disk_usage(scratch / "probe");
  // A disk that holds one checkpoint and a half: the save at step 10 cannot fit.
  const fs::path disk = scratch / "disk";
  fs::create_directories(disk);
  const std::string size = "size=" + std::to_string(one_checkpoint * 3 / 2);
  if (::mount("tmpfs", disk.c_str(), "tmpfs", 0, size.c_str()) != 0)
    GTEST_SKIP() << "cannot mount a size-limited tmpfs here (" << std::strerror(errno) << "; needs CAP_SYS_ADMIN)";
  struct Unmount {
    fs::path at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{disk};
  const ProcessResult r =
      testing::run_process(kTrainPair, tiny_train_flags(disk / "run", {"--steps", "10", "--save-every", "5"}), scratch.path());
  expect_clear_error(r, "No space left on device");
  EXPECT_EQ(load_checkpoint(disk / "run").state.step, 5);
  EXPECT_FALSE(write_in_progress(disk / "run"));
}

TEST(Faults, AFileSizeLimitStopsWithAClearErrorAndLeavesNoPartialFiles) {
  TempDir scratch;
  const fs::path run = scratch / "run";
  const ProcessResult r =
      testing::run_process(kTrainPair, tiny_train_flags(run, {"--steps", "10"}), scratch.path(), /*file_size_limit=*/8192);
  expect_clear_error(r, "File too large");
  EXPECT_FALSE(has_checkpoint(run));
  EXPECT_FALSE(write_in_progress(run));
}

}  // namespace
}  // namespace univ
