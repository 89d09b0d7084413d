// Checks and JSON form of the configuration structs.
#include "univ/config.hpp"

#include <cmath>
#include <numbers>

#include <nlohmann/json.hpp>

#include "univ/error.hpp"
#include "univ/json_number.hpp"

namespace univ {

std::string to_string(Activation a) { return a == Activation::relu ? "relu" : "gelu"; }
std::string to_string(PosEncoding p) { return p == PosEncoding::learned ? "learned" : "sinusoidal"; }

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  throw UserError("unknown activation '" + name + "' (expected relu or gelu)");
}

PosEncoding parse_pos_encoding(const std::string& name) {
  if (name == "learned") return PosEncoding::learned;
  if (name == "sinusoidal") return PosEncoding::sinusoidal;
  throw UserError("unknown positional encoding '" + name + "' (expected learned or sinusoidal)");
}

namespace {
void require_positive(int64_t value, const char* name) {
  if (value <= 0) throw UserError(std::string(name) + " must be positive (got " + std::to_string(value) + ")");
}
}  // namespace

void ModelConfig::validate() const {
  require_positive(vocab, "vocabulary size");
  require_positive(seq_len, "--seq-len");
  require_positive(d_model, "--d-model");
  require_positive(heads, "--heads");
  require_positive(d_mlp, "--d-mlp");
  require_positive(layers, "--layers");
  if (d_model % heads != 0)
    throw UserError("--d-model " + std::to_string(d_model) + " is not divisible by --heads " + std::to_string(heads));
  if (pos == PosEncoding::sinusoidal && d_model % 2 != 0)
    throw UserError("sinusoidal positions need an even --d-model (got " + std::to_string(d_model) + ")");
}

void OptimConfig::validate() const {
  if (!(lr > 0) || !std::isfinite(lr)) throw UserError("--lr must be a positive number (got " + std::to_string(lr) + ")");
  if (!(weight_decay >= 0) || !std::isfinite(weight_decay))
    throw UserError("--weight-decay must be zero or positive (got " + std::to_string(weight_decay) + ")");
  if (!std::isfinite(clip)) throw UserError("--clip must be finite");
  if (warmup < 0) throw UserError("--warmup must be zero or positive (got " + std::to_string(warmup) + ")");
  if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1)) throw UserError("Adam betas must lie in [0, 1)");
  if (!(eps > 0)) throw UserError("Adam epsilon must be positive");
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1)) throw UserError("min_lr_ratio must lie in [0, 1]");
}

double learning_rate(const OptimConfig& optim, int64_t step, int64_t total_steps) {
  if (step < optim.warmup) return optim.lr * static_cast<double>(step + 1) / static_cast<double>(optim.warmup);
  const int64_t decay_steps = total_steps - optim.warmup;
  if (decay_steps <= 1) return optim.lr;
  const double progress = static_cast<double>(step - optim.warmup) / static_cast<double>(decay_steps - 1);
  const double min_lr = optim.min_lr_ratio * optim.lr;
  return min_lr + 0.5 * (optim.lr - min_lr) * (1.0 + std::cos(std::numbers::pi * std::min(progress, 1.0)));
}

void RunConfig::validate() const {
  model.validate();
  optim.validate();
  require_positive(models, "--models");
  require_positive(samples, "--samples");
  require_positive(batch, "--batch");
  if (steps < 0) throw UserError("--steps must be positive (got " + std::to_string(steps) + ")");
  if (steps == 0) require_positive(epochs, "--epochs");
  if (data.test_samples < 0) throw UserError("--test-samples must be zero or positive");
  if (samples < batch)
    throw UserError("--samples " + std::to_string(samples) + " is smaller than --batch " + std::to_string(batch) +
                    ": an epoch would have no full batch");
  if (static_cast<int>(seeds.size()) != models)
    throw UserError("--seed takes one value or one per model (" + std::to_string(models) + "), got " +
                    std::to_string(seeds.size()));
}

nlohmann::json to_json(const ModelConfig& c) {
  return {{"vocab", c.vocab},   {"seq_len", c.seq_len}, {"d_model", c.d_model},
          {"heads", c.heads},   {"d_mlp", c.d_mlp},     {"layers", c.layers},
          {"activation", to_string(c.activation)},      {"pos", to_string(c.pos)}};
}

nlohmann::json to_json(const OptimConfig& c) {
  return {{"lr", c.lr},       {"weight_decay", c.weight_decay}, {"clip", c.clip}, {"warmup", c.warmup},
          {"beta1", c.beta1}, {"beta2", c.beta2},               {"eps", c.eps},   {"min_lr_ratio", c.min_lr_ratio}};
}

nlohmann::json to_json(const DataSpec& c) {
  return {{"source", c.source}, {"vocab", c.vocab}, {"seed", c.seed}, {"test_samples", c.test_samples}};
}

nlohmann::json to_json(const RunConfig& c) {
  return {{"model", to_json(c.model)}, {"optim", to_json(c.optim)},   {"data", to_json(c.data)},
          {"models", c.models},        {"seeds", c.seeds},            {"samples", c.samples},
          {"batch", c.batch},          {"epochs", c.epochs},          {"steps", c.steps},
          {"same_init", c.same_init},  {"same_data", c.same_data}};
}

ModelConfig model_config_from_json(const nlohmann::json& j) {
  ModelConfig c;
  c.vocab = json_number<int>(j, "vocab");
  c.seq_len = json_number<int>(j, "seq_len");
  c.d_model = json_number<int>(j, "d_model");
  c.heads = json_number<int>(j, "heads");
  c.d_mlp = json_number<int>(j, "d_mlp");
  c.layers = json_number<int>(j, "layers");
  c.activation = parse_activation(j.at("activation").get<std::string>());
  c.pos = parse_pos_encoding(j.at("pos").get<std::string>());
  return c;
}

RunConfig run_config_from_json(const nlohmann::json& j) {
  RunConfig c;
  c.model = model_config_from_json(j.at("model"));
  const auto& o = j.at("optim");
  c.optim.lr = json_number<double>(o, "lr");
  c.optim.weight_decay = json_number<double>(o, "weight_decay");
  c.optim.clip = json_number<double>(o, "clip");
  c.optim.warmup = json_number<int64_t>(o, "warmup");
  c.optim.beta1 = json_number<double>(o, "beta1");
  c.optim.beta2 = json_number<double>(o, "beta2");
  c.optim.eps = json_number<double>(o, "eps");
  c.optim.min_lr_ratio = json_number<double>(o, "min_lr_ratio");
  const auto& d = j.at("data");
  c.data.source = d.at("source").get<std::string>();
  c.data.vocab = json_number<int>(d, "vocab");
  c.data.seed = json_number<uint64_t>(d, "seed");
  c.data.test_samples = json_number<int64_t>(d, "test_samples");
  c.models = json_number<int>(j, "models");
  for (const auto& seed : j.at("seeds")) c.seeds.push_back(json_number<uint64_t>(seed));
  c.samples = json_number<int64_t>(j, "samples");
  c.batch = json_number<int>(j, "batch");
  c.epochs = json_number<int>(j, "epochs");
  c.steps = json_number<int64_t>(j, "steps");
  c.same_init = j.at("same_init").get<bool>();
  c.same_data = j.at("same_data").get<bool>();
  return c;
}

}  // namespace univ
