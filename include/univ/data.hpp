// Training and test sequences: data sources, disjoint splits, and batches.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "univ/config.hpp"
#include "univ/synthetic.hpp"

namespace univ {

// Sequences of one length, row-major [count, length].
struct Sequences {
  int length = 0;
  std::vector<int32_t> tokens;
  int64_t count() const { return length ? static_cast<int64_t>(tokens.size()) / length : 0; }
  const int32_t* row(int64_t i) const { return tokens.data() + i * length; }
};

// An opened data source: a synthetic language, or a corpus read from a file.
struct DataSource {
  enum class Kind { synthetic, text, tokens };
  DataSpec spec;  // spec.vocab resolved
  Kind kind = Kind::synthetic;
  std::unique_ptr<SyntheticLanguage> language;  // synthetic
  std::vector<int32_t> corpus;                  // text (bytes) or tokens
  uint64_t file_bytes = 0;
  std::string file_fnv1a64;  // fingerprint of the file, to spot a changed file on resume

  int vocab() const { return spec.vocab; }
  // Source, vocabulary, seed, test split and the file's fingerprint, for checkpoints.
  nlohmann::json describe() const;
};

// Opens `spec.source` ("synthetic:NAME", a .npy token file, or any other file as
// text bytes). UserError for unknown names, unreadable, empty or invalid files,
// token ids outside [0, vocab).
DataSource open_data(const DataSpec& spec);

// Test sequences [first, first + count) of seq_len + 1 tokens: synthetic sources draw
// sequence i from its own stream (so any count works and a prefix never changes),
// corpora take windows in the split's random order (at most all windows). The
// test split of a run is test_sequences(source, seq_len, 0, test_samples).
Sequences test_sequences(const DataSource& source, int seq_len, int64_t first, int64_t count);
int64_t corpus_windows(const DataSource& source, int seq_len);  // 0 for synthetic sources

// The held-out test split and each partition's training sequences, all of
// seq_len + 1 tokens (inputs and next-token targets). Partitions and the test split
// never share a sequence: files are cut into non-overlapping windows dealt out
// once; synthetic training draws that equal a test sequence are redrawn.
struct DataSplits {
  Sequences test;
  std::vector<Sequences> train;  // one per partition
};
DataSplits make_splits(const DataSource& source, const RunConfig& config);

// Deals each model its batch for a step: epoch = step / steps_per_epoch, and every
// epoch visits the partition in a fresh order drawn from (data seed, partition,
// epoch), so a batch is a pure function of the step (bit-exact resume).
class BatchSampler {
 public:
  BatchSampler(const RunConfig& config, const DataSplits& splits);
  // inputs, targets: [models, batch, seq_len]
  void fill(int64_t step, int32_t* inputs, int32_t* targets);

 private:
  const RunConfig& config_;
  const DataSplits& splits_;
  int64_t epoch_ = -1;
  std::vector<std::vector<int64_t>> order_;  // per partition, this epoch
};

// Splits sequences into model inputs and next-token targets: [n, L+1] -> [n, L] twice.
void split_inputs_targets(const int32_t* sequences, int64_t n, int seq_len, int32_t* inputs, int32_t* targets);

// Entropy (nats) of the unigram distribution of the target tokens: the loss of a
// model that ignores context.
double unigram_entropy(const Sequences& sequences, int vocab);

}  // namespace univ
