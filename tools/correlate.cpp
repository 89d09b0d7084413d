// correlate: stream the MLP activations of K >= 2 checkpoints over held-out tokens
// into correlation statistics, compare against Haar-rotation baselines and null
// models, and report the universal neurons (neurons.csv, summary.json, report.html).
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <set>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "univ/activations.hpp"
#include "univ/analysis.hpp"
#include "univ/backend.hpp"
#include "univ/correlate.hpp"
#include "univ/error.hpp"
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
  std::string match = "index", scope = "layer";
  univ::AnalysisOptions analysis;
  // streaming only
  std::string site = "pre", device = "auto", shard = "0/1";
  std::string data;
  int vocab = 0;
  uint64_t data_seed = 0;
  int64_t tokens = 0;
  int batch = 64;
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

univ::AnalysisOptions analysis_options(const Flags& f) {
  univ::AnalysisOptions o = f.analysis;
  o.match = univ::parse_match_mode(f.match);
  o.scope = univ::parse_match_scope(f.scope);
  o.validate();
  return o;
}

void report(const Flags& f, const univ::CorrelationStats& stats, univ::ReportInput input, Clock::time_point start) {
  const auto t0 = Clock::now();
  const univ::Analysis analysis = univ::analyze(stats, analysis_options(f));
  input.timings["analysis"] = seconds_since(t0);
  input.analysis = &analysis;
  input.timings["total"] = seconds_since(start);  // writing the report takes milliseconds
  univ::write_report(f.out, input);
  std::printf("%s\n", analysis.verdict.c_str());
  std::printf("report: %s\n", (fs::path(f.out) / "report.html").string().c_str());
}

// Saves the statistics when asked, and reports unless this is one shard of several.
void finish(const Flags& f, const univ::CorrelationStats& stats, const univ::ReportInput& input, bool full_run,
            Clock::time_point start) {
  if (!f.save_stats.empty()) {
    stats.save(f.save_stats,
               {{"univ.models", input.models.dump()}, {"univ.site", input.site}, {"univ.data", input.data.dump()}});
    std::cerr << "correlate: statistics of " << stats.count() << " tokens saved to " << f.save_stats << '\n';
  }
  if (full_run) report(f, stats, input, start);
}

// A live line on a terminal, a line per tenth otherwise.
class Progress {
 public:
  void operator()(const univ::StreamProgress& p) {
    const bool last = p.tokens_done == p.tokens_total;
    const int tenth = static_cast<int>(10 * p.tokens_done / std::max<int64_t>(p.tokens_total, 1));
    if (!tty_ && !last && tenth == last_tenth_) return;
    last_tenth_ = tenth;
    char line[160];
    const double seconds = std::max(p.seconds, 1e-9);
    int used = std::snprintf(line, sizeof line, "tokens %lld/%lld | %.1fk tokens/s", static_cast<long long>(p.tokens_done),
                             static_cast<long long>(p.tokens_total), static_cast<double>(p.tokens_done) / seconds / 1000);
    if (p.bytes_read > 0) std::snprintf(line + used, sizeof line - used, " | %.2f GB/s read", p.bytes_read / seconds / 1e9);
    if (tty_) std::cerr << "\r\033[K" << line << (last ? "\n" : "") << std::flush;
    else std::cerr << line << '\n';
  }

 private:
  bool tty_ = isatty(STDERR_FILENO);
  int last_tenth_ = -1;
};

// Streams --acts files instead of running checkpoints.
int run_activation_files(const Flags& f, const CLI::App& app, univ::Shard shard, Clock::time_point start) {
  if (!f.inputs.empty()) throw UserError("give checkpoints or --acts, not both");
  for (const char* flag : {"--site", "--data", "--vocab", "--data-seed", "--tokens", "--batch"})
    if (app.count(flag) > 0) throw UserError(std::string(flag) + " applies to checkpoints, not to --acts");
  const bool full_run = shard.count == 1;
  if (!full_run && f.save_stats.empty())
    throw UserError("--shard needs --save-stats FILE: a shard's statistics are merged later with 'correlate merge'");
  check_outputs(f, full_run);
  if (full_run) analysis_options(f);
  const std::vector<int> sizes = f.layers.empty() ? std::vector<int>{} : univ::parse_layer_sizes(f.layers);
  std::vector<univ::ActivationModel> models;
  for (const auto& a : f.acts) models.push_back(univ::open_activation_model(a, sizes));
  const int64_t tokens = univ::common_tokens(models);
  std::cerr << "correlate: " << models.size() << " models, " << tokens << " tokens of activation files\n";
  Progress progress;
  const univ::StreamResult streamed =
      univ::stream_activation_statistics(models, shard, kActivationChunk, std::ref(progress));

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
                {"shard", std::to_string(shard.index) + "/" + std::to_string(shard.count)}};
  input.timings["read_and_statistics"] = streamed.seconds;
  input.timings["read_gigabytes_per_second"] = streamed.bytes_read / std::max(streamed.seconds, 1e-9) / 1e9;
  std::cerr << "correlate: read " << streamed.bytes_read / 1e9 << " GB at "
            << streamed.bytes_read / std::max(streamed.seconds, 1e-9) / 1e9 << " GB/s\n";
  finish(f, streamed.stats, input, full_run, start);
  return 0;
}

int run_stream(const Flags& f, const CLI::App& app) {
  const auto start = Clock::now();
  const univ::Shard shard = univ::Shard::parse(f.shard);
  if (!f.acts.empty()) return run_activation_files(f, app, shard, start);
  const bool full_run = shard.count == 1;
  if (!full_run && f.save_stats.empty())
    throw UserError("--shard needs --save-stats FILE: a shard's statistics are merged later with 'correlate merge'");
  check_outputs(f, full_run);
  if (full_run) analysis_options(f);  // bad analysis flags fail before the streaming
  if (f.batch < 1) throw UserError("--batch must be positive");
  const univ::Site site = univ::parse_site(f.site);
  univ::resolve_device(f.device);

  std::vector<fs::path> paths(f.inputs.begin(), f.inputs.end());
  const std::vector<univ::LoadedModel> models = univ::load_models(paths);
  std::optional<univ::DataSpec> data;
  if (!f.data.empty()) data = univ::DataSpec{f.data, f.vocab, f.data_seed, models[0].checkpoint.run.data.test_samples};
  const univ::HeldOutTokens tokens = univ::held_out_tokens(models[0], data, f.tokens, shard);
  std::cerr << "correlate: " << models.size() << " models, " << tokens.tokens << " tokens of "
            << tokens.description.value("source", "") << ", site " << f.site << '\n';
  Progress progress;
  const univ::StreamResult streamed =
      univ::stream_statistics(models, tokens, site, f.batch, std::ref(progress));

  univ::ReportInput input;
  for (const auto& m : models) input.models.push_back(model_info(m));
  input.site = f.site;
  input.data = tokens.description;
  input.loss = streamed.loss;
  input.timings["forward_and_statistics"] = streamed.seconds;
  finish(f, streamed.stats, input, full_run, start);
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
  app.add_option("--batch", flags.batch, "sequences per forward chunk")->capture_default_str();
  app.add_option("--device", flags.device, "auto, cpu or cuda")->capture_default_str();
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
    std::cerr << "correlate: error: " << e.what() << " (see --help)\n";
    return 2;
  }
  try {
    return merge->parsed() ? run_merge(merge_flags) : run_stream(flags, app);
  } catch (const UserError& e) {
    std::cerr << "correlate: error: " << e.what() << '\n';
    return 1;
  } catch (const fs::filesystem_error& e) {
    std::cerr << "correlate: error: " << e.code().message() << ": " << e.path1().string() << '\n';
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "correlate: error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "correlate: internal error: " << e.what() << '\n';
    return 3;
  }
}
