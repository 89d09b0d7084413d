// Checkpoints in, held-out tokens through every model, activations into statistics.
#include "univ/correlate.hpp"

#include <algorithm>
#include <chrono>
#include <regex>

#include "univ/cpu/model.hpp"
#include "univ/error.hpp"

#ifdef UNIV_HAVE_CUDA
#include "cuda/correlate_stream.hpp"
#endif

namespace univ {

namespace fs = std::filesystem;

std::string to_string(Site s) { return s == Site::pre ? "pre" : "post"; }

Site parse_site(const std::string& name) {
  if (name == "pre") return Site::pre;
  if (name == "post") return Site::post;
  throw UserError("unknown --site '" + name + "' (expected pre or post)");
}

Shard Shard::parse(const std::string& text) {
  static const std::regex pattern(R"((\d+)/(\d+))");
  std::smatch m;
  if (std::regex_match(text, m, pattern)) {
    const Shard s{std::stoi(m[1]), std::stoi(m[2])};
    if (s.count >= 1 && s.index < s.count) return s;
  }
  throw UserError("--shard takes I/N with 0 <= I < N (got '" + text + "')");
}

std::vector<LoadedModel> load_models(const std::vector<fs::path>& paths) {
  std::vector<fs::path> files;
  for (const auto& p : paths) {
    if (fs::is_directory(p)) {
      const size_t before = files.size();
      for (int m = 0; fs::exists(model_file(p, m)); ++m) files.push_back(model_file(p, m));
      if (files.size() == before) throw UserError(p.string() + " holds no model_0.safetensors");
    } else if (fs::exists(p)) {
      files.push_back(p);
    } else {
      throw UserError("no checkpoint " + p.string());
    }
  }
  if (files.size() < 2)
    throw UserError("correlate needs at least 2 checkpoints (got " + std::to_string(files.size()) + ")");
  std::vector<LoadedModel> models;
  for (const auto& f : files) models.push_back({f, load_model(f)});
  const ModelConfig& first = models[0].checkpoint.run.model;
  for (const auto& m : models) {
    const ModelConfig& c = m.checkpoint.run.model;
    if (c.vocab != first.vocab)
      throw UserError("the checkpoints disagree: " + models[0].path.string() + " has vocabulary " +
                      std::to_string(first.vocab) + ", " + m.path.string() + " " + std::to_string(c.vocab));
    if (c.seq_len != first.seq_len)
      throw UserError("the checkpoints disagree: " + models[0].path.string() + " has sequence length " +
                      std::to_string(first.seq_len) + ", " + m.path.string() + " " + std::to_string(c.seq_len));
  }
  return models;
}

namespace {

bool same_source(const nlohmann::json& trained_on, const DataSource& src) {
  const nlohmann::json d = src.describe();
  auto field = [](const nlohmann::json& j, const char* key) { return j.contains(key) ? j.at(key) : nlohmann::json(); };
  for (const char* key : {"source", "vocab", "seed", "fnv1a64"})
    if (field(trained_on, key) != field(d, key)) return false;
  return true;
}

}  // namespace

HeldOutTokens held_out_tokens(const LoadedModel& first, const std::optional<DataSpec>& data, int64_t tokens,
                              Shard shard, int batch) {
  const RunConfig& run = first.checkpoint.run;
  const int T = run.model.seq_len;
  DataSpec spec = data.value_or(run.data);
  const DataSource src = open_data(spec);
  if (src.vocab() != run.model.vocab)
    throw UserError("--data " + spec.source + " has vocabulary " + std::to_string(src.vocab()) +
                    ", the models " + std::to_string(run.model.vocab));
  const bool training_data = same_source(first.checkpoint.data, src);
  // Held-out sequences: a synthetic source has any number (by default as many as the
  // run's test split); the training corpus its test split; another corpus all its windows.
  int64_t available = -1, default_sequences = run.data.test_samples;
  if (src.kind != DataSource::Kind::synthetic)
    default_sequences = available = training_data ? run.data.test_samples : corpus_windows(src, T);
  if (tokens == 0) tokens = default_sequences * T;
  if (tokens < 0) throw UserError("--tokens must be positive");
  const int64_t sequences = (tokens + T - 1) / T;
  if (available >= 0 && sequences > available)
    throw UserError("--tokens " + std::to_string(tokens) + " is beyond the data: " + spec.source + " holds " +
                    std::to_string(available * T) + " held-out tokens (" + std::to_string(available) +
                    " sequences of " + std::to_string(T) + ")");
  if (tokens < 2) throw UserError("--tokens must be at least 2");

  HeldOutTokens out;
  const int64_t batches = (sequences + batch - 1) / batch;
  const auto boundary = [&](int index) { return std::min(sequences, batches * index / shard.count * batch); };
  const int64_t first_seq = boundary(shard.index), last_seq = boundary(shard.index + 1);
  out.sequences = test_sequences(src, T, first_seq, last_seq - first_seq);
  out.first_token = first_seq * T;
  out.tokens = std::max<int64_t>(0, std::min(last_seq * T, tokens) - out.first_token);  // a shard may be empty
  out.total_tokens = tokens;
  out.description = src.describe();
  out.description["held_out"] = training_data ? "test split of the training data" : "windows of another source";
  out.description["tokens"] = tokens;
  out.description["shard"] = std::to_string(shard.index) + "/" + std::to_string(shard.count);
  return out;
}

void for_each_batch(const HeldOutTokens& tokens, int batch, int seq_len,
                    const std::function<void(const int32_t*, const int32_t*, int, int64_t)>& visit) {
  std::vector<int32_t> inputs(int64_t(batch) * seq_len), targets(inputs.size());
  const int64_t count = tokens.sequences.count();
  int64_t done = 0;
  for (int64_t first = 0; first < count; first += batch) {
    const int b = static_cast<int>(std::min<int64_t>(batch, count - first));
    split_inputs_targets(tokens.sequences.row(first), b, seq_len, inputs.data(), targets.data());
    const int64_t n = std::min<int64_t>(int64_t(b) * seq_len, tokens.tokens - done);  // the last sequence may be cut
    visit(inputs.data(), targets.data(), b, n);
    done += n;
  }
}

StreamResult stream_statistics(const std::vector<LoadedModel>& models, const HeldOutTokens& tokens, Site site,
                               int batch, const std::function<void(const StreamProgress&)>& progress, Device device) {
#ifdef UNIV_HAVE_CUDA
  if (device == Device::cuda) return stream_statistics_cuda(models, tokens, site, batch, progress);
#else
  if (device == Device::cuda) throw UserError("this build has no CUDA support");
#endif
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const int K = static_cast<int>(models.size());
  const int T = models[0].checkpoint.run.model.seq_len;
  std::vector<NeuronShape> shapes;
  std::vector<std::unique_ptr<cpu::Model<float>>> nets;
  for (const auto& m : models) {
    shapes.push_back(m.shape());
    nets.push_back(std::make_unique<cpu::Model<float>>(m.checkpoint.run.model, 1, batch));
    nets.back()->params() = m.checkpoint.params;
  }
  CpuStatsAccumulator acc(shapes);
  StreamResult result;
  result.loss.assign(K, 0.0);
  std::vector<std::vector<float>> chunk(K);
  int64_t done = 0;
  for_each_batch(tokens, batch, T, [&](const int32_t* inputs, const int32_t* targets, int b, int64_t n) {
    std::vector<const float*> ptrs;
    for (int m = 0; m < K; ++m) {
      float loss = 0;
      nets[m]->forward(inputs, targets, b, &loss, false);
      result.loss[m] += double(loss) * b;
      // Gather the layers into one token-major [n, layers * width] block.
      const NeuronShape s = shapes[m];
      chunk[m].resize(n * s.neurons());
      for (int l = 0; l < s.layers; ++l) {
        const float* acts = site == Site::pre ? nets[m]->mlp_pre(l) : nets[m]->mlp_post(l);
        for (int64_t t = 0; t < n; ++t)
          std::copy_n(acts + t * s.width, s.width, chunk[m].data() + t * s.neurons() + int64_t(l) * s.width);
      }
      ptrs.push_back(chunk[m].data());
    }
    acc.add(ptrs, n);
    done += n;
    if (progress)
      progress({done, tokens.tokens, std::chrono::duration<double>(Clock::now() - start).count()});
  });
  const int64_t count = tokens.sequences.count();
  for (double& l : result.loss) l /= static_cast<double>(std::max<int64_t>(count, 1));
  result.stats = acc.stats();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace univ
