// Where every parameter lives in the flat [M, ...] buffers shared by parameters,
// gradients and both Adam moments: tensor by tensor, each tensor holding the M
// models' copies back to back ([M, shape], contiguous per model).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "univ/config.hpp"

namespace univ {

// How a tensor starts (GPT-2's scheme): N(0, 0.02), N(0, 0.02 / sqrt(2 * layers)) for
// the projections that write into the residual stream, ones, zeros.
enum class ParamInit { normal, residual_normal, ones, zeros };

struct ParamTensor {
  std::string name;            // safetensors name, e.g. "blocks.0.mlp.fc.weight"
  std::vector<int64_t> shape;  // one model's shape, PyTorch convention ([out, in] for weights)
  int64_t numel = 0;           // one model's element count
  int64_t offset = 0;          // start of the [M, shape] block in the flat buffer
  bool decay = false;          // weight decay applies (matrices and embeddings; not biases or norms)
  ParamInit init = ParamInit::normal;
};

class ParamLayout {
 public:
  ParamLayout(const ModelConfig& config, int models);

  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  const ParamTensor& at(std::string_view name) const;
  int models() const { return models_; }
  int64_t per_model() const { return per_model_; }  // parameters of one model
  int64_t total() const { return total_; }          // flat buffer size, alignment padding included
  int64_t offset(const ParamTensor& t, int model) const { return t.offset + model * t.numel; }

 private:
  void add(std::string name, std::vector<int64_t> shape, ParamInit init);
  int models_;
  int64_t per_model_ = 0;
  int64_t total_ = 0;
  std::vector<ParamTensor> tensors_;
};

// Typed views into a flat buffer laid out by ParamLayout: each pointer is the block of
// `model`, which for model 0 is also the start of the [M, shape] block of all models.
template <class T>
struct ParamPointers {
  struct Block {
    T *ln1_w, *ln1_b;    // [M, C]
    T *qkv_w, *qkv_b;    // [M, 3C, C], [M, 3C]
    T *proj_w, *proj_b;  // [M, C, C], [M, C]
    T *ln2_w, *ln2_b;    // [M, C]
    T *fc_w, *fc_b;      // [M, D, C], [M, D]   (D = d_mlp; the neurons)
    T *out_w, *out_b;    // [M, C, D], [M, C]
  };
  T* wte;      // [M, V, C]
  T* wpe;      // [M, T, C]; null with sinusoidal positions
  std::vector<Block> blocks;
  T *lnf_w, *lnf_b;  // [M, C]
  T* lm_head;        // [M, V, C]
};

template <class T>
ParamPointers<T> param_pointers(const ParamLayout& layout, const ModelConfig& config, T* base, int model = 0);

}  // namespace univ
