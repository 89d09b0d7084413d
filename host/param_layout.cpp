// The parameter table of the model: names, shapes, offsets, decay flags.
#include "univ/param_layout.hpp"


namespace univ {

namespace {
constexpr int64_t kAlign = 64;  // elements; every tensor block starts 256-byte aligned
}

ParamLayout::ParamLayout(const ModelConfig& c, int models) : models_(models) {
  const int64_t C = c.d_model, D = c.d_mlp, V = c.vocab;
  add("wte", {V, C}, ParamInit::normal);
  if (c.pos == PosEncoding::learned) add("wpe", {c.seq_len, C}, ParamInit::normal);
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    add(p + "ln1.weight", {C}, ParamInit::ones);
    add(p + "ln1.bias", {C}, ParamInit::zeros);
    add(p + "attn.qkv.weight", {3 * C, C}, ParamInit::normal);
    add(p + "attn.qkv.bias", {3 * C}, ParamInit::zeros);
    add(p + "attn.proj.weight", {C, C}, ParamInit::residual_normal);
    add(p + "attn.proj.bias", {C}, ParamInit::zeros);
    add(p + "ln2.weight", {C}, ParamInit::ones);
    add(p + "ln2.bias", {C}, ParamInit::zeros);
    add(p + "mlp.fc.weight", {D, C}, ParamInit::normal);
    add(p + "mlp.fc.bias", {D}, ParamInit::zeros);
    add(p + "mlp.proj.weight", {C, D}, ParamInit::residual_normal);
    add(p + "mlp.proj.bias", {C}, ParamInit::zeros);
  }
  add("ln_f.weight", {C}, ParamInit::ones);
  add("ln_f.bias", {C}, ParamInit::zeros);
  add("lm_head.weight", {V, C}, ParamInit::normal);
}

void ParamLayout::add(std::string name, std::vector<int64_t> shape, ParamInit init) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const bool decay = shape.size() == 2;  // matrices and embeddings; not biases or norms
  tensors_.push_back({std::move(name), std::move(shape), numel, total_, decay, init});
  per_model_ += numel;
  total_ += (models_ * numel + kAlign - 1) / kAlign * kAlign;
}

const ParamTensor& ParamLayout::at(std::string_view name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return t;
  throw std::out_of_range("no parameter named " + std::string(name));
}

template <class T>
ParamPointers<T> param_pointers(const ParamLayout& layout, const ModelConfig& c, T* base, int model) {
  auto ptr = [&](const std::string& name) { return base + layout.offset(layout.at(name), model); };
  ParamPointers<T> p{};
  p.wte = ptr("wte");
  p.wpe = c.pos == PosEncoding::learned ? ptr("wpe") : nullptr;
  for (int l = 0; l < c.layers; ++l) {
    const std::string q = "blocks." + std::to_string(l) + ".";
    p.blocks.push_back({ptr(q + "ln1.weight"), ptr(q + "ln1.bias"), ptr(q + "attn.qkv.weight"),
                        ptr(q + "attn.qkv.bias"), ptr(q + "attn.proj.weight"), ptr(q + "attn.proj.bias"),
                        ptr(q + "ln2.weight"), ptr(q + "ln2.bias"), ptr(q + "mlp.fc.weight"), ptr(q + "mlp.fc.bias"),
                        ptr(q + "mlp.proj.weight"), ptr(q + "mlp.proj.bias")});
  }
  p.lnf_w = ptr("ln_f.weight");
  p.lnf_b = ptr("ln_f.bias");
  p.lm_head = ptr("lm_head.weight");
  return p;
}

template ParamPointers<float> param_pointers(const ParamLayout&, const ModelConfig&, float*, int);
template ParamPointers<double> param_pointers(const ParamLayout&, const ModelConfig&, double*, int);

}  // namespace univ
