// The correlate pipeline up to the statistics: checkpoints, held-out tokens, and the
// models' MLP activations streamed chunk by chunk into correlation statistics.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/data.hpp"
#include "univ/stats.hpp"

namespace univ {

// Where a neuron is read: right after the first MLP linear layer (pre, the seed's
// choice) or after the activation (post, the paper's).
enum class Site { pre, post };
std::string to_string(Site s);
Site parse_site(const std::string& name);

struct LoadedModel {
  std::filesystem::path path;
  ModelCheckpoint checkpoint;
  NeuronShape shape() const { return {checkpoint.run.model.layers, checkpoint.run.model.d_mlp}; }
};

// Loads the checkpoints named by `paths` (files, or run directories: all their
// model_<m>.safetensors). UserError for fewer than 2 models, unreadable or corrupt
// files, or models of different vocabularies or sequence lengths.
std::vector<LoadedModel> load_models(const std::vector<std::filesystem::path>& paths);

// The part of the held-out tokens one process handles: shard `index` of `count`.
struct Shard {
  int index = 0, count = 1;
  static Shard parse(const std::string& text);  // "I/N"; UserError when malformed
};

struct HeldOutTokens {
  Sequences sequences;  // seq_len + 1 tokens each; the first seq_len are fed to the models
  int64_t first_token = 0;  // of this shard, within all held-out tokens
  int64_t tokens = 0;       // positions this shard processes (the last sequence may be cut)
  int64_t total_tokens = 0; // of all shards
  nlohmann::json description;
};

// The held-out tokens: by default the test split of the models' data (the one
// train_pair held out); `data` names another source, whose test split is then used
// (a file that is not the training data gives all its windows). `tokens` = 0 takes
// the whole split. UserError when more tokens are asked than the source holds.
// Shards start at multiples of `batch` sequences, so every shard runs exactly the
// batches one process would (a BLAS may round a row differently in a batch of another
// size, and shards are to give the statistics of one run).
HeldOutTokens held_out_tokens(const LoadedModel& first, const std::optional<DataSpec>& data, int64_t tokens,
                              Shard shard, int batch = 1);

// The sequences in batches of at most `batch`: visit(inputs, targets, b, n) with
// inputs and targets [b, seq_len] and n, the batch's tokens that count (the last
// sequence may be cut).
void for_each_batch(const HeldOutTokens& tokens, int batch, int seq_len,
                    const std::function<void(const int32_t*, const int32_t*, int, int64_t)>& visit);

struct StreamProgress {
  int64_t tokens_done = 0, tokens_total = 0;
  double seconds = 0;
  double bytes_read = 0;  // activation files only
};

struct StreamResult {
  CorrelationStats stats;
  std::vector<double> loss;  // each model's mean next-token loss over the sequences (checkpoints only)
  double seconds = 0;
  double bytes_read = 0;     // activation files only
};

// Runs every model forward over the tokens in batches of `batch` sequences and adds
// each batch's activations at `site` to the statistics; no activation tensor larger
// than one batch exists. On the GPU the activations never leave the device.
StreamResult stream_statistics(const std::vector<LoadedModel>& models, const HeldOutTokens& tokens, Site site,
                               int batch, const std::function<void(const StreamProgress&)>& progress,
                               Device device = Device::cpu);

}  // namespace univ
