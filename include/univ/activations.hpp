// Activations computed elsewhere (any framework), read from memory-mapped files:
// .npy (float32, float16) or safetensors tensors (F32, F16, BF16) shaped
// [tokens, neurons], streamed chunk by chunk into the correlation statistics.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "univ/correlate.hpp"
#include "univ/fileio.hpp"
#include "univ/stats.hpp"

namespace univ {

// One [tokens, neurons] matrix in a file: "FILE.npy", "FILE.safetensors" (its only
// tensor) or "FILE.safetensors:TENSOR".
class ActivationMatrix {
 public:
  enum class Dtype { f32, f16, bf16 };

  // UserError for unreadable, truncated or corrupt files, other dtypes, shapes that
  // are not 2-D, Fortran order.
  explicit ActivationMatrix(const std::string& spec);
  const std::string& spec() const { return spec_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  size_t item_size() const { return dtype_ == Dtype::f32 ? 4 : 2; }
  // Rows [first, first + count) and columns [col0, col0 + ncols) as float32 into
  // out, whose rows are `stride` floats apart.
  void read(int64_t first, int64_t count, int64_t col0, int64_t ncols, float* out, int64_t stride) const;

 private:
  std::string spec_;
  std::shared_ptr<MappedFile> file_;
  const char* data_ = nullptr;
  int64_t rows_ = 0, cols_ = 0;
  Dtype dtype_ = Dtype::f32;
};

// One model's activations: "NAME=FILE[,FILE...]": one file per layer, or one file
// whose columns the layer map (`layer_sizes`, e.g. {256, 256}) splits into layers.
// Layers of one model must be equally wide.
struct ActivationModel {
  std::string name;
  std::vector<ActivationMatrix> files;
  NeuronShape shape;
  int64_t tokens() const { return files.empty() ? 0 : files[0].rows(); }
  // Rows [first, first + count) of all neurons, token-major [count, neurons] float32.
  void read(int64_t first, int64_t count, float* out) const;
};

ActivationModel open_activation_model(const std::string& arg, const std::vector<int>& layer_sizes);

// "256,256" or "2x256" -> {256, 256}; UserError when malformed.
std::vector<int> parse_layer_sizes(const std::string& text);

// The token count all models share; UserError naming two that differ, or fewer than 2 models.
int64_t common_tokens(const std::vector<ActivationModel>& models);

// Streams shard `shard` of the models' rows (every model must hold the same number
// of tokens) into statistics, `chunk` rows at a time; on the GPU the next chunk is
// read while the current one is reduced.
StreamResult stream_activation_statistics(const std::vector<ActivationModel>& models, Shard shard, int64_t chunk,
                                          const std::function<void(const StreamProgress&)>& progress,
                                          Device device = Device::cpu);

float half_to_float(uint16_t h);
float bfloat16_to_float(uint16_t h);

}  // namespace univ
