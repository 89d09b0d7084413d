// The transformer on the CPU backend: M models side by side, every buffer [M, ...].
#pragma once
#include <cstdint>
#include <vector>

#include "univ/config.hpp"
#include "univ/param_layout.hpp"

namespace univ::cpu {

template <class F>
class Model {
 public:
  Model(const ModelConfig& config, int models, int max_batch);

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  int models() const { return layout_.models(); }
  int max_batch() const { return max_batch_; }
  std::vector<F>& params() { return params_; }
  const std::vector<F>& params() const { return params_; }
  std::vector<F>& grads() { return grads_; }
  const std::vector<F>& grads() const { return grads_; }

  // inputs, targets: [M, B, T] token ids, B <= max_batch. losses[M]: mean cross-entropy
  // per model. With for_backward the loss gradient is kept for backward().
  void forward(const int32_t* inputs, const int32_t* targets, int B, F* losses, bool for_backward);
  // Gradients of every model's loss, written into grads() (zeroed first).
  void backward();

  // Activations of the last forward, [M, B, T, d_mlp]: the MLP neurons of a layer
  // right after the first linear layer (pre) and after the activation (post).
  const F* mlp_pre(int layer) const { return acts_.layers[layer].pre.data(); }
  const F* mlp_post(int layer) const { return acts_.layers[layer].post.data(); }
  const F* logits() const { return acts_.logits.data(); }

 private:
  void forward_model(int m, const int32_t* targets, F* loss, bool for_backward);
  void backward_model(int m);

  struct LayerActs {
    std::vector<F> ln1, ln1_mean, ln1_rstd, qkv, att, atty, resid_mid, ln2, ln2_mean, ln2_rstd, pre, post, resid_out;
  };
  struct Acts {
    std::vector<F> encoded;  // layer 0 input
    std::vector<LayerActs> layers;
    std::vector<F> lnf, lnf_mean, lnf_rstd, logits, dlogits;
  };
  struct GradScratch {
    std::vector<F> dresidual, dln, datty, dqkv, dpre, dpost, dlnf;
  };

  ModelConfig config_;
  ParamLayout layout_;
  int max_batch_;
  std::vector<F> params_, grads_;
  std::vector<F> positions_;  // sinusoidal table [T, C]
  Acts acts_;
  GradScratch scratch_;
  std::vector<int32_t> inputs_;  // of the last forward, for the embedding backward
  int batch_ = 0;
};

}  // namespace univ::cpu
