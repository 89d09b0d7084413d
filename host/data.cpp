// Data sources, disjoint train/test splits and the per-step batches.
#include "univ/data.hpp"

#include <algorithm>
#include <cmath>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"

namespace univ {

namespace {

constexpr std::string_view kSyntheticPrefix = "synthetic:";
constexpr int kByteVocab = 256;

bool is_npy(const std::string& path) { return path.size() >= 4 && path.compare(path.size() - 4, 4, ".npy") == 0; }

void open_text(DataSource& src, const std::string& file) {
  if (src.spec.vocab != 0 && src.spec.vocab != kByteVocab)
    throw UserError("text files are read as bytes (vocabulary 256); --vocab " + std::to_string(src.spec.vocab) +
                    " does not apply");
  src.kind = DataSource::Kind::text;
  src.spec.vocab = kByteVocab;
  src.corpus.assign(file.begin(), file.end());
  for (auto& t : src.corpus) t &= 0xff;  // char may be signed
}

void open_tokens(DataSource& src, const std::string& file) {
  const std::vector<int64_t> ids = npy_integers(file, src.spec.source);
  if (ids.empty()) throw UserError(src.spec.source + " holds no tokens");
  const auto [lo, hi] = std::minmax_element(ids.begin(), ids.end());
  if (*lo < 0)
    throw UserError(src.spec.source + ": token id " + std::to_string(*lo) + " at position " +
                    std::to_string(lo - ids.begin()) + " is negative");
  if (src.spec.vocab == 0) {
    if (*hi >= (int64_t(1) << 30)) throw UserError(src.spec.source + ": token id " + std::to_string(*hi) + " is too large");
    src.spec.vocab = static_cast<int>(*hi + 1);
  } else if (*hi >= src.spec.vocab) {
    throw UserError(src.spec.source + ": token id " + std::to_string(*hi) + " at position " +
                    std::to_string(hi - ids.begin()) + " is outside the vocabulary of " +
                    std::to_string(src.spec.vocab) + " (--vocab)");
  }
  src.kind = DataSource::Kind::tokens;
  src.corpus.assign(ids.begin(), ids.end());
}

// The first `count` entries of a uniformly random permutation of [0, n), in O(count)
// memory (Fisher-Yates with the displaced entries kept in a map).
std::vector<int64_t> random_prefix_permutation(int64_t n, int64_t count, PhiloxStream& rng) {
  std::unordered_map<int64_t, int64_t> moved;
  auto value_at = [&](int64_t i) {
    auto it = moved.find(i);
    return it == moved.end() ? i : it->second;
  };
  std::vector<int64_t> out(count);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng.next_below(n - i));
    out[i] = value_at(j);
    moved[j] = value_at(i);
  }
  return out;
}

// The first `count` windows of L tokens of a corpus in the split's random order.
std::vector<int64_t> window_order(const DataSource& src, int L, int64_t count) {
  PhiloxStream rng(src.spec.seed, rng_stream(RngPurpose::split, 0));
  return random_prefix_permutation(static_cast<int64_t>(src.corpus.size()) / L, count, rng);
}

Sequences windows_at(const DataSource& src, int L, const std::vector<int64_t>& order, int64_t first, int64_t count) {
  Sequences s{L, {}};
  s.tokens.reserve(count * L);
  for (int64_t i = first; i < first + count; ++i) {
    const auto begin = src.corpus.begin() + order[i] * L;
    s.tokens.insert(s.tokens.end(), begin, begin + L);
  }
  return s;
}

Sequences synthetic_test_sequences(const DataSource& src, int L, int64_t first, int64_t count) {
  Sequences s{L, std::vector<int32_t>(count * L)};
  for (int64_t i = 0; i < count; ++i) {
    PhiloxStream rng(src.spec.seed, rng_stream(RngPurpose::test_sample, 0, static_cast<uint32_t>(first + i)));
    src.language->sample(rng, s.tokens.data() + i * L, L);
  }
  return s;
}

DataSplits corpus_splits(const DataSource& src, const RunConfig& config) {
  const int L = config.model.seq_len + 1;
  const int64_t windows = static_cast<int64_t>(src.corpus.size()) / L;
  const int64_t test = config.data.test_samples, per_partition = config.samples;
  const int64_t needed = test + per_partition * config.partitions();
  if (windows == 0)
    throw UserError(src.spec.source + " holds " + std::to_string(src.corpus.size()) +
                    " tokens, fewer than one sequence of " + std::to_string(L) + " (--seq-len + 1)");
  if (windows < needed)
    throw UserError(src.spec.source + " holds " + std::to_string(windows) + " sequences of " + std::to_string(L) +
                    " tokens; " + std::to_string(config.partitions()) + " x " + std::to_string(per_partition) +
                    " training samples + " + std::to_string(test) +
                    " test samples need " + std::to_string(needed) +
                    ": lower --samples or --test-samples, or pass --same-data");
  const std::vector<int64_t> picked = window_order(src, L, needed);
  auto take = [&](int64_t first, int64_t count) { return windows_at(src, L, picked, first, count); };
  DataSplits splits;
  splits.test = take(0, test);
  for (int p = 0; p < config.partitions(); ++p) splits.train.push_back(take(test + p * per_partition, per_partition));
  return splits;
}

DataSplits synthetic_splits(const DataSource& src, const RunConfig& config) {
  const int L = config.model.seq_len + 1;
  const uint64_t seed = src.spec.seed;
  DataSplits splits;
  splits.test = synthetic_test_sequences(src, L, 0, config.data.test_samples);
  std::unordered_set<std::string_view> test_set;
  for (int64_t i = 0; i < config.data.test_samples; ++i)
    test_set.emplace(reinterpret_cast<const char*>(splits.test.row(i)), L * sizeof(int32_t));
  for (int p = 0; p < config.partitions(); ++p) {
    Sequences s{L, std::vector<int32_t>(config.samples * L)};
    for (int64_t i = 0; i < config.samples; ++i) {
      int32_t* row = s.tokens.data() + i * L;
      for (uint64_t attempt = 0;; ++attempt) {  // redraw the (rare) copies of a test sequence
        PhiloxStream rng(seed, rng_stream(RngPurpose::train_sample, p, static_cast<uint32_t>(i)), attempt << 32);
        src.language->sample(rng, row, L);
        if (!test_set.contains(std::string_view(reinterpret_cast<const char*>(row), L * sizeof(int32_t)))) break;
      }
    }
    splits.train.push_back(std::move(s));
  }
  return splits;
}

}  // namespace

nlohmann::json DataSource::describe() const {
  nlohmann::json j = to_json(spec);
  if (kind != Kind::synthetic) {
    j["bytes"] = file_bytes;
    j["fnv1a64"] = file_fnv1a64;
  }
  return j;
}

DataSource open_data(const DataSpec& spec) {
  DataSource src;
  src.spec = spec;
  if (spec.vocab < 0) throw UserError("--vocab must be positive (got " + std::to_string(spec.vocab) + ")");
  if (spec.source.starts_with(kSyntheticPrefix)) {
    const std::string name = spec.source.substr(kSyntheticPrefix.size());
    if (src.spec.vocab == 0) src.spec.vocab = default_synthetic_vocab();
    src.language = make_language(name, src.spec.vocab, spec.seed);
    src.kind = DataSource::Kind::synthetic;
    return src;
  }
  if (spec.source.empty()) throw UserError("--data is empty");
  const std::string file = read_file(spec.source);
  if (file.empty()) throw UserError(spec.source + " is empty");
  src.file_bytes = file.size();
  src.file_fnv1a64 = hex64(fnv1a64(file));
  if (is_npy(spec.source)) {
    open_tokens(src, file);
  } else {
    open_text(src, file);
  }
  return src;
}

int64_t corpus_windows(const DataSource& source, int seq_len) {
  return static_cast<int64_t>(source.corpus.size()) / (seq_len + 1);
}

Sequences test_sequences(const DataSource& source, int seq_len, int64_t first, int64_t count) {
  const int L = seq_len + 1;
  if (source.kind == DataSource::Kind::synthetic) return synthetic_test_sequences(source, L, first, count);
  if (first + count > corpus_windows(source, seq_len))
    throw std::invalid_argument("test_sequences: more windows than the corpus holds");
  return windows_at(source, L, window_order(source, L, first + count), first, count);
}

DataSplits make_splits(const DataSource& source, const RunConfig& config) {
  if (config.model.vocab != source.vocab())
    throw std::invalid_argument("make_splits: model vocabulary differs from the data's");
  return source.kind == DataSource::Kind::synthetic ? synthetic_splits(source, config) : corpus_splits(source, config);
}

BatchSampler::BatchSampler(const RunConfig& config, const DataSplits& splits)
    : config_(config), splits_(splits), order_(config.partitions()) {}

void BatchSampler::fill(int64_t step, int32_t* inputs, int32_t* targets) {
  const int64_t per_epoch = config_.steps_per_epoch();
  const int64_t epoch = step / per_epoch, slot = step % per_epoch;
  if (epoch != epoch_) {
    for (int p = 0; p < config_.partitions(); ++p) {
      PhiloxStream rng(config_.data.seed,
                       rng_stream(RngPurpose::shuffle, static_cast<uint32_t>(p), static_cast<uint32_t>(epoch)));
      order_[p] = random_prefix_permutation(config_.samples, config_.samples, rng);
    }
    epoch_ = epoch;
  }
  const int B = config_.batch, T = config_.model.seq_len;
  for (int m = 0; m < config_.models; ++m) {
    const int p = config_.data_partition(m);
    for (int b = 0; b < B; ++b) {
      const int64_t out = (int64_t(m) * B + b) * T;
      split_inputs_targets(splits_.train[p].row(order_[p][slot * B + b]), 1, T, inputs + out, targets + out);
    }
  }
}

void split_inputs_targets(const int32_t* sequences, int64_t n, int seq_len, int32_t* inputs, int32_t* targets) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* s = sequences + i * (seq_len + 1);
    std::copy(s, s + seq_len, inputs + i * seq_len);
    std::copy(s + 1, s + seq_len + 1, targets + i * seq_len);
  }
}

double unigram_entropy(const Sequences& sequences, int vocab) {
  std::vector<int64_t> counts(vocab);
  int64_t total = 0;
  for (int64_t i = 0; i < sequences.count(); ++i)
    for (int t = 1; t < sequences.length; ++t, ++total) ++counts[sequences.row(i)[t]];
  double h = 0;
  for (int64_t c : counts)
    if (c > 0) {
      const double p = static_cast<double>(c) / static_cast<double>(total);
      h -= p * std::log(p);
    }
  return h;
}

}  // namespace univ
