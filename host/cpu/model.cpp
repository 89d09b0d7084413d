// Forward and backward of the whole transformer on the CPU, op by op (llm.c's order).
#include "univ/cpu/model.hpp"

#include <algorithm>
#include <stdexcept>

#include "univ/cpu/ops.hpp"

namespace univ::cpu {

template <class F>
Model<F>::Model(const ModelConfig& config, int models, int max_batch)
    : config_(config), layout_(config, models), max_batch_(max_batch) {
  config_.validate();
  params_.assign(layout_.total(), F(0));
  grads_.assign(layout_.total(), F(0));
  const int64_t M = models, T = config.seq_len, C = config.d_model, D = config.d_mlp, V = config.vocab,
                H = config.heads;
  const int64_t rows = M * max_batch * T;
  if (config.pos == PosEncoding::sinusoidal) {
    positions_.resize(T * C);
    sinusoidal_positions(positions_.data(), config.seq_len, config.d_model);
  }
  acts_.encoded.resize(rows * C);
  acts_.layers.resize(config.layers);
  for (auto& l : acts_.layers) {
    for (auto* v : {&l.ln1, &l.atty, &l.resid_mid, &l.ln2, &l.resid_out}) v->resize(rows * C);
    for (auto* v : {&l.ln1_mean, &l.ln1_rstd, &l.ln2_mean, &l.ln2_rstd}) v->resize(rows);
    l.qkv.resize(rows * 3 * C);
    l.att.resize(M * max_batch * H * T * T);
    l.pre.resize(rows * D);
    l.post.resize(rows * D);
  }
  acts_.lnf.resize(rows * C);
  acts_.lnf_mean.resize(rows);
  acts_.lnf_rstd.resize(rows);
  acts_.logits.resize(rows * V);
  acts_.dlogits.resize(rows * V);
  for (auto* v : {&scratch_.dresidual, &scratch_.dln, &scratch_.datty, &scratch_.dlnf}) v->resize(rows * C);
  scratch_.dqkv.resize(rows * 3 * C);
  scratch_.dpre.resize(rows * D);
  scratch_.dpost.resize(rows * D);
}

// Models are independent: one thread per model, the ops inside it serial (nested
// parallel regions and BLAS calls inside one run single-threaded). That needs one
// barrier per pass instead of one per op, and keeps throughput when other programs
// share the cores. A single model parallelises inside its ops instead.
template <class F>
void Model<F>::forward(const int32_t* inputs, const int32_t* targets, int B, F* losses, bool for_backward) {
  if (B < 1 || B > max_batch_) throw std::invalid_argument("Model::forward: batch outside [1, max_batch]");
  const int M = models();
  batch_ = B;
  inputs_.assign(inputs, inputs + int64_t(M) * B * config_.seq_len);
#pragma omp parallel for schedule(static, 1) if (M > 1)
  for (int m = 0; m < M; ++m) forward_model(m, targets, losses + m, for_backward);
}

template <class F>
void Model<F>::backward() {
  std::fill(grads_.begin(), grads_.end(), F(0));
  const int M = models();
#pragma omp parallel for schedule(static, 1) if (M > 1)
  for (int m = 0; m < M; ++m) backward_model(m);
}

template <class F>
void Model<F>::forward_model(int m, const int32_t* targets, F* loss, bool for_backward) {
  const int B = batch_, T = config_.seq_len, C = config_.d_model, D = config_.d_mlp, V = config_.vocab,
            H = config_.heads, N = B * T;
  const auto p = param_pointers(layout_, config_, params_.data(), m);
  // Model m's slice of an activation buffer of `width` values per row.
  auto at = [&](std::vector<F>& buffer, int64_t width) { return buffer.data() + int64_t(m) * N * width; };
  const int32_t* tokens = inputs_.data() + int64_t(m) * N;

  const bool learned = config_.pos == PosEncoding::learned;
  embedding_forward(at(acts_.encoded, C), tokens, p.wte, learned ? p.wpe : positions_.data(), 0, 1, B, T, C, V);
  const F* residual = at(acts_.encoded, C);
  for (int l = 0; l < config_.layers; ++l) {
    auto& a = acts_.layers[l];
    const auto& w = p.blocks[l];
    F *ln1 = at(a.ln1, C), *qkv = at(a.qkv, 3 * C), *atty = at(a.atty, C), *mid = at(a.resid_mid, C);
    F *ln2 = at(a.ln2, C), *pre = at(a.pre, D), *post = at(a.post, D), *out = at(a.resid_out, C);
    layernorm_forward(ln1, at(a.ln1_mean, 1), at(a.ln1_rstd, 1), residual, w.ln1_w, w.ln1_b, 1, N, C);
    matmul_forward(qkv, ln1, w.qkv_w, w.qkv_b, 1, N, C, 3 * C);
    attention_forward(atty, at(a.att, int64_t(H) * T), qkv, 1, B, T, C, H);
    matmul_forward(mid, atty, w.proj_w, w.proj_b, 1, N, C, C);
    residual_forward(mid, mid, residual, int64_t(N) * C);
    layernorm_forward(ln2, at(a.ln2_mean, 1), at(a.ln2_rstd, 1), mid, w.ln2_w, w.ln2_b, 1, N, C);
    matmul_forward(pre, ln2, w.fc_w, w.fc_b, 1, N, C, D);
    activation_forward(post, pre, int64_t(N) * D, config_.activation);
    matmul_forward(out, post, w.out_w, w.out_b, 1, N, D, C);
    residual_forward(out, out, mid, int64_t(N) * C);
    residual = out;
  }
  F* lnf = at(acts_.lnf, C);
  layernorm_forward(lnf, at(acts_.lnf_mean, 1), at(acts_.lnf_rstd, 1), residual, p.lnf_w, p.lnf_b, 1, N, C);
  matmul_forward(at(acts_.logits, V), lnf, p.lm_head, static_cast<const F*>(nullptr), 1, N, C, V);
  crossentropy_forward_backward(loss, for_backward ? at(acts_.dlogits, V) : nullptr, at(acts_.logits, V),
                                targets + int64_t(m) * N, 1, N, V);
}

template <class F>
void Model<F>::backward_model(int m) {
  const int B = batch_, T = config_.seq_len, C = config_.d_model, D = config_.d_mlp, V = config_.vocab,
            H = config_.heads, N = B * T;
  const auto p = param_pointers(layout_, config_, params_.data(), m);
  const auto g = param_pointers(layout_, config_, grads_.data(), m);
  auto at = [&](std::vector<F>& buffer, int64_t width) { return buffer.data() + int64_t(m) * N * width; };
  auto& s = scratch_;
  F *dresidual = at(s.dresidual, C), *dln = at(s.dln, C), *datty = at(s.datty, C), *dqkv = at(s.dqkv, 3 * C);
  F *dpre = at(s.dpre, D), *dpost = at(s.dpost, D), *dlnf = at(s.dlnf, C);

  const F* last = config_.layers > 0 ? at(acts_.layers.back().resid_out, C) : at(acts_.encoded, C);
  matmul_backward(dlnf, g.lm_head, static_cast<F*>(nullptr), at(acts_.dlogits, V), at(acts_.lnf, C), p.lm_head, 1,
                  N, C, V);
  std::fill(dresidual, dresidual + int64_t(N) * C, F(0));
  layernorm_backward(dresidual, g.lnf_w, g.lnf_b, dlnf, last, p.lnf_w, at(acts_.lnf_mean, 1), at(acts_.lnf_rstd, 1),
                     1, N, C);
  for (int l = config_.layers - 1; l >= 0; --l) {
    auto& a = acts_.layers[l];
    const auto& w = p.blocks[l];
    const auto& gw = g.blocks[l];
    const F* residual = l == 0 ? at(acts_.encoded, C) : at(acts_.layers[l - 1].resid_out, C);
    // MLP branch: resid_out = resid_mid + act(ln2 W1^T + b1) W2^T + b2
    matmul_backward(dpost, gw.out_w, gw.out_b, dresidual, at(a.post, D), w.out_w, 1, N, D, C);
    activation_backward(dpre, dpost, at(a.pre, D), int64_t(N) * D, config_.activation);
    matmul_backward(dln, gw.fc_w, gw.fc_b, dpre, at(a.ln2, C), w.fc_w, 1, N, C, D);
    layernorm_backward(dresidual, gw.ln2_w, gw.ln2_b, dln, at(a.resid_mid, C), w.ln2_w, at(a.ln2_mean, 1),
                       at(a.ln2_rstd, 1), 1, N, C);
    // attention branch: resid_mid = residual + attention(ln1 Wqkv^T + bqkv) Wproj^T + bproj
    matmul_backward(datty, gw.proj_w, gw.proj_b, dresidual, at(a.atty, C), w.proj_w, 1, N, C, C);
    attention_backward(dqkv, datty, at(a.qkv, 3 * C), at(a.att, int64_t(H) * T), 1, B, T, C, H);
    matmul_backward(dln, gw.qkv_w, gw.qkv_b, dqkv, at(a.ln1, C), w.qkv_w, 1, N, C, 3 * C);
    layernorm_backward(dresidual, gw.ln1_w, gw.ln1_b, dln, residual, w.ln1_w, at(a.ln1_mean, 1), at(a.ln1_rstd, 1),
                       1, N, C);
  }
  embedding_backward(g.wte, g.wpe, dresidual, inputs_.data() + int64_t(m) * N, 1, B, T, C, V);
}

template class Model<float>;
template class Model<double>;

}  // namespace univ::cpu
