// The training loop shared by every backend: data, schedule, checkpoints, logs.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/config.hpp"

namespace univ {

struct TrainProgress {
  int64_t step = 0;  // updates done
  int64_t total = 0;
  double lr = 0;
  std::vector<double> loss;  // of the step just done, per model
  double tokens_per_second = 0;
  double elapsed_seconds = 0;
  double eta_seconds = 0;
};

struct TrainHooks {
  std::function<void(const RunConfig&, int64_t first_step)> on_start;  // inputs checked, before the first step
  // Polled after every run of steps the backend takes at once (Ctrl-C): each step on
  // the CPU, up to the next checkpoint on the GPU.
  std::function<bool()> stop_requested;
  std::function<void(const TrainProgress&)> on_step;  // after every step (a run's as it ends)
};

struct TrainOptions {
  RunConfig config;
  Device device = Device::cpu;
  Precision precision = Precision::fp32;  // CUDA only; a setting of this invocation, not stored
  std::filesystem::path out_dir;
  std::optional<LoadedCheckpoint> resume;  // continue from this state (config must be its config)
  int64_t save_every = 0;                  // steps between checkpoints; 0: once per epoch
  bool overwrite = false;                  // replace a checkpoint already in out_dir
};

struct TrainResult {
  RunConfig config;  // vocabulary resolved
  int64_t step = 0;
  bool interrupted = false;
  std::vector<double> last_loss;  // training loss of the last step, per model
  std::vector<double> test_loss;  // mean over the test split, per model (empty when interrupted)
  double unigram_entropy = 0;     // of the test split's targets
  double seconds = 0;
  double tokens_per_second = 0;
};

// Trains config.models models side by side and writes out_dir/model_<m>.safetensors,
// optim_<m>.safetensors, train_log.csv and train_summary.json. UserError for bad
// data or an unwritable out_dir (before any work), and for a non-finite loss or
// gradient (training stops; the last checkpoint written stays as it was).
TrainResult train(const TrainOptions& options, const TrainHooks& hooks);

}  // namespace univ
