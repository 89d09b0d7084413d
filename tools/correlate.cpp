// correlate: stream the MLP activations of K >= 2 checkpoints over held-out tokens
// into correlation statistics, compare against Haar-rotation baselines and null
// models, and report the universal neurons (neurons.csv, summary.json, report.html).
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <set>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "univ/activations.hpp"
#include "univ/analysis.hpp"
#include "univ/backend.hpp"
#include "univ/correlate.hpp"
#include "univ/error.hpp"
#include "univ/mpi.hpp"
#include "univ/report.hpp"

namespace {

namespace fs = std::filesystem;
using univ::UserError;
using Clock = std::chrono::steady_clock;

constexpr int64_t kActivationChunk = 8192;  // tokens per chunk of activation files

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct Flags {
  std::vector<std::string> inputs;  // checkpoints, or statistics files for merge
  std::string out, save_stats;
  std::string match = "index", scope = "layer", device = "auto";
  univ::AnalysisOptions analysis;
  // streaming only
  std::string site = "pre", shard = "0/1";
  std::string data;
  int vocab = 0;
  uint64_t data_seed = 0;
  int64_t tokens = 0;
  int batch = 0;  // 0: 64 sequences on the CPU, 512 on the GPU
  std::vector<std::string> acts;  // NAME=FILE[,FILE...] per model, instead of checkpoints
  std::string layers;
};

void add_analysis_flags(CLI::App& app, Flags& f) {
  app.add_option("--out", f.out, "output directory for neurons.csv, summary.json and report.html");
  app.add_option("--save-stats", f.save_stats, "also write the statistics to this file (to merge shards later)");
  app.add_option("--match", f.match, "index (neuron i with neuron i), max (best partner neuron) or one-to-one "
                                     "(optimal assignment)")
      ->capture_default_str();
  app.add_option("--scope", f.scope, "where max and one-to-one look for partners: layer or all")->capture_default_str();
  app.add_option("--threshold", f.analysis.threshold, "excess correlation above which a neuron is universal, in (0, 1]")
      ->capture_default_str();
  app.add_option("--baseline-draws", f.analysis.baseline_draws, "Haar rotations averaged into the baseline")
      ->capture_default_str();
  app.add_option("--null-draws", f.analysis.null_draws,
                 "further rotations (and partner permutations, for index matching) that estimate chance")
      ->capture_default_str();
  app.add_option("--seed", f.analysis.seed, "seed of the rotations and permutations")->capture_default_str();
  app.add_option("--device", f.device,
                 "auto (the GPU when there is one), cpu or cuda: where the forward pass, the statistics and the "
                 "rotation baseline run (the same rotations either way)")
      ->capture_default_str();
}

nlohmann::json model_info(const univ::LoadedModel& m) {
  return {{"path", m.path.string()},
          {"seed", m.checkpoint.seed},
          {"step", m.checkpoint.step},
          {"model_index", m.checkpoint.model_index},
          {"checksum", m.checkpoint.checksum},
          {"config", univ::to_json(m.checkpoint.run.model)}};
}

// Output checks that need no work: a clear error before minutes of streaming.
void check_outputs(const Flags& f, bool need_report) {
  if (need_report && f.out.empty()) throw UserError("--out DIR is required");
  std::error_code ec;
  if (!f.out.empty() && fs::exists(f.out, ec) && !fs::is_directory(f.out, ec))
    throw UserError("--out " + f.out + " is a file, not a directory");
  if (!f.save_stats.empty() && fs::is_directory(f.save_stats, ec))
    throw UserError("--save-stats " + f.save_stats + " is a directory");
}

// A live line on a terminal, a line per tenth of the work otherwise.
class ProgressLine {
 public:
  explicit ProgressLine(bool enabled) : enabled_(enabled) {}
  void show(int64_t done, int64_t total, const std::string& text) {
    if (!enabled_) return;
    const bool last = done == total;
    const int tenth = static_cast<int>(10 * done / std::max<int64_t>(total, 1));
    if (!tty_ && !last && tenth == last_tenth_) return;
    last_tenth_ = tenth;
    if (tty_) std::cerr << "\r\033[K" << text << (last ? "\n" : "") << std::flush;
    else std::cerr << text << '\n';
  }

 private:
  bool enabled_;
  bool tty_ = isatty(STDERR_FILENO);
  int last_tenth_ = -1;
};

// Tokens streamed and their rate.
class Progress {
 public:
  explicit Progress(bool enabled) : line_(enabled) {}
  void operator()(const univ::StreamProgress& p) {
    char text[160];
    const double seconds = std::max(p.seconds, 1e-9);
    int used = std::snprintf(text, sizeof text, "tokens %lld/%lld | %.1fk tokens/s", static_cast<long long>(p.tokens_done),
                             static_cast<long long>(p.tokens_total), static_cast<double>(p.tokens_done) / seconds / 1000);
    if (p.bytes_read > 0) std::snprintf(text + used, sizeof text - used, " | %.2f GB/s read", p.bytes_read / seconds / 1e9);
    line_.show(p.tokens_done, p.tokens_total, text);
  }

 private:
  ProgressLine line_;
};

univ::AnalysisOptions analysis_options(const Flags& f) {
  univ::AnalysisOptions o = f.analysis;
  o.match = univ::parse_match_mode(f.match);
  o.scope = univ::parse_match_scope(f.scope);
  o.device = univ::resolve_device(f.device);
  o.validate();
  return o;
}

// The analysis' rotations, drawn on the GPU while the statistics stream, when this
// process will run the analysis there (a complete run, at rank 0).
std::unique_ptr<univ::PreparedRotations> prepare_rotations([[maybe_unused]] const Flags& f,
                                                           [[maybe_unused]] const std::vector<univ::NeuronShape>& shapes,
                                                           [[maybe_unused]] bool analysed_here) {
#ifdef UNIV_HAVE_CUDA
  const univ::AnalysisOptions o = analysis_options(f);
  if (analysed_here && o.device == univ::Device::cuda) return std::make_unique<univ::PreparedRotations>(shapes, o);
#endif
  return nullptr;
}

void report(const Flags& f, const univ::CorrelationStats& stats, univ::ReportInput input, Clock::time_point start,
            const univ::PreparedRotations* prepared = nullptr) {
  const auto t0 = Clock::now();
  ProgressLine line(true);
  const univ::Analysis analysis = univ::analyze(
      stats, analysis_options(f),
      [&](int done, int total) {
        char text[96];
        std::snprintf(text, sizeof text, "rotation draws %d/%d | %.1f s", done, total, seconds_since(t0));
        line.show(done, total, text);
      },
      prepared);
  input.timings["analysis"] = seconds_since(t0);
  input.analysis = &analysis;
  input.timings["total"] = seconds_since(start);  // writing the report takes milliseconds
  univ::write_report(f.out, input);
  std::printf("%s\n", analysis.verdict.c_str());
  std::printf("report: %s\n", (fs::path(f.out) / "report.html").string().c_str());
}

// Saves the statistics when asked, and reports unless this is one shard of several.
void finish(const Flags& f, const univ::CorrelationStats& stats, const univ::ReportInput& input, bool full_run,
            Clock::time_point start, const univ::PreparedRotations* prepared) {
  if (!f.save_stats.empty()) {
    stats.save(f.save_stats,
               {{"univ.models", input.models.dump()}, {"univ.site", input.site}, {"univ.data", input.data.dump()}});
    std::cerr << "correlate: statistics of " << stats.count() << " tokens saved to " << f.save_stats << '\n';
  }
  if (full_run) report(f, stats, input, start, prepared);
}

// The slice of the tokens this process streams: --shard, or this rank's under mpirun.
// A run is complete (and reported) unless the user asked for one shard.
struct Slice {
  univ::Shard shard;
  bool complete = true;
};

Slice resolve_slice(const Flags& f, const CLI::App& app, const univ::MpiSession& mpi) {
  Slice s{univ::Shard::parse(f.shard), true};
  s.complete = s.shard.count == 1;
  if (mpi.size() > 1) {
    if (app.count("--shard") > 0) throw UserError("--shard and mpirun both split the tokens: use one of them");
    s.shard = {mpi.rank(), mpi.size()};
  }
  if (!s.complete && f.save_stats.empty())
    throw UserError("--shard needs --save-stats FILE: a shard's statistics are merged later with 'correlate merge'");
  check_outputs(f, s.complete);
  if (s.complete) analysis_options(f);  // bad analysis flags fail before the streaming
  return s;
}

// --device for the streaming; with CUDA and several processes, GPU rank % count each.
univ::Device stream_device(const Flags& f, const univ::MpiSession& mpi) {
  const univ::Device device = univ::resolve_device(f.device);
  if (device == univ::Device::cuda) univ::select_cuda_device(mpi.rank());
  return device;
}

// Streams --acts files instead of running checkpoints.
int run_activation_files(const Flags& f, const CLI::App& app, const univ::MpiSession& mpi, Clock::time_point start) {
  if (!f.inputs.empty()) throw UserError("give checkpoints or --acts, not both");
  for (const char* flag : {"--site", "--data", "--vocab", "--data-seed", "--tokens", "--batch"})
    if (app.count(flag) > 0) throw UserError(std::string(flag) + " applies to checkpoints, not to --acts");
  const Slice slice = resolve_slice(f, app, mpi);
  const std::vector<int> sizes = f.layers.empty() ? std::vector<int>{} : univ::parse_layer_sizes(f.layers);
  std::vector<univ::ActivationModel> models;
  for (const auto& a : f.acts) models.push_back(univ::open_activation_model(a, sizes));
  const int64_t tokens = univ::common_tokens(models);
  if (mpi.root())
    std::cerr << "correlate: " << models.size() << " models, " << tokens << " tokens of activation files"
              << (mpi.size() > 1 ? ", " + std::to_string(mpi.size()) + " processes" : "") << '\n';
  const univ::Device device = stream_device(f, mpi);
  std::vector<univ::NeuronShape> shapes;
  for (const auto& m : models) shapes.push_back(m.shape);
  const auto prepared = prepare_rotations(f, shapes, slice.complete && mpi.root());
  Progress progress(mpi.root());
  univ::StreamResult streamed =
      univ::stream_activation_statistics(models, slice.shard, kActivationChunk, std::ref(progress), device);
  streamed.stats = mpi.gather_stats(streamed.stats);
  streamed.bytes_read = mpi.sum({streamed.bytes_read})[0];
  if (!mpi.root()) return 0;

  univ::ReportInput input;
  for (const auto& m : models) {
    nlohmann::json files = nlohmann::json::array();
    for (const auto& file : m.files) files.push_back(file.spec());
    input.models.push_back({{"name", m.name},
                            {"path", m.name},
                            {"files", files},
                            {"config", {{"layers", m.shape.layers}, {"d_mlp", m.shape.width}}}});
  }
  input.site = "activation files";
  input.data = {{"source", "activation files"},
                {"tokens", streamed.stats.count()},
                {"shard", slice.complete ? "0/1" : f.shard},
                {"processes", mpi.size()},
                {"device", univ::to_string(device)}};
  input.timings["read_and_statistics"] = streamed.seconds;
  input.timings["read_gigabytes_per_second"] = streamed.bytes_read / std::max(streamed.seconds, 1e-9) / 1e9;
  std::cerr << "correlate: read " << streamed.bytes_read / 1e9 << " GB at "
            << streamed.bytes_read / std::max(streamed.seconds, 1e-9) / 1e9 << " GB/s\n";
  finish(f, streamed.stats, input, slice.complete, start, prepared.get());
  return 0;
}

int run_stream(const Flags& f, const CLI::App& app, const univ::MpiSession& mpi) {
  const auto start = Clock::now();
  if (!f.acts.empty()) return run_activation_files(f, app, mpi, start);
  const Slice slice = resolve_slice(f, app, mpi);
  if (app.count("--batch") > 0 && f.batch < 1) throw UserError("--batch must be positive");
  const univ::Site site = univ::parse_site(f.site);
  const univ::Device device = stream_device(f, mpi);
  const int batch = f.batch > 0 ? f.batch : device == univ::Device::cuda ? 512 : 64;

  std::vector<fs::path> paths(f.inputs.begin(), f.inputs.end());
  const std::vector<univ::LoadedModel> models = univ::load_models(paths);
  std::optional<univ::DataSpec> data;
  if (!f.data.empty()) data = univ::DataSpec{f.data, f.vocab, f.data_seed, models[0].checkpoint.run.data.test_samples};
  const univ::HeldOutTokens tokens = univ::held_out_tokens(models[0], data, f.tokens, slice.shard, batch);
  if (mpi.root())
    std::cerr << "correlate: " << models.size() << " models, " << tokens.total_tokens << " tokens of "
              << tokens.description.value("source", "") << ", site " << f.site
              << (mpi.size() > 1 ? ", " + std::to_string(mpi.size()) + " processes" : "") << '\n';
  std::vector<univ::NeuronShape> shapes;
  for (const auto& m : models) shapes.push_back(m.shape());
  const auto prepared = prepare_rotations(f, shapes, slice.complete && mpi.root());
  Progress progress(mpi.root());
  univ::StreamResult streamed = univ::stream_statistics(models, tokens, site, batch, std::ref(progress), device);
  // Under mpirun: statistics merged at rank 0, losses weighted by each rank's sequences.
  streamed.stats = mpi.gather_stats(streamed.stats);
  const double sequences = static_cast<double>(tokens.sequences.count());
  std::vector<double> weighted;
  for (double l : streamed.loss) weighted.push_back(l * sequences);
  weighted.push_back(sequences);
  weighted = mpi.sum(weighted);
  if (!mpi.root()) return 0;
  for (size_t m = 0; m < streamed.loss.size(); ++m) streamed.loss[m] = weighted[m] / weighted.back();

  univ::ReportInput input;
  for (const auto& m : models) input.models.push_back(model_info(m));
  input.site = f.site;
  input.data = tokens.description;
  if (slice.complete) input.data["shard"] = "0/1";
  input.data["processes"] = mpi.size();
  input.data["device"] = univ::to_string(device);
  input.loss = streamed.loss;
  input.timings["forward_and_statistics"] = streamed.seconds;
  finish(f, streamed.stats, input, slice.complete, start, prepared.get());
  return 0;
}

int run_merge(const Flags& f) {
  const auto start = Clock::now();
  check_outputs(f, true);
  analysis_options(f);
  if (f.inputs.size() < 1) throw UserError("merge needs statistics files");
  univ::CorrelationStats merged;
  univ::ReportInput input;
  std::set<std::string> shards;
  for (const auto& file : f.inputs) {
    std::map<std::string, std::string> meta;
    univ::CorrelationStats part = univ::CorrelationStats::load(file, &meta);
    nlohmann::json models, data;
    try {
      models = nlohmann::json::parse(meta.at("univ.models"));
      data = nlohmann::json::parse(meta.at("univ.data"));
    } catch (const std::exception&) {
      throw UserError(file + " lacks the description of its models or data");
    }
    auto identity = [](nlohmann::json ms) {  // the same weights, wherever their files lie
      for (auto& m : ms) m.erase("path");
      return ms;
    };
    if (merged.models() == 0) {
      input.models = models;
      input.site = meta.at("univ.site");
      input.data = data;
      merged = std::move(part);
    } else {
      if (identity(models) != identity(input.models))
        throw UserError(file + " holds statistics of other models than " + f.inputs[0]);
      if (meta.at("univ.site") != input.site)
        throw UserError(file + " was taken at site " + meta.at("univ.site") + ", " + f.inputs[0] + " at " + input.site);
      if (data.value("source", "") != input.data.value("source", ""))
        throw UserError(file + " holds tokens of another source than " + f.inputs[0]);
      merged.merge(part);
    }
    if (!shards.insert(data.value("shard", file)).second)
      throw UserError(file + " repeats shard " + data.value("shard", "") + ": its tokens would count twice");
  }
  input.data["shard"] = nlohmann::json(std::vector<std::string>(shards.begin(), shards.end()));
  input.timings["merge"] = seconds_since(start);
  if (!f.save_stats.empty()) {
    merged.save(f.save_stats,
                {{"univ.models", input.models.dump()}, {"univ.site", input.site}, {"univ.data", input.data.dump()}});
  }
  std::cerr << "correlate: merged " << f.inputs.size() << " files, " << merged.count() << " tokens\n";
  report(f, merged, input, start);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGXFSZ, SIG_IGN);  // past a file-size limit a write fails with EFBIG, reported like a full disk
  const univ::MpiSession mpi(argc, argv);
  // Under mpirun an error on one rank must end every rank, and say which rank it was.
  const std::string who = mpi.size() > 1 ? "correlate[rank " + std::to_string(mpi.rank()) + "]" : "correlate";
  auto fail = [&](int code) {
    if (mpi.size() > 1) mpi.abort(code);
    return code;
  };
  CLI::App app{
      "correlate: stream the MLP activations of K >= 2 checkpoints over held-out tokens into correlation "
      "statistics, compare each neuron with its partners against Haar-random rotations of the partners' neurons, "
      "and report the universal neurons beside the counts chance gives.\n"
      "  correlate CHECKPOINT... --out DIR      (files, or train_pair run directories)\n"
      "  correlate --acts a=A.npy --acts b=B.npy --out DIR   (activations dumped elsewhere)\n"
      "  correlate merge STATS... --out DIR    (statistics saved with --save-stats, e.g. from --shard runs)"};
  Flags flags;
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.add_option("checkpoints", flags.inputs, "checkpoints, or run directories");
  add_analysis_flags(app, flags);
  app.add_option("--tokens", flags.tokens, "held-out tokens to process (default: the test split)");
  app.add_option("--site", flags.site, "pre (after the first MLP linear layer) or post (after the activation)")
      ->capture_default_str();
  app.add_option("--data", flags.data, "another token source (as train_pair's --data); default: the models' data");
  app.add_option("--vocab", flags.vocab, "vocabulary of --data (as train_pair's --vocab)");
  app.add_option("--data-seed", flags.data_seed, "seed of --data (as train_pair's --data-seed)")->capture_default_str();
  app.add_option("--batch", flags.batch, "sequences per forward chunk (default: 64 on the CPU, 512 on the GPU)");
  app.add_option("--shard", flags.shard, "process shard I of N of the tokens (with --save-stats; merge later)")
      ->capture_default_str();
  app.add_option("--acts", flags.acts,
                 "NAME=FILE[,FILE...]: one model's activations from elsewhere, instead of checkpoints (repeat per "
                 "model): .npy (float32/float16) or .safetensors[:TENSOR] (F32/F16/BF16) shaped [tokens, neurons], "
                 "one file per layer or one file split by --layers")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--layers", flags.layers, "layer map of single-file --acts: sizes like 256,256 or 2x256");
  CLI::App* merge = app.add_subcommand("merge", "merge statistics files and report on their union");
  Flags merge_flags;
  merge->add_option("stats", merge_flags.inputs, "statistics files")->required();
  add_analysis_flags(*merge, merge_flags);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << who << ": error: " << e.what() << " (see --help)\n";
    return fail(2);
  }
  try {
    if (merge->parsed()) {
      if (mpi.size() > 1) throw UserError("correlate merge runs in one process, not under mpirun");
      return run_merge(merge_flags);
    }
    return run_stream(flags, app, mpi);
  } catch (const UserError& e) {
    std::cerr << who << ": error: " << e.what() << '\n';
    return fail(1);
  } catch (const fs::filesystem_error& e) {
    std::cerr << who << ": error: " << e.code().message() << ": " << e.path1().string() << '\n';
    return fail(1);
  } catch (const std::bad_alloc&) {
    std::cerr << who << ": error: out of memory\n";
    return fail(1);
  } catch (const std::exception& e) {
    std::cerr << who << ": internal error: " << e.what() << '\n';
    return fail(3);
  }
}
