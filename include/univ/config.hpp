// Model, optimizer and run configuration: plain structs, their checks, their JSON form.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace univ {

enum class Activation { relu, gelu };
enum class PosEncoding { learned, sinusoidal };

std::string to_string(Activation a);
std::string to_string(PosEncoding p);
Activation parse_activation(const std::string& name);  // throws UserError
PosEncoding parse_pos_encoding(const std::string& name);

// Pre-LN GPT: embedding + positions, `layers` blocks of attention and MLP, final LN,
// untied projection to the vocabulary.
struct ModelConfig {
  int vocab = 0;  // set from the data
  int seq_len = 32;
  int d_model = 64;
  int heads = 4;
  int d_mlp = 256;
  int layers = 2;
  Activation activation = Activation::relu;
  PosEncoding pos = PosEncoding::learned;

  int head_dim() const { return d_model / heads; }
  void validate() const;  // throws UserError naming the bad field
  bool operator==(const ModelConfig&) const = default;
};

// AdamW (decoupled weight decay, PyTorch's update), linear warmup, cosine decay to
// min_lr_ratio * lr, global-norm clipping per model.
struct OptimConfig {
  double lr = 1e-3;
  double weight_decay = 0.01;
  double clip = 1.0;  // <= 0: no clipping
  int64_t warmup = 50;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double min_lr_ratio = 0.1;

  void validate() const;
  bool operator==(const OptimConfig&) const = default;
};

// Learning rate of update number `step` (0-based) out of `total_steps`.
double learning_rate(const OptimConfig& optim, int64_t step, int64_t total_steps);

// Where the tokens come from: "synthetic:NAME" or a file path (.npy: tokens, else text bytes).
struct DataSpec {
  std::string source = "synthetic:markov";
  int vocab = 0;           // 0: the source's own (synthetic default, 256 for text, max id + 1 for tokens)
  uint64_t seed = 0;       // language (synthetic) and split seed
  int64_t test_samples = 1000;
  bool operator==(const DataSpec&) const = default;
};

// One training run of `models` models side by side.
struct RunConfig {
  ModelConfig model;
  OptimConfig optim;
  DataSpec data;
  int models = 2;
  std::vector<uint64_t> seeds;  // one per model (init seeds)
  int64_t samples = 10000;      // training sequences per model
  int batch = 64;
  int epochs = 5;
  int64_t steps = 0;  // total updates; 0 = epochs * (samples / batch)
  bool same_init = false;
  bool same_data = false;

  int64_t steps_per_epoch() const { return samples / batch; }
  int64_t total_steps() const { return steps > 0 ? steps : epochs * steps_per_epoch(); }
  uint64_t init_seed(int index) const { return seeds.at(same_init ? 0 : index); }
  int data_partition(int index) const { return same_data ? 0 : index; }
  int partitions() const { return same_data ? 1 : models; }
  void validate() const;
  bool operator==(const RunConfig&) const = default;
};

nlohmann::json to_json(const ModelConfig& c);
nlohmann::json to_json(const OptimConfig& c);
nlohmann::json to_json(const DataSpec& c);
nlohmann::json to_json(const RunConfig& c);
ModelConfig model_config_from_json(const nlohmann::json& j);
RunConfig run_config_from_json(const nlohmann::json& j);

}  // namespace univ
