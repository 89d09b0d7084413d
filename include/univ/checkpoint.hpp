// Run directories: model_<m>.safetensors (weights; config, seed, step and data spec
// in __metadata__) and optim_<m>.safetensors (Adam moments) for every model.
//
// A save is all or nothing: every file is first written in full as NAME.tmp, then a
// commit marker lists them, then they are renamed into place and the marker removed.
// recover_checkpoint() finishes a save that got as far as the marker and drops one
// that did not, so a crash at any moment leaves the previous or the new checkpoint.
#pragma once
#include <cstdint>
#include <filesystem>
#include <vector>

#include <nlohmann/json.hpp>

#include "univ/config.hpp"
#include "univ/param_layout.hpp"
#include "univ/train_state.hpp"

namespace univ {

inline constexpr const char* kCheckpointFormat = "univ.checkpoint.v1";
inline constexpr const char* kOptimizerFormat = "univ.optimizer.v1";

std::filesystem::path model_file(const std::filesystem::path& dir, int model);
std::filesystem::path optimizer_file(const std::filesystem::path& dir, int model);
bool has_checkpoint(const std::filesystem::path& dir);

void recover_checkpoint(const std::filesystem::path& dir);
// data: DataSource::describe() of the run's data.
void save_checkpoint(const std::filesystem::path& dir, const RunConfig& config, const nlohmann::json& data,
                     const TrainState& state);

struct LoadedCheckpoint {
  std::filesystem::path dir;
  RunConfig config;
  nlohmann::json data;
  TrainState state;
};
// Every model's weights and moments, checked for consistency (one run, one step,
// every tensor present with its shape, checksums). UserError on any fault.
LoadedCheckpoint load_checkpoint(const std::filesystem::path& dir);

// One model's weights, laid out by ParamLayout(model config, 1).
struct ModelCheckpoint {
  RunConfig run;
  nlohmann::json data;
  int model_index = 0;
  uint64_t seed = 0;
  int64_t step = 0;
  std::string checksum;  // the file's univ.checksum: identifies these exact weights
  std::vector<float> params;
};
ModelCheckpoint load_model(const std::filesystem::path& file);

}  // namespace univ
