// train_pair: train K tiny transformers side by side, each from its own seed on its
// own samples of one data distribution, and write one checkpoint per model.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <cstdio>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/error.hpp"
#include "univ/param_layout.hpp"
#include "univ/train.hpp"

namespace {

using univ::UserError;

volatile std::sig_atomic_t g_signal = 0;

void on_signal(int sig) {
  g_signal = sig;
  std::signal(sig, SIG_DFL);  // a second Ctrl-C ends the program at once; saves are atomic
}

// Flags as typed; config() turns them into a run configuration.
struct Flags {
  univ::RunConfig run;
  std::vector<uint64_t> seeds{0};
  std::string activation = "relu", pos = "learned";
  std::string device = "auto", precision = "fp32";
  std::string out, resume;
  int64_t save_every = 0;
  bool overwrite = false;

  univ::RunConfig config() const {
    univ::RunConfig c = run;
    c.model.activation = univ::parse_activation(activation);
    c.model.pos = univ::parse_pos_encoding(pos);
    c.seeds = seeds;
    if (seeds.size() == 1 && c.models > 1)  // one seed s: models get s, s+1, ...
      for (int m = 1; m < c.models; ++m) c.seeds.push_back(seeds[0] + m);
    return c;
  }
  void set_config(const univ::RunConfig& c) {
    run = c;
    seeds = c.seeds;
    activation = univ::to_string(c.model.activation);
    pos = univ::to_string(c.model.pos);
  }
};

void add_flags(CLI::App& app, Flags& f) {
  auto& r = f.run;
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a repeated flag: the last wins
  app.add_option("--data", r.data.source,
                 "synthetic:markov, synthetic:induction, a .npy file of token ids, or any other file read as "
                 "text bytes (vocabulary 256)")
      ->capture_default_str();
  app.add_option("--vocab", r.data.vocab,
                 "vocabulary size: synthetic languages (default 64), token files (default: largest id + 1)");
  app.add_option("--data-seed", r.data.seed, "seed of the synthetic language and of the data split")
      ->capture_default_str();
  app.add_option("--test-samples", r.data.test_samples, "held-out test sequences, disjoint from all training ones")
      ->capture_default_str();
  app.add_option("--seq-len", r.model.seq_len, "tokens per sequence (T)")->capture_default_str();
  app.add_option("--d-model", r.model.d_model, "residual stream width")->capture_default_str();
  app.add_option("--heads", r.model.heads, "attention heads (must divide --d-model)")->capture_default_str();
  app.add_option("--d-mlp", r.model.d_mlp, "MLP width: the neurons of each layer")->capture_default_str();
  app.add_option("--layers", r.model.layers, "transformer blocks")->capture_default_str();
  app.add_option("--activation", f.activation, "MLP activation: relu or gelu")->capture_default_str();
  app.add_option("--pos", f.pos, "positional encoding: learned or sinusoidal")->capture_default_str();
  app.add_option("--models", r.models, "models trained side by side (K)")->capture_default_str();
  app.add_option("--seed", f.seeds, "init seeds: one value s (models get s, s+1, ...) or one per model, "
                                   "comma-separated")
      ->delimiter(',')
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->capture_default_str();
  app.add_option("--samples", r.samples, "training sequences per model")->capture_default_str();
  app.add_option("--batch", r.batch, "sequences per step and model")->capture_default_str();
  app.add_option("--epochs", r.epochs, "passes over each model's samples")->capture_default_str();
  app.add_option("--steps", r.steps, "total updates (overrides --epochs)");
  app.add_option("--lr", r.optim.lr, "peak learning rate (AdamW)")->capture_default_str();
  app.add_option("--weight-decay", r.optim.weight_decay, "decoupled weight decay of matrices and embeddings")
      ->capture_default_str();
  app.add_option("--clip", r.optim.clip, "global gradient-norm clip per model; 0 disables")->capture_default_str();
  app.add_option("--warmup", r.optim.warmup, "linear warmup steps before the cosine decay to lr/10")
      ->capture_default_str();
  app.add_flag("--same-init", r.same_init, "every model starts from the first seed's weights");
  app.add_flag("--same-data", r.same_data, "every model trains on the same samples in the same order");
  app.add_option("--device", f.device, "auto (cuda when a GPU is present), cpu or cuda")->capture_default_str();
  app.add_option("--precision", f.precision,
                 "matrix products on the GPU: fp32, or tf32 (tensor cores; about 1e-3 relative)")
      ->capture_default_str();
  app.add_option("--out", f.out, "output directory for checkpoints and logs");
  app.add_option("--resume", f.resume, "continue the run in this directory (writes there unless --out is given)");
  app.add_option("--save-every", f.save_every, "steps between checkpoints (default: once per epoch)");
  app.add_flag("--overwrite", f.overwrite, "replace a checkpoint already in --out");
}

std::string format_duration(double seconds) {
  const long s = std::lround(seconds);
  char text[32];
  if (s >= 3600) std::snprintf(text, sizeof text, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else std::snprintf(text, sizeof text, "%ld:%02ld", s / 60, s % 60);
  return text;
}

std::string format_losses(const std::vector<double>& loss) {
  char text[64];
  std::string out;
  if (loss.size() <= 4) {
    for (double l : loss) {
      std::snprintf(text, sizeof text, "%s%.4f", out.empty() ? "" : " ", l);
      out += text;
    }
    return out;
  }
  double lo = loss[0], hi = loss[0], sum = 0;
  for (double l : loss) lo = std::min(lo, l), hi = std::max(hi, l), sum += l;
  std::snprintf(text, sizeof text, "mean %.4f (%.4f..%.4f)", sum / static_cast<double>(loss.size()), lo, hi);
  return text;
}

// A live line on a terminal; a line per tenth of the run otherwise.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(int64_t total) : tty_(isatty(STDERR_FILENO)), every_(std::max<int64_t>(1, total / 10)) {}
  void operator()(const univ::TrainProgress& p) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = p.step == p.total;
    if (tty_ && !last && now - last_print_ < std::chrono::milliseconds(200)) return;
    if (!tty_ && !last && p.step % every_ != 0) return;
    last_print_ = now;
    char line[256];
    std::snprintf(line, sizeof line, "step %lld/%lld | loss %s | lr %.2e | %.1fk tok/s | ETA %s",
                  static_cast<long long>(p.step), static_cast<long long>(p.total), format_losses(p.loss).c_str(),
                  p.lr, p.tokens_per_second / 1000, format_duration(p.eta_seconds).c_str());
    if (tty_) std::cerr << "\r\033[K" << line << (last ? "\n" : "") << std::flush;
    else std::cerr << line << '\n';
    open_line_ = tty_ && !last;
  }
  // Ends a live line that is still open, so that what follows starts on its own line.
  void end_line() {
    if (open_line_) std::cerr << '\n';
    open_line_ = false;
  }

 private:
  bool tty_;
  bool open_line_ = false;
  int64_t every_;
  std::chrono::steady_clock::time_point last_print_{};
};

// With --resume, flags may repeat the checkpoint's configuration but not change it.
void check_resume_flags(const univ::RunConfig& saved, const univ::RunConfig& flagged) {
  const nlohmann::json patch = nlohmann::json::diff(univ::to_json(saved), univ::to_json(flagged));
  if (patch.empty()) return;
  const std::string path = patch[0].at("path").get<std::string>();
  const nlohmann::json::json_pointer ptr(path);
  std::string field = path.substr(1);
  for (auto& ch : field)
    if (ch == '/') ch = '.';
  throw UserError("--resume: the flags change " + field + " from " + univ::to_json(saved).at(ptr).dump() +
                  " to " + univ::to_json(flagged).value(ptr, nlohmann::json()).dump() +
                  "; a resumed run keeps its checkpoint's configuration");
}

int run(CLI::App& app, Flags& flags, int argc, char** argv) {
  univ::TrainOptions options;
  if (!flags.resume.empty()) {
    univ::recover_checkpoint(flags.resume);
    univ::LoadedCheckpoint ckpt = univ::load_checkpoint(flags.resume);
    flags.set_config(ckpt.config);
    app.clear();
    app.parse(argc, argv);  // again: only the flags given on the command line replace the checkpoint's values
    univ::RunConfig flagged = flags.config();
    check_resume_flags(ckpt.config, flagged);
    options.config = ckpt.config;
    options.resume = std::move(ckpt);
    options.out_dir = flags.out.empty() ? flags.resume : flags.out;
  } else {
    if (flags.out.empty()) throw UserError("--out DIR is required (or --resume DIR)");
    options.config = flags.config();
    options.out_dir = flags.out;
  }
  options.device = univ::resolve_device(flags.device);
  options.precision = univ::parse_precision(flags.precision);
  options.save_every = flags.save_every;
  options.overwrite = flags.overwrite;
  if (flags.save_every < 0) throw UserError("--save-every must be positive");

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  ProgressPrinter progress(options.config.total_steps());
  univ::TrainHooks hooks;
  hooks.on_start = [&](const univ::RunConfig& c, int64_t first_step) {
    const univ::ParamLayout layout(c.model, 1);
    std::cerr << "train_pair: " << c.models << " models of " << layout.per_model() << " parameters on "
              << c.data.source << " (vocabulary " << c.model.vocab << "), " << c.total_steps() << " steps of "
              << c.batch << " x " << c.model.seq_len << " tokens, device " << univ::to_string(options.device);
    if (first_step > 0) std::cerr << ", resuming at step " << first_step;
    std::cerr << '\n';
  };
  hooks.stop_requested = [] { return g_signal != 0; };
  hooks.on_step = [&](const univ::TrainProgress& p) { progress(p); };
  univ::TrainResult result;
  try {
    result = univ::train(options, hooks);
  } catch (...) {
    progress.end_line();
    throw;
  }

  const univ::RunConfig& rc = result.config;
  const univ::ParamLayout layout(rc.model, 1);
  if (result.interrupted) {
    progress.end_line();
    std::cerr << "train_pair: interrupted at step " << result.step << "/" << rc.total_steps()
              << "; checkpoint saved in " << options.out_dir.string()
              << "; continue with: train_pair --resume " << options.out_dir.string() << '\n';
    return 128 + static_cast<int>(g_signal);
  }
  std::printf("trained %d models of %lld parameters for %lld steps in %.1f s (%s, %.1fk tokens/s)\n", rc.models,
              static_cast<long long>(layout.per_model()), static_cast<long long>(result.step), result.seconds,
              univ::to_string(options.device).c_str(), result.tokens_per_second / 1000);
  std::printf("vocabulary %d; test split of %lld sequences; unigram entropy %.4f nats\n", rc.model.vocab,
              static_cast<long long>(rc.data.test_samples), result.unigram_entropy);
  for (int m = 0; m < rc.models; ++m)
    std::printf("model %d (seed %llu): last train loss %.4f, test loss %.4f\n", m,
                static_cast<unsigned long long>(rc.init_seed(m)), result.last_loss.empty() ? std::nan("") : result.last_loss[m],
                result.test_loss.empty() ? std::nan("") : result.test_loss[m]);
  std::printf("checkpoints in %s\n", options.out_dir.string().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGXFSZ, SIG_IGN);  // past a file-size limit a write fails with EFBIG, reported like a full disk
  CLI::App app{
      "train_pair: train K tiny transformers side by side, each from its own seed on its own samples of one "
      "data distribution; writes model_<m>.safetensors, optim_<m>.safetensors, train_log.csv and "
      "train_summary.json into --out."};
  Flags flags;
  add_flags(app, flags);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "train_pair: error: " << e.what() << " (see --help)\n";
    return 2;
  }
  try {
    return run(app, flags, argc, argv);
  } catch (const UserError& e) {
    std::cerr << "train_pair: error: " << e.what() << '\n';
    return 1;
  } catch (const CLI::ParseError& e) {
    std::cerr << "train_pair: error: " << e.what() << " (see --help)\n";
    return 2;
  } catch (const std::filesystem::filesystem_error& e) {
    std::cerr << "train_pair: error: " << e.code().message() << ": " << e.path1().string() << '\n';
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "train_pair: error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "train_pair: internal error: " << e.what() << '\n';
    return 3;
  }
}
