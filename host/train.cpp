// The training loop: batches, learning-rate schedule, checkpoints, logs, test loss.
#include "univ/train.hpp"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "univ/data.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/init.hpp"
#include "univ/param_layout.hpp"

namespace univ {

namespace fs = std::filesystem;

namespace {

constexpr const char* kLogName = "train_log.csv";
constexpr const char* kSummaryName = "train_summary.json";

void prepare_out_dir(const TrainOptions& options) {
  const fs::path& dir = options.out_dir;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw UserError("cannot create output directory " + dir.string() + ": " +
                    (ec ? ec.message() : std::string("a file of that name exists")));
  const fs::path probe = dir / ".univ-write-test";
  write_file_durable(probe, "ok");  // UserError naming the reason when the directory is not writable
  fs::remove(probe);
  const bool resuming_here = options.resume && fs::equivalent(options.resume->dir, dir, ec);
  if (!options.overwrite && !resuming_here && has_checkpoint(dir))
    throw UserError(dir.string() + " already holds a checkpoint: pass --resume " + dir.string() +
                    " to continue it, --overwrite to replace it, or another --out");
}

// The step a train_log.csv row starts with; -1 for the header or a damaged row.
int64_t row_step(const std::string& line) {
  int64_t step = -1;
  const auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), step);
  return ec == std::errc() && end != line.data() + line.size() && *end == ',' ? step : -1;
}

// train_log.csv: one row per step; on resume the rows after the checkpoint are dropped.
class StepLog {
 public:
  StepLog(const fs::path& path, int models, int64_t resume_step) {
    std::string kept;
    if (resume_step > 0 && fs::exists(path)) {
      std::istringstream old(read_file(path));
      std::string line;
      for (bool header = true; std::getline(old, line); header = false) {
        const int64_t step = row_step(line);
        if (header ? step < 0 : step >= 1 && step <= resume_step) kept += line + '\n';
      }
    }
    if (kept.empty()) {
      kept = "step,lr";
      for (int m = 0; m < models; ++m) kept += ",loss_" + std::to_string(m);
      for (int m = 0; m < models; ++m) kept += ",grad_norm_" + std::to_string(m);
      kept += '\n';
    }
    write_file_atomic(path, kept);
    out_.open(path, std::ios::app);
    if (!out_) throw UserError("cannot append to " + path.string());
  }
  void add(int64_t step, double lr, const StepStats& s) {
    out_ << step << ',' << lr;
    for (double l : s.loss) out_ << ',' << l;
    for (double g : s.grad_norm) out_ << ',' << g;
    out_ << '\n' << std::flush;
  }

 private:
  std::ofstream out_;
};

}  // namespace

TrainResult train(const TrainOptions& options, const TrainHooks& hooks) {
  using Clock = std::chrono::steady_clock;
  RunConfig config = options.config;
  const DataSource source = open_data(config.data);
  config.data.vocab = source.vocab();
  config.model.vocab = source.vocab();
  config.validate();
  const nlohmann::json data_description = source.describe();
  if (options.resume) {
    const auto& saved = options.resume->data;
    if (saved.value("fnv1a64", std::string()) != data_description.value("fnv1a64", std::string()))
      throw UserError("the data file " + config.data.source + " has changed since the checkpoint was written");
    if (!(options.resume->config == config))
      throw UserError("the run configuration differs from the checkpoint's");
  }
  prepare_out_dir(options);

  const DataSplits splits = make_splits(source, config);
  BatchSampler sampler(config, splits);
  const int64_t total = config.total_steps();
  const int64_t save_every = options.save_every > 0 ? options.save_every : config.steps_per_epoch();

  auto backend = make_backend(options.device, config, options.precision);
  TrainState state;
  if (options.resume) {
    state = options.resume->state;
  } else {
    const ParamLayout layout(config.model, config.models);
    state.params.assign(layout.total(), 0.0f);
    state.exp_avg.assign(layout.total(), 0.0f);
    state.exp_avg_sq.assign(layout.total(), 0.0f);
    std::vector<uint64_t> seeds;
    for (int m = 0; m < config.models; ++m) seeds.push_back(config.init_seed(m));
    init_parameters(layout, config.model, seeds, state.params.data());
  }
  backend->set_state(state);
  StepLog log(options.out_dir / kLogName, config.models, state.step);

  if (hooks.on_start) hooks.on_start(config, state.step);
  TrainResult result;
  result.config = config;
  const int64_t first_step = state.step;
  int64_t step = first_step;
  int64_t saved_step = options.resume ? first_step : -1;
  const int64_t tokens_per_step = int64_t(config.models) * config.batch * config.model.seq_len;
  // Steps go to the backend in runs: one at a time where it gains nothing from more (the
  // CPU), else up to the next checkpoint, as far as 64 MiB of batches holds them.
  const int64_t longest_run =
      backend->queues_steps() ? std::max<int64_t>(1, (int64_t(64) << 20) / (tokens_per_step * 8)) : 1;
  std::vector<int32_t> inputs, targets;
  std::vector<double> lrs;
  const auto start = Clock::now();
  auto save = [&] {
    save_checkpoint(options.out_dir, config, data_description, backend->state());
    saved_step = step;
  };

  while (step < total) {
    const int64_t next_save = (step / save_every + 1) * save_every;
    const int64_t run = std::min({longest_run, total - step, next_save - step});
    inputs.resize(run * tokens_per_step);
    targets.resize(inputs.size());
    lrs.resize(run);
    for (int64_t k = 0; k < run; ++k) {
      sampler.fill(step + k, inputs.data() + k * tokens_per_step, targets.data() + k * tokens_per_step);
      lrs[k] = learning_rate(config.optim, step + k, total);
    }
    const std::vector<StepStats> done =
        backend->steps(inputs.data(), targets.data(), lrs.data(), static_cast<int>(run));
    for (size_t k = 0; k < done.size(); ++k) {
      const StepStats& stats = done[k];
      if (!stats.finite) {
        const std::string kept = saved_step >= 0 ? "the checkpoint of step " + std::to_string(saved_step) + " in " +
                                                       options.out_dir.string() + " is kept"
                                                 : "no checkpoint was written";
        throw UserError("training stopped at step " + std::to_string(step + 1) + ": " + stats.fault + "; " + kept);
      }
      ++step;
      log.add(step, lrs[k], stats);
      result.last_loss = stats.loss;
      const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      if (hooks.on_step) {
        TrainProgress p{step, total, lrs[k], stats.loss, 0, elapsed, 0};
        const double steps_done = static_cast<double>(step - first_step);
        p.tokens_per_second = elapsed > 0 ? steps_done * static_cast<double>(tokens_per_step) / elapsed : 0;
        p.eta_seconds = steps_done > 0 ? elapsed / steps_done * static_cast<double>(total - step) : 0;
        hooks.on_step(p);
      }
    }
    const bool stop = step < total && hooks.stop_requested && hooks.stop_requested();
    if (stop || step % save_every == 0 || step == total) save();
    if (stop) {
      result.interrupted = true;
      break;
    }
  }

  result.step = step;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  result.tokens_per_second =
      result.seconds > 0 ? static_cast<double>((step - first_step) * tokens_per_step) / result.seconds : 0;
  result.unigram_entropy = unigram_entropy(splits.test, config.model.vocab);
  if (!result.interrupted && splits.test.count() > 0)
    result.test_loss = backend->evaluate(splits.test.tokens.data(), splits.test.count());

  nlohmann::json summary{{"config", to_json(config)},
                         {"data", data_description},
                         {"device", to_string(options.device)},
                         {"precision", to_string(options.precision)},
                         {"step", result.step},
                         {"total_steps", total},
                         {"interrupted", result.interrupted},
                         {"last_train_loss", result.last_loss},
                         {"test_loss", result.test_loss},
                         {"test_unigram_entropy", result.unigram_entropy},
                         {"seconds", result.seconds},
                         {"tokens_per_second", result.tokens_per_second}};
  write_file_atomic(options.out_dir / kSummaryName, summary.dump(2) + "\n");
  return result;
}

}  // namespace univ
