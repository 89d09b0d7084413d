// Saving and loading run directories, all or nothing.
#include "univ/checkpoint.hpp"

#include <cstdio>
#include <cstring>
#include <optional>

#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/safetensors.hpp"

namespace univ {

namespace fs = std::filesystem;

namespace {

constexpr const char* kCommitMarker = "checkpoint.commit";

fs::path tmp_path(const fs::path& file) {
  fs::path p = file;
  p += ".tmp";
  return p;
}

void rename_or_throw(const fs::path& from, const fs::path& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0)
    throw UserError("cannot rename " + from.string() + " to " + to.string() + ": " + std::strerror(errno));
}

std::string_view float_bytes(const float* data, int64_t n) {
  return {reinterpret_cast<const char*>(data), static_cast<size_t>(n) * sizeof(float)};
}

SafetensorsFile open_safetensors(const fs::path& file) {
  return SafetensorsFile(read_file(file), file.string(), /*require_checksum=*/true);
}

nlohmann::json parse_meta_json(const SafetensorsFile& f, const std::string& key, const fs::path& file) {
  try {
    return nlohmann::json::parse(f.meta(key));
  } catch (const nlohmann::json::exception&) {
    throw UserError(file.string() + ": metadata " + key + " is not valid JSON");
  }
}

int64_t parse_meta_int(const SafetensorsFile& f, const std::string& key, const fs::path& file) {
  const std::string& text = f.meta(key);
  try {
    size_t used = 0;
    const long long v = std::stoll(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  throw UserError(file.string() + ": metadata " + key + " is not an integer: '" + text + "'");
}

RunConfig run_config_of(const SafetensorsFile& f, const fs::path& file) {
  try {
    RunConfig c = run_config_from_json(parse_meta_json(f, "univ.run", file));
    c.validate();
    return c;
  } catch (const UserError&) {
    throw;
  } catch (const std::exception&) {  // missing fields, values of the wrong kind or range
    throw UserError(file.string() + ": metadata univ.run lacks fields or has wrong types");
  }
}

void check_format(const SafetensorsFile& f, const char* format, const fs::path& file) {
  if (f.meta("format") != format)
    throw UserError(file.string() + " has format '" + f.meta("format") + "', expected " + format);
}

}  // namespace

fs::path model_file(const fs::path& dir, int model) { return dir / ("model_" + std::to_string(model) + ".safetensors"); }
fs::path optimizer_file(const fs::path& dir, int model) {
  return dir / ("optim_" + std::to_string(model) + ".safetensors");
}
bool has_checkpoint(const fs::path& dir) { return fs::exists(model_file(dir, 0)) || fs::exists(dir / kCommitMarker); }

void recover_checkpoint(const fs::path& dir) {
  if (!fs::is_directory(dir)) return;
  const fs::path marker = dir / kCommitMarker;
  if (fs::exists(marker)) {
    nlohmann::json commit;
    try {
      commit = nlohmann::json::parse(read_file(marker));
      for (const auto& name : commit.at("files")) {
        const fs::path file = dir / name.get<std::string>();
        if (fs::exists(tmp_path(file))) rename_or_throw(tmp_path(file), file);
      }
    } catch (const nlohmann::json::exception&) {
      throw UserError(marker.string() + " is corrupt; remove it to fall back to the files beside it");
    }
    fsync_directory(dir);
    fs::remove(marker);
  }
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const bool ours = name.starts_with("model_") || name.starts_with("optim_") || name.starts_with(kCommitMarker);
    if (ours && name.ends_with(".tmp")) fs::remove(entry.path());
  }
}

void save_checkpoint(const fs::path& dir, const RunConfig& config, const nlohmann::json& data,
                     const TrainState& state) {
  recover_checkpoint(dir);
  const ParamLayout layout(config.model, config.models);
  const std::string run_json = to_json(config).dump();
  std::vector<std::string> files;
  for (int m = 0; m < config.models; ++m) {
    std::vector<TensorBytes> weights, moments;
    for (const auto& t : layout.tensors()) {
      const int64_t at = layout.offset(t, m);
      weights.push_back({t.name, "F32", t.shape, float_bytes(state.params.data() + at, t.numel)});
      moments.push_back({"exp_avg." + t.name, "F32", t.shape, float_bytes(state.exp_avg.data() + at, t.numel)});
      moments.push_back({"exp_avg_sq." + t.name, "F32", t.shape, float_bytes(state.exp_avg_sq.data() + at, t.numel)});
    }
    const std::map<std::string, std::string> common{{"univ.run", run_json},
                                                    {"univ.model_index", std::to_string(m)},
                                                    {"univ.step", std::to_string(state.step)}};
    auto model_meta = common, optim_meta = common;
    model_meta["format"] = kCheckpointFormat;
    model_meta["univ.model"] = to_json(config.model).dump();
    model_meta["univ.data"] = data.dump();
    model_meta["univ.seed"] = std::to_string(config.init_seed(m));
    optim_meta["format"] = kOptimizerFormat;
    files.push_back(model_file(dir, m).filename().string());
    files.push_back(optimizer_file(dir, m).filename().string());
    try {
      write_file_durable(tmp_path(model_file(dir, m)), safetensors_bytes(weights, model_meta));
      write_file_durable(tmp_path(optimizer_file(dir, m)), safetensors_bytes(moments, optim_meta));
    } catch (...) {  // a full disk: free what this save took, keep the previous checkpoint
      std::error_code ec;
      for (const auto& name : files) fs::remove(tmp_path(dir / name), ec);
      throw;
    }
  }
  fsync_directory(dir);
  write_file_atomic(dir / kCommitMarker, nlohmann::json{{"step", state.step}, {"files", files}}.dump());
  for (const auto& name : files) rename_or_throw(tmp_path(dir / name), dir / name);
  fsync_directory(dir);
  fs::remove(dir / kCommitMarker);
  fsync_directory(dir);
}

LoadedCheckpoint load_checkpoint(const fs::path& dir) {
  if (!fs::is_directory(dir)) throw UserError("no checkpoint directory " + dir.string());
  if (!fs::exists(model_file(dir, 0)))
    throw UserError("no checkpoint in " + dir.string() + " (" + model_file(dir, 0).filename().string() + " is missing)");
  LoadedCheckpoint out;
  out.dir = dir;
  const SafetensorsFile first = open_safetensors(model_file(dir, 0));
  check_format(first, kCheckpointFormat, model_file(dir, 0));
  out.config = run_config_of(first, model_file(dir, 0));
  out.data = parse_meta_json(first, "univ.data", model_file(dir, 0));
  out.state.step = parse_meta_int(first, "univ.step", model_file(dir, 0));
  const ParamLayout layout(out.config.model, out.config.models);
  out.state.params.assign(layout.total(), 0.0f);
  out.state.exp_avg.assign(layout.total(), 0.0f);
  out.state.exp_avg_sq.assign(layout.total(), 0.0f);
  for (int m = 0; m < out.config.models; ++m) {
    for (const fs::path& file : {model_file(dir, m), optimizer_file(dir, m)}) {
      if (!fs::exists(file))
        throw UserError("checkpoint in " + dir.string() + " is incomplete: " + file.filename().string() + " is missing");
      std::optional<SafetensorsFile> opened;  // model_0 is parsed already
      if (!(m == 0 && file == model_file(dir, 0))) opened.emplace(open_safetensors(file));
      const SafetensorsFile& f = opened ? *opened : first;
      const bool weights = file == model_file(dir, m);
      check_format(f, weights ? kCheckpointFormat : kOptimizerFormat, file);
      if (!(run_config_of(f, file) == out.config))
        throw UserError(file.string() + " belongs to another run than " + model_file(dir, 0).string());
      if (parse_meta_int(f, "univ.model_index", file) != m) throw UserError(file.string() + " is not model " + std::to_string(m));
      const int64_t step = parse_meta_int(f, "univ.step", file);
      if (step != out.state.step)
        throw UserError(file.string() + " is at step " + std::to_string(step) + " but " +
                        model_file(dir, 0).filename().string() + " at step " + std::to_string(out.state.step));
      for (const auto& t : layout.tensors()) {
        const int64_t at = layout.offset(t, m);
        if (weights) {
          f.read_f32(t.name, t.shape, out.state.params.data() + at);
        } else {
          f.read_f32("exp_avg." + t.name, t.shape, out.state.exp_avg.data() + at);
          f.read_f32("exp_avg_sq." + t.name, t.shape, out.state.exp_avg_sq.data() + at);
        }
      }
    }
  }
  return out;
}

ModelCheckpoint load_model(const fs::path& file) {
  const SafetensorsFile f = open_safetensors(file);
  check_format(f, kCheckpointFormat, file);
  ModelCheckpoint out;
  out.run = run_config_of(f, file);
  out.data = parse_meta_json(f, "univ.data", file);
  out.model_index = static_cast<int>(parse_meta_int(f, "univ.model_index", file));
  try {
    out.seed = std::stoull(f.meta("univ.seed"));
  } catch (const std::exception&) {
    throw UserError(file.string() + ": metadata univ.seed is not an unsigned integer");
  }
  out.step = parse_meta_int(f, "univ.step", file);
  out.checksum = f.meta(kChecksumKey);
  const ParamLayout layout(out.run.model, 1);
  out.params.assign(layout.total(), 0.0f);
  for (const auto& t : layout.tensors()) f.read_f32(t.name, t.shape, out.params.data() + t.offset);
  return out;
}

}  // namespace univ
