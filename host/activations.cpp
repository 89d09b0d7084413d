// Activation files: memory-mapped .npy and safetensors matrices, float16 and
// bfloat16 widened to float32 chunk by chunk, streamed into the statistics.
#include "univ/activations.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <regex>

#include "univ/error.hpp"
#include "univ/npy.hpp"
#include "univ/safetensors.hpp"

#ifdef UNIV_HAVE_CUDA
#include "cuda/correlate_stream.hpp"
#endif

namespace univ {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: mantissa * 2^-24, normalised
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bfloat16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

ActivationMatrix::ActivationMatrix(const std::string& spec) : spec_(spec) {
  std::string path = spec, tensor;
  const size_t colon = spec.rfind(':');
  if (colon != std::string::npos && ends_with(spec.substr(0, colon), ".safetensors")) {
    path = spec.substr(0, colon);
    tensor = spec.substr(colon + 1);
  }
  file_ = std::make_shared<MappedFile>(path);
  const std::string_view bytes = file_->bytes();
  std::vector<int64_t> shape;
  std::string dtype;
  if (ends_with(path, ".npy")) {
    const NpyHeader h = parse_npy_header(bytes, path);
    if (h.fortran_order && h.shape.size() > 1)
      throw UserError(path + ": Fortran-ordered .npy files are not supported; save with numpy.ascontiguousarray");
    shape = h.shape;
    dtype = h.descr == "<f4" ? "F32" : h.descr == "<f2" ? "F16" : h.descr;
    data_ = bytes.data() + h.data_offset;
  } else if (ends_with(path, ".safetensors")) {
    const SafetensorsFile f = SafetensorsFile::borrow(bytes, path);
    if (tensor.empty()) {
      if (f.entries().size() != 1)
        throw UserError(path + " holds " + std::to_string(f.entries().size()) +
                        " tensors; name one as " + path + ":TENSOR");
      tensor = f.entries().begin()->first;
    }
    auto it = f.entries().find(tensor);
    if (it == f.entries().end()) throw UserError(path + " has no tensor " + tensor);
    shape = it->second.shape;
    dtype = it->second.dtype;
    data_ = f.data(tensor).data();
  } else {
    throw UserError(spec + ": activation files are .npy or .safetensors");
  }
  if (dtype == "F32") dtype_ = Dtype::f32;
  else if (dtype == "F16") dtype_ = Dtype::f16;
  else if (dtype == "BF16") dtype_ = Dtype::bf16;
  else throw UserError(spec + ": activations must be float32, float16 or bfloat16, not " + dtype);
  if (shape.size() != 2) throw UserError(spec + ": activations must be shaped [tokens, neurons], not " +
                                         std::to_string(shape.size()) + "-dimensional");
  rows_ = shape[0];
  cols_ = shape[1];
}

void ActivationMatrix::read(int64_t first, int64_t count, int64_t col0, int64_t ncols, float* out,
                            int64_t stride) const {
  const size_t item = item_size();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < count; ++r) {
    const char* row = data_ + ((first + r) * cols_ + col0) * static_cast<int64_t>(item);
    float* o = out + r * stride;
    if (dtype_ == Dtype::f32) {
      std::memcpy(o, row, ncols * sizeof(float));
    } else {
      for (int64_t c = 0; c < ncols; ++c) {
        uint16_t h;
        std::memcpy(&h, row + 2 * c, 2);
        o[c] = dtype_ == Dtype::f16 ? half_to_float(h) : bfloat16_to_float(h);
      }
    }
  }
}

void ActivationModel::read(int64_t first, int64_t count, float* out) const {
  const int64_t N = shape.neurons();
  if (files.size() == 1) {
    files[0].read(first, count, 0, N, out, N);
  } else {
    for (size_t l = 0; l < files.size(); ++l) files[l].read(first, count, 0, shape.width, out + l * shape.width, N);
  }
}

std::vector<int> parse_layer_sizes(const std::string& text) {
  static const std::regex repeat(R"((\d+)x(\d+))"), list(R"(\d+(,\d+)*)");
  std::smatch m;
  std::vector<int> sizes;
  if (std::regex_match(text, m, repeat)) {
    sizes.assign(std::stoi(m[1]), std::stoi(m[2]));
  } else if (std::regex_match(text, list)) {
    for (size_t at = 0; at < text.size();) {
      const size_t comma = text.find(',', at);
      sizes.push_back(std::stoi(text.substr(at, comma - at)));
      at = comma == std::string::npos ? text.size() : comma + 1;
    }
  }
  if (sizes.empty() || std::find(sizes.begin(), sizes.end(), 0) != sizes.end())
    throw UserError("--layers takes sizes like 256,256 or 2x256 (got '" + text + "')");
  return sizes;
}

ActivationModel open_activation_model(const std::string& arg, const std::vector<int>& layer_sizes) {
  const size_t eq = arg.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == arg.size())
    throw UserError("--acts takes NAME=FILE[,FILE...] (got '" + arg + "')");
  ActivationModel model;
  model.name = arg.substr(0, eq);
  for (size_t at = eq + 1; at < arg.size();) {
    const size_t comma = arg.find(',', at);
    model.files.emplace_back(arg.substr(at, comma - at));
    at = comma == std::string::npos ? arg.size() : comma + 1;
  }
  const auto& f0 = model.files[0];
  if (model.files.size() > 1) {  // one file per layer
    for (const auto& f : model.files) {
      if (f.rows() != f0.rows())
        throw UserError(model.name + ": " + f.spec() + " holds " + std::to_string(f.rows()) + " tokens, " + f0.spec() +
                        " " + std::to_string(f0.rows()));
      if (f.cols() != f0.cols())
        throw UserError(model.name + ": layer files of different widths (" + f0.spec() + ": " +
                        std::to_string(f0.cols()) + ", " + f.spec() + ": " + std::to_string(f.cols()) + ")");
    }
    model.shape = {static_cast<int>(model.files.size()), static_cast<int>(f0.cols())};
    return model;
  }
  const std::vector<int> sizes = layer_sizes.empty() ? std::vector<int>{static_cast<int>(f0.cols())} : layer_sizes;
  int64_t total = 0;
  for (int s : sizes) total += s;
  if (total != f0.cols())
    throw UserError(model.name + ": " + f0.spec() + " holds " + std::to_string(f0.cols()) +
                    " neurons per token, the layer map (--layers) " + std::to_string(total));
  if (std::adjacent_find(sizes.begin(), sizes.end(), std::not_equal_to<>()) != sizes.end())
    throw UserError(model.name + ": the layers of one model must be equally wide (--layers)");
  model.shape = {static_cast<int>(sizes.size()), sizes[0]};
  return model;
}

int64_t common_tokens(const std::vector<ActivationModel>& models) {
  if (models.size() < 2) throw UserError("correlate needs activations of at least 2 models");
  const int64_t tokens = models[0].tokens();
  for (const auto& m : models)
    if (m.tokens() != tokens)
      throw UserError("the activation files disagree: " + models[0].name + " holds " + std::to_string(tokens) +
                      " tokens, " + m.name + " " + std::to_string(m.tokens()));
  return tokens;
}

StreamResult stream_activation_statistics(const std::vector<ActivationModel>& models, Shard shard, int64_t chunk,
                                          const std::function<void(const StreamProgress&)>& progress, Device device) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const int64_t tokens = common_tokens(models);
  const int64_t first = tokens * shard.index / shard.count, last = tokens * (shard.index + 1) / shard.count;
#ifdef UNIV_HAVE_CUDA
  if (device == Device::cuda) return stream_activation_statistics_cuda(models, first, last, chunk, progress);
#else
  if (device == Device::cuda) throw UserError("this build has no CUDA support");
#endif
  std::vector<NeuronShape> shapes;
  for (const auto& m : models) shapes.push_back(m.shape);
  CpuStatsAccumulator acc(shapes);
  std::vector<std::vector<float>> buffers(models.size());
  StreamResult result;
  for (int64_t at = first; at < last; at += chunk) {
    const int64_t n = std::min(chunk, last - at);
    std::vector<const float*> ptrs;
    for (size_t m = 0; m < models.size(); ++m) {
      buffers[m].resize(n * shapes[m].neurons());
      models[m].read(at, n, buffers[m].data());
      ptrs.push_back(buffers[m].data());
      result.bytes_read += static_cast<double>(n * shapes[m].neurons() * models[m].files[0].item_size());
    }
    acc.add(ptrs, n);
    if (progress)
      progress({at + n - first, last - first, std::chrono::duration<double>(Clock::now() - start).count(),
                result.bytes_read});
  }
  result.stats = acc.stats();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace univ
