// correlate end to end: activations gathered right, shards merging into one pass,
// twin models found universal, and every bad input answered by one clear line.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "process.hpp"
#include "test_util.hpp"
#include "univ/analysis.hpp"
#include "univ/correlate.hpp"
#include "univ/cpu/model.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"
#include "univ/train.hpp"

namespace univ {
namespace {

using testing::ProcessResult;
using testing::TempDir;
using testing::tiny_run;
namespace fs = std::filesystem;

const std::string kCorrelate = UNIV_CORRELATE;

TEST(Correlate, StatisticsAreThoseOfTheGatheredActivations) {
  TempDir dir;
  train(tiny_run(dir.path()), {});
  const auto models = load_models({dir.path()});
  ASSERT_EQ(models.size(), 2u);
  const HeldOutTokens tokens = held_out_tokens(models[0], std::nullopt, 0, {});
  EXPECT_EQ(tokens.tokens, 300 * 8);
  for (Site site : {Site::pre, Site::post}) {
    const StreamResult r = stream_statistics(models, tokens, site, 7, {});  // 7: the last batch is partial
    ASSERT_EQ(r.stats.count(), 2400);
    // Reference: one forward over all sequences at once, then two-pass Pearson.
    std::vector<std::vector<double>> acts(2, std::vector<double>(2400 * 48));
    for (int m = 0; m < 2; ++m) {
      cpu::Model<double> net(models[m].checkpoint.run.model, 1, 300);
      net.params().assign(models[m].checkpoint.params.begin(), models[m].checkpoint.params.end());
      std::vector<int32_t> in(2400), tg(2400);
      split_inputs_targets(tokens.sequences.tokens.data(), 300, 8, in.data(), tg.data());
      double loss = 0;
      net.forward(in.data(), tg.data(), 300, &loss, false);
      EXPECT_NEAR(loss, r.loss[m], 1e-5);
      for (int l = 0; l < 2; ++l) {
        const double* a = site == Site::pre ? net.mlp_pre(l) : net.mlp_post(l);
        for (int64_t t = 0; t < 2400; ++t)
          for (int k = 0; k < 24; ++k) acts[m][t * 48 + l * 24 + k] = a[t * 24 + k];
      }
    }
    const std::vector<double> corr = correlation_matrix(r.stats, 0, 1);
    for (int a : {0, 5, 30, 47})
      for (int b : {1, 24, 40}) {
        double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
        for (int64_t t = 0; t < 2400; ++t) ma += acts[0][t * 48 + a] / 2400, mb += acts[1][t * 48 + b] / 2400;
        for (int64_t t = 0; t < 2400; ++t) {
          const double da = acts[0][t * 48 + a] - ma, db = acts[1][t * 48 + b] - mb;
          sab += da * db, saa += da * da, sbb += db * db;
        }
        const double ref = saa > 0 && sbb > 0 ? sab / std::sqrt(saa * sbb) : 0.0;
        EXPECT_NEAR(corr[a * 48 + b], ref, 2e-5) << to_string(site) << " " << a << "," << b;
      }
  }
}

TEST(Correlate, ShardsMergeIntoOnePass) {
  TempDir dir;
  train(tiny_run(dir.path()), {});
  const auto models = load_models({dir.path()});
  const StreamResult whole = stream_statistics(models, held_out_tokens(models[0], std::nullopt, 2001, {}), Site::pre,
                                               16, {});
  EXPECT_EQ(whole.stats.count(), 2001);  // the last sequence is cut
  CorrelationStats merged;
  for (int i = 0; i < 3; ++i) {
    const HeldOutTokens part = held_out_tokens(models[0], std::nullopt, 2001, {i, 3}, 16);
    const StreamResult r = stream_statistics(models, part, Site::pre, 16, {});
    if (i == 0) merged = r.stats;
    else merged.merge(r.stats);
  }
  EXPECT_EQ(merged.count(), 2001);
  const auto a = correlation_matrix(merged, 0, 1), b = correlation_matrix(whole.stats, 0, 1);
  for (size_t k = 0; k < a.size(); ++k) ASSERT_NEAR(a[k], b[k], 1e-12);
}

ProcessResult correlate(const TempDir& scratch, const std::vector<std::string>& args) {
  return testing::run_process(kCorrelate, args, scratch.path());
}

TEST(CorrelateCli, TwinModelsAreUniversalUnderIndexMatchingAndBeatChance) {
  TempDir dir;
  TrainOptions o = tiny_run(dir / "twins");
  o.config.same_init = o.config.same_data = true;
  train(o, {});
  const ProcessResult r = correlate(dir, {(dir / "twins").string(), "--out", (dir / "report").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("exceeds what chance gives"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("rotation draws 32/32"), std::string::npos) << r.err;  // 2 directions x (8 + 8)
  const auto summary = nlohmann::json::parse(read_file(dir / "report" / "summary.json"));
  int dead = 0;
  for (const auto& l : summary.at("layers")) dead += l.at("dead").get<int>();
  EXPECT_EQ(summary.at("universal").get<int>() + dead, 2 * 48);
  EXPECT_TRUE(summary.at("exceeds_chance").get<bool>());
  const std::string csv = read_file(dir / "report" / "neurons.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 1 + 2 * 48);
  const std::string html = read_file(dir / "report" / "report.html");
  EXPECT_EQ(std::count(html.begin(), html.end(), '<') > 100, true);
  EXPECT_NE(html.find("<svg"), std::string::npos);
}

TEST(CorrelateCli, ShardedRunsMergeToTheSameReport) {
  TempDir dir;
  train(tiny_run(dir / "run"), {});
  const std::string run = (dir / "run").string();
  ASSERT_EQ(correlate(dir, {run, "--out", (dir / "whole").string(), "--match", "max"}).exit_code, 0);
  for (const char* shard : {"0/2", "1/2"}) {
    const ProcessResult r = correlate(dir, {run, "--shard", shard, "--save-stats",
                                            (dir / (std::string("s") + shard[0] + ".stats")).string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  const ProcessResult merged = correlate(dir, {"merge", (dir / "s0.stats").string(), (dir / "s1.stats").string(),
                                               "--out", (dir / "merged").string(), "--match", "max"});
  ASSERT_EQ(merged.exit_code, 0) << merged.err;
  const auto a = nlohmann::json::parse(read_file(dir / "whole" / "summary.json"));
  const auto b = nlohmann::json::parse(read_file(dir / "merged" / "summary.json"));
  EXPECT_EQ(a.at("tokens"), b.at("tokens"));
  EXPECT_EQ(a.at("universal"), b.at("universal"));
  EXPECT_EQ(a.at("layers"), b.at("layers"));
  // The same shard twice would count its tokens twice.
  const ProcessResult twice = correlate(dir, {"merge", (dir / "s0.stats").string(), (dir / "s0.stats").string(),
                                              "--out", (dir / "bad").string()});
  EXPECT_NE(twice.exit_code, 0);
  EXPECT_NE(twice.err.find("repeats shard 0/2"), std::string::npos) << twice.err;
}

// One line on stderr naming the problem, a non-zero exit, no report files.
void expect_clear_error(const ProcessResult& r, const std::string& fragment, const fs::path& out) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(fragment), std::string::npos) << "stderr: " << r.err;
  EXPECT_FALSE(fs::exists(out / "report.html"));
  EXPECT_FALSE(fs::exists(out / "summary.json"));
}

TEST(CorrelateCli, BadInputs) {
  TempDir dir;
  train(tiny_run(dir / "a"), {});
  TrainOptions wide = tiny_run(dir / "b", 32);
  wide.config.model.seq_len = 12;
  train(wide, {});
  TrainOptions vocab = tiny_run(dir / "c");
  vocab.config.data.vocab = 50;
  train(vocab, {});
  const std::string a0 = (dir / "a" / "model_0.safetensors").string(), a1 = (dir / "a" / "model_1.safetensors").string();
  write_file_durable(dir / "garbage.safetensors", "not a checkpoint at all");
  std::string cut = read_file(a1);
  write_file_durable(dir / "cut.safetensors", cut.substr(0, cut.size() - 100));
  write_file_durable(dir / "a-file", "x");
  const fs::path out = dir / "out";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{a0, (dir / "missing.safetensors").string()}, "no checkpoint"},
      {{a0, (dir / "garbage.safetensors").string()}, "not a valid safetensors file"},
      {{a0, (dir / "cut.safetensors").string()}, "truncated"},
      {{a0}, "at least 2 checkpoints (got 1)"},
      {{a0, (dir / "b" / "model_0.safetensors").string()}, "sequence length"},
      {{a0, (dir / "c" / "model_0.safetensors").string()}, "vocabulary"},
      {{a0, a1, "--threshold", "0"}, "--threshold must lie in (0, 1]"},
      {{a0, a1, "--threshold", "1.5"}, "--threshold must lie in (0, 1]"},
      {{a0, a1, "--match", "best"}, "unknown --match 'best'"},
      {{a0, a1, "--site", "middle"}, "unknown --site 'middle'"},
      {{a0, a1, "--data", (dir / "a-file").string()}, "has vocabulary 256, the models 64"},
      {{a0, (dir / "b" / "model_1.safetensors").string(), "--match", "index"}, "sequence length"},
  };
  for (const auto& [args, fragment] : cases) {
    SCOPED_TRACE(args.back());
    auto full = args;
    full.insert(full.end(), {"--out", out.string()});
    expect_clear_error(correlate(dir, full), fragment, out);
  }
  // Held-out tokens are bounded for files: the test split of the training text.
  std::string text;
  for (int i = 0; i < 40000; ++i) text += static_cast<char>('a' + (i * 7 + i / 13) % 26);
  write_file_durable(dir / "corpus.txt", text);
  TrainOptions on_text = tiny_run(dir / "t");
  on_text.config.data.source = (dir / "corpus.txt").string();
  on_text.config.samples = 100;
  on_text.config.steps = 5;
  train(on_text, {});
  expect_clear_error(correlate(dir, {(dir / "t").string(), "--tokens", "100000", "--out", out.string()}),
                     "is beyond the data", out);
  expect_clear_error(correlate(dir, {(dir / "a").string(), "--out", (dir / "a-file").string()}), "is a file", out);
  expect_clear_error(correlate(dir, {(dir / "a").string(), "--shard", "1/2"}), "--shard needs --save-stats", out);
}

TEST(CorrelateCli, ActivationFiles) {
  TempDir dir;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> a(3000 * 20), b(3000 * 20), c(2000 * 20);
  for (size_t i = 0; i < a.size(); ++i) a[i] = normal(rng), b[i] = a[i] + 0.05f * normal(rng);  // twins
  for (float& x : c) x = normal(rng);
  auto npy = [&](const char* name, const std::vector<float>& v, int64_t rows) {
    write_file_durable(dir / name, npy_bytes("<f4", {rows, 20}, {reinterpret_cast<const char*>(v.data()), v.size() * 4}));
    return (dir / name).string();
  };
  const std::string fa = npy("a.npy", a, 3000), fb = npy("b.npy", b, 3000), fc = npy("c.npy", c, 2000);
  const fs::path out = dir / "out";
  const ProcessResult ok = correlate(dir, {"--acts", "a=" + fa, "--acts", "b=" + fb, "--layers", "2x10", "--out",
                                           out.string()});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.err.find("GB/s"), std::string::npos) << ok.err;
  const auto summary = nlohmann::json::parse(read_file(out / "summary.json"));
  EXPECT_EQ(summary.at("universal").get<int>(), 40);
  EXPECT_EQ(summary.at("tokens").get<int>(), 3000);
  EXPECT_GT(summary.at("timings_seconds").at("read_gigabytes_per_second").get<double>(), 0.0);
  fs::remove_all(out);
  expect_clear_error(correlate(dir, {"--acts", "a=" + fa, "--acts", "c=" + fc, "--out", out.string()}),
                     "a holds 3000 tokens, c 2000", out);
  expect_clear_error(correlate(dir, {"--acts", "a=" + fa, "--acts", "b=" + fb, "--layers", "3x10", "--out",
                                     out.string()}),
                     "the layer map (--layers) 30", out);
  expect_clear_error(correlate(dir, {"--acts", "a=" + fa, "--acts", "b=" + fb, "--site", "post", "--out", out.string()}),
                     "--site applies to checkpoints, not to --acts", out);
}

}  // namespace
}  // namespace univ
