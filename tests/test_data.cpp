// Data sources, splits and batches: determinism, disjointness, bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "test_util.hpp"
#include "univ/data.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"

namespace univ {
namespace {

using testing::expect_user_error;
using testing::TempDir;

RunConfig small_run(const std::string& source, int models = 2) {
  RunConfig c;
  c.data.source = source;
  c.data.test_samples = 50;
  c.models = models;
  c.seeds = {1, 2, 3};
  c.seeds.resize(models);
  c.samples = 40;
  c.batch = 8;
  c.model.seq_len = 6;
  return c;
}

DataSplits splits_for(RunConfig& c, DataSource& src) {
  c.model.vocab = src.vocab();
  return make_splits(src, c);
}

std::set<std::vector<int32_t>> rows(const Sequences& s) {
  std::set<std::vector<int32_t>> out;
  for (int64_t i = 0; i < s.count(); ++i) out.emplace(s.row(i), s.row(i) + s.length);
  return out;
}

TEST(Data, SyntheticSplitsAreDeterministicDisjointAndInVocabulary) {
  for (const std::string name : {"synthetic:markov", "synthetic:induction"}) {
    RunConfig c = small_run(name);
    c.model.seq_len = 3;  // short sequences make coincidences with the test split likely: they must be redrawn
    DataSource src = open_data(c.data);
    EXPECT_EQ(src.vocab(), 64);
    const DataSplits a = splits_for(c, src), b = splits_for(c, src);
    EXPECT_EQ(a.test.tokens, b.test.tokens);
    ASSERT_EQ(a.train.size(), 2u);
    EXPECT_EQ(a.train[1].tokens, b.train[1].tokens);
    EXPECT_NE(a.train[0].tokens, a.train[1].tokens);
    const auto test_rows = rows(a.test);
    for (const auto& part : a.train) {
      EXPECT_EQ(part.count(), c.samples);
      for (int64_t i = 0; i < part.count(); ++i)
        EXPECT_FALSE(test_rows.contains(std::vector<int32_t>(part.row(i), part.row(i) + part.length))) << name;
      for (int32_t t : part.tokens) ASSERT_TRUE(t >= 0 && t < 64);
    }
  }
}

TEST(Data, SameDataGivesOnePartition) {
  RunConfig c = small_run("synthetic:markov");
  c.same_data = true;
  DataSource src = open_data(c.data);
  EXPECT_EQ(splits_for(c, src).train.size(), 1u);
}

TEST(Data, MarkovLanguageIsLearnable) {
  // The bigram conditional entropy must lie well below the unigram entropy.
  RunConfig c = small_run("synthetic:markov");
  c.samples = 4000;
  c.model.seq_len = 32;
  DataSource src = open_data(c.data);
  const DataSplits s = splits_for(c, src);
  std::map<std::pair<int, int>, double> pairs;
  std::map<int, double> firsts;
  double n = 0;
  for (int64_t i = 0; i < s.train[0].count(); ++i)
    for (int t = 1; t < s.train[0].length; ++t, ++n) {
      ++pairs[{s.train[0].row(i)[t - 1], s.train[0].row(i)[t]}];
      ++firsts[s.train[0].row(i)[t - 1]];
    }
  double conditional = 0;
  for (const auto& [ab, count] : pairs) conditional -= count / n * std::log(count / firsts[ab.first]);
  const double unigram = unigram_entropy(s.train[0], 64);
  EXPECT_GT(unigram, 3.5);
  EXPECT_LT(conditional, unigram - 1.5);
}

TEST(Data, InductionLanguageRepeatsEarlierSpansAfterMarkers) {
  RunConfig c = small_run("synthetic:induction");
  c.model.seq_len = 64;
  c.samples = 200;
  DataSource src = open_data(c.data);
  const DataSplits s = splits_for(c, src);
  int markers = 0;
  for (int64_t i = 0; i < s.train[0].count(); ++i) {
    const int32_t* r = s.train[0].row(i);
    for (int t = 0; t + 4 < s.train[0].length; ++t) {
      if (r[t] != 63) continue;
      ++markers;
      bool found = false;  // the 3 tokens after the marker occur earlier in the sequence
      for (int src_pos = 0; src_pos + 3 <= t && !found; ++src_pos)
        found = r[src_pos] == r[t + 1] && r[src_pos + 1] == r[t + 2] && r[src_pos + 2] == r[t + 3];
      EXPECT_TRUE(found);
    }
  }
  EXPECT_GT(markers, 100);
}

TEST(Data, CorpusWindowsAreDealtOutOnce) {
  TempDir dir;
  // Token i at position i: every window is recognisable by its first token.
  const int64_t n = 7 * 200;
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = i;
  write_file_durable(dir / "tokens.npy",
                     npy_bytes("<i8", {n}, {reinterpret_cast<const char*>(ids.data()), size_t(n) * 8}));
  RunConfig c = small_run((dir / "tokens.npy").string(), 3);
  DataSource src = open_data(c.data);
  EXPECT_EQ(src.vocab(), n);
  EXPECT_EQ(src.kind, DataSource::Kind::tokens);
  const DataSplits s = splits_for(c, src);
  std::set<int32_t> starts;
  int64_t total = 0;
  for (const Sequences* part : {&s.test, &s.train[0], &s.train[1], &s.train[2]})
    for (int64_t i = 0; i < part->count(); ++i, ++total) {
      const int32_t* r = part->row(i);
      EXPECT_EQ(r[0] % 7, 0);
      for (int t = 1; t < 7; ++t) EXPECT_EQ(r[t], r[0] + t);
      starts.insert(r[0]);
    }
  EXPECT_EQ(total, 50 + 3 * 40);
  EXPECT_EQ(static_cast<int64_t>(starts.size()), total);
}

TEST(Data, TextFilesAreBytes) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 2000; ++i) text += static_cast<char>(i % 256);
  write_file_durable(dir / "corpus.txt", text);
  RunConfig c = small_run((dir / "corpus.txt").string());
  c.data.test_samples = 10;
  DataSource src = open_data(c.data);
  EXPECT_EQ(src.vocab(), 256);
  EXPECT_EQ(src.corpus[200], 200);  // bytes above 127 stay positive
  EXPECT_EQ(src.describe().at("bytes"), 2000);
  EXPECT_EQ(src.describe().at("fnv1a64"), hex64(fnv1a64(text)));
}

TEST(Data, NpyIntegerDtypesAreRead) {
  const std::vector<int16_t> v16{3, -1, 7};
  const auto i16 = npy_integers(npy_bytes("<i2", {3}, {reinterpret_cast<const char*>(v16.data()), 6}), "x");
  EXPECT_EQ(i16, (std::vector<int64_t>{3, -1, 7}));
  const std::vector<uint8_t> v8{200, 1};
  const auto u8 = npy_integers(npy_bytes("|u1", {2, 1}, {reinterpret_cast<const char*>(v8.data()), 2}), "x");
  EXPECT_EQ(u8, (std::vector<int64_t>{200, 1}));
  EXPECT_THROW(npy_integers(npy_bytes("<f4", {1}, std::string(4, '\0')), "x"), UserError);
  EXPECT_THROW(npy_integers(npy_bytes("<i4", {4}, std::string(8, '\0')), "x"), UserError);  // truncated
}

TEST(Data, BadSourcesGiveClearErrors) {
  TempDir dir;
  write_file_durable(dir / "empty.txt", "");
  write_file_durable(dir / "short.txt", "abc");
  const std::vector<int32_t> ids{1, 2, 99};
  write_file_durable(dir / "ids.npy", npy_bytes("<i4", {3}, {reinterpret_cast<const char*>(ids.data()), 12}));
  const std::vector<int32_t> neg{1, -2};
  write_file_durable(dir / "neg.npy", npy_bytes("<i4", {2}, {reinterpret_cast<const char*>(neg.data()), 8}));

  DataSpec spec;
  spec.source = (dir / "missing.txt").string();
  expect_user_error([&] { open_data(spec); }, "No such file");
  spec.source = (dir / "empty.txt").string();
  expect_user_error([&] { open_data(spec); }, "is empty");
  spec.source = "synthetic:nonsense";
  expect_user_error([&] { open_data(spec); }, "unknown synthetic language");
  spec.source = (dir / "ids.npy").string();
  spec.vocab = 50;
  expect_user_error([&] { open_data(spec); }, "token id 99 at position 2 is outside the vocabulary of 50");
  spec.vocab = 0;
  spec.source = (dir / "neg.npy").string();
  expect_user_error([&] { open_data(spec); }, "is negative");
  spec.source = dir.path().string();
  expect_user_error([&] { open_data(spec); }, "is a directory");

  RunConfig c = small_run((dir / "short.txt").string());
  DataSource src = open_data(c.data);
  expect_user_error([&] { splits_for(c, src); }, "fewer than one sequence");
  std::string longer(7 * 100, 'x');
  write_file_durable(dir / "longer.txt", longer);
  c = small_run((dir / "longer.txt").string());
  DataSource src2 = open_data(c.data);
  expect_user_error([&] { splits_for(c, src2); }, "lower --samples or --test-samples, or pass --same-data");
}

TEST(Data, BatchesArePureFunctionsOfTheStepAndCoverEachEpoch) {
  RunConfig c = small_run("synthetic:markov");
  DataSource src = open_data(c.data);
  const DataSplits s = splits_for(c, src);
  const int T = c.model.seq_len, B = c.batch;
  const int64_t per_step = int64_t(c.models) * B * T;
  std::vector<int32_t> in(per_step), tg(per_step), in2(per_step), tg2(per_step);
  BatchSampler walker(c, s);
  std::multiset<std::vector<int32_t>> seen;
  for (int64_t step = 0; step < 2 * c.steps_per_epoch(); ++step) {
    walker.fill(step, in.data(), tg.data());
    BatchSampler fresh(c, s);
    fresh.fill(step, in2.data(), tg2.data());
    ASSERT_EQ(in, in2);
    ASSERT_EQ(tg, tg2);
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t + 1 < T; ++t) EXPECT_EQ(tg[b * T + t], in[b * T + t + 1]);  // targets are the next tokens
      if (step < c.steps_per_epoch()) seen.emplace(in.begin() + b * T, in.begin() + (b + 1) * T);
    }
  }
  // Epoch 0 of model 0 visits steps_per_epoch * B distinct samples of its partition.
  EXPECT_EQ(seen.size(), size_t(c.steps_per_epoch() * B));
  std::set<std::vector<int32_t>> distinct(seen.begin(), seen.end());
  EXPECT_EQ(distinct.size(), seen.size());
}

}  // namespace
}  // namespace univ
