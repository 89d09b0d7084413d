// The CUDA training backend: every op a kernel over all M models, matrix products
// as cuBLAS strided-batched GEMMs, and one training step (forward, backward, norms,
// AdamW, the copy of losses and norms to the host) captured once as a CUDA graph.
// Per step only the batch and the step's constants go up before the graph launch.
#include <algorithm>
#include <cmath>
#include <memory>

#include "univ/backend.hpp"
#include "univ/cpu/ops.hpp"
#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/data.hpp"
#include "univ/error.hpp"
#include "univ/param_layout.hpp"

namespace univ {

namespace {

using cuda::DeviceBuffer;
using cuda::PinnedBuffer;

cuda::Act to_act(Activation a) { return a == Activation::relu ? cuda::Act::relu : cuda::Act::gelu; }

// Carves one device allocation into the activation and gradient buffers: reserve()
// every buffer, then allocate() once and every reserved pointer is set.
class Arena {
 public:
  void reserve(float*& slot, int64_t n) {
    pending_.push_back({&slot, used_});
    used_ += (n + 63) / 64 * 64;  // 256-byte alignment
  }
  void allocate() {
    buffer_ = DeviceBuffer<float>(static_cast<size_t>(used_));
    for (const auto& [slot, offset] : pending_) *slot = buffer_.data() + offset;
    pending_.clear();
  }

 private:
  int64_t used_ = 0;
  std::vector<std::pair<float**, int64_t>> pending_;
  DeviceBuffer<float> buffer_;
};

class CudaBackend final : public TrainBackend, public DeviceForward {
 public:
  CudaBackend(const RunConfig& config, Precision precision)
      : config_(config),
        layout_(config.model, config.models),
        cublas_(stream_.get(), precision == Precision::tf32),
        params_(layout_.total()),
        grads_(layout_.total()),
        exp_avg_(layout_.total()),
        exp_avg_sq_(layout_.total()),
        host_tokens_(2 * size_t(config.models) * config.batch * config.model.seq_len),
        host_step_(1),
        host_stats_(2 * size_t(config.models)),
        host_finite_(1) {
    const ModelConfig& c = config.model;
    const int max_T = cuda::attention_max_seq_len(c.head_dim());
    if (c.seq_len > max_T)
      throw UserError("--seq-len " + std::to_string(c.seq_len) + " is beyond what the CUDA attention kernel holds for " +
                      "head width " + std::to_string(c.head_dim()) + " (" + std::to_string(max_T) + ")");
    cuda::prepare_attention_kernels();
    allocate();
    for (const auto& t : layout_.tensors())
      for (int m = 0; m < config.models; ++m)
        host_segments_.push_back({layout_.offset(t, m), t.numel, m, t.decay ? 1 : 0});
    segments_ = DeviceBuffer<cuda::ParamSegment>(host_segments_.size());
    segments_.upload(host_segments_.data(), host_segments_.size(), stream_.get());
    partials_ = DeviceBuffer<double>(host_segments_.size());
    if (c.pos == PosEncoding::sinusoidal) {
      std::vector<float> table(size_t(c.seq_len) * c.d_model);
      cpu::sinusoidal_positions(table.data(), c.seq_len, c.d_model);
      positions_ = DeviceBuffer<float>(table.size());
      positions_.upload(table.data(), table.size(), stream_.get());
    }
    for (auto* b : {&params_, &grads_, &exp_avg_, &exp_avg_sq_}) b->fill_bytes(0, stream_.get());
    stream_.synchronize();
  }

  Device device() const override { return Device::cuda; }

  void set_state(const TrainState& s) override {
    const size_t n = layout_.total();
    if (s.params.size() != n || s.exp_avg.size() != n || s.exp_avg_sq.size() != n)
      throw std::invalid_argument("CudaBackend::set_state: state does not match the parameter layout");
    params_.upload(s.params.data(), n, stream_.get());
    exp_avg_.upload(s.exp_avg.data(), n, stream_.get());
    exp_avg_sq_.upload(s.exp_avg_sq.data(), n, stream_.get());
    step_ = s.step;
    stream_.synchronize();
  }

  TrainState state() const override {
    TrainState s{download(params_), download(exp_avg_), download(exp_avg_sq_), step_};
    return s;
  }

  std::vector<float> gradients() const override { return download(grads_); }

  double run(const int32_t* inputs, const int32_t* targets, int b, bool post, float* out, int64_t n) override {
    const ModelConfig& c = config_.model;
    if (config_.models != 1 || b < 1 || b > config_.batch || n > int64_t(b) * c.seq_len)
      throw std::invalid_argument("CudaBackend::run: one model, at most batch sequences, at most b * seq_len tokens");
    const cudaStream_t s = stream_.get();
    inputs_.upload(inputs, size_t(b) * c.seq_len, s);
    targets_.upload(targets, size_t(b) * c.seq_len, s);
    forward(b, false);
    const size_t width = sizeof(float) * c.d_mlp;
    for (int l = 0; l < c.layers; ++l)  // [n, D] per layer -> columns [l D, (l + 1) D) of out
      UNIV_CUDA_CHECK(cudaMemcpy2DAsync(out + int64_t(l) * c.d_mlp, width * c.layers,
                                        post ? layers_[l].post : layers_[l].pre, width, width, n,
                                        cudaMemcpyDeviceToDevice, s));
    losses_.download(host_stats_.data(), 1, s);
    stream_.synchronize();
    return host_stats_[0];
  }

  StepStats step(const int32_t* inputs, const int32_t* targets, double lr) override {
    const int M = config_.models;
    const size_t tokens = size_t(M) * config_.batch * config_.model.seq_len;
    std::copy_n(inputs, tokens, host_tokens_.data());
    std::copy_n(targets, tokens, host_tokens_.data() + tokens);
    host_step_[0] = optimizer_step(lr, step_ + 1);
    inputs_.upload(host_tokens_.data(), tokens, stream_.get());
    targets_.upload(host_tokens_.data() + tokens, tokens, stream_.get());
    step_params_.upload(host_step_.data(), 1, stream_.get());
    if (!graph_)
      graph_ = std::make_unique<cuda::Graph>(stream_.get(), [&] {
        grads_.fill_bytes(0, stream_.get());
        forward(config_.batch, true);
        backward();
        optimize();
      });
    graph_->launch(stream_.get());
    stream_.synchronize();

    StepStats stats;
    for (int m = 0; m < M; ++m) {
      stats.loss.push_back(host_stats_[m]);
      stats.grad_norm.push_back(host_stats_[M + m]);
    }
    stats.finite = host_finite_[0] != 0;
    if (stats.finite) {
      ++step_;
    } else {
      stats.fault = describe_fault(stats, layout_, download(params_), download(grads_));
    }
    return stats;
  }

  std::vector<double> evaluate(const int32_t* sequences, int64_t count) override {
    const int M = config_.models, T = config_.model.seq_len;
    std::vector<double> total(M, 0.0);
    std::vector<int32_t> in(size_t(M) * config_.batch * T), tg(in.size());
    for (int64_t first = 0; first < count; first += config_.batch) {
      const int b = static_cast<int>(std::min<int64_t>(config_.batch, count - first));
      for (int m = 0; m < M; ++m)  // every model sees the same sequences
        split_inputs_targets(sequences + first * (T + 1), b, T, in.data() + int64_t(m) * b * T,
                             tg.data() + int64_t(m) * b * T);
      inputs_.upload(in.data(), size_t(M) * b * T, stream_.get());
      targets_.upload(tg.data(), size_t(M) * b * T, stream_.get());
      forward(b, false);
      losses_.download(host_stats_.data(), M, stream_.get());
      stream_.synchronize();
      for (int m = 0; m < M; ++m) total[m] += double(host_stats_[m]) * b;
    }
    for (double& t : total) t /= static_cast<double>(std::max<int64_t>(count, 1));
    return total;
  }

 private:
  struct LayerActs {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *att, *atty, *resid_mid, *ln2, *ln2_mean, *ln2_rstd, *pre, *post,
        *resid_out;
  };

  void allocate() {
    const ModelConfig& c = config_.model;
    const int64_t M = config_.models, T = c.seq_len, C = c.d_model, D = c.d_mlp, V = c.vocab, H = c.heads;
    const int64_t rows = M * config_.batch * T;
    auto& r = arena_;
    r.reserve(encoded_, rows * C);
    layers_.resize(c.layers);
    for (auto& l : layers_) {
      r.reserve(l.ln1, rows * C), r.reserve(l.ln1_mean, rows), r.reserve(l.ln1_rstd, rows);
      r.reserve(l.qkv, rows * 3 * C), r.reserve(l.att, M * config_.batch * H * T * T), r.reserve(l.atty, rows * C);
      r.reserve(l.resid_mid, rows * C), r.reserve(l.ln2, rows * C), r.reserve(l.ln2_mean, rows);
      r.reserve(l.ln2_rstd, rows), r.reserve(l.pre, rows * D), r.reserve(l.post, rows * D);
      r.reserve(l.resid_out, rows * C);
    }
    r.reserve(lnf_, rows * C), r.reserve(lnf_mean_, rows), r.reserve(lnf_rstd_, rows), r.reserve(logits_, rows * V);
    r.reserve(row_loss_, rows);
    r.reserve(dresidual_, rows * C), r.reserve(dln_, rows * C), r.reserve(datty_, rows * C);
    r.reserve(dqkv_, rows * 3 * C), r.reserve(dpre_, rows * D), r.reserve(dpost_, rows * D), r.reserve(dlnf_, rows * C);
    // The partial sums of the parameter gradients, shared by the backward ops (one
    // stream runs them one at a time): the largest of their needs. Whether a weight
    // gradient splits depends on its shape, so each (d_model, out) pair is asked.
    const int models = config_.models, n = config_.batch * c.seq_len;
    int64_t scratch = std::max(cuda::layernorm_backward_scratch(models, n, c.d_model),
                               cuda::bias_activation_backward_scratch(models, n, std::max(3 * c.d_model, c.d_mlp)));
    for (const int out : {3 * c.d_model, c.d_model, c.d_mlp, c.vocab})
      scratch = std::max(scratch, cuda::matmul_backward_scratch(models, n, c.d_model, out));
    r.reserve(scratch_, scratch);
    r.allocate();
    inputs_ = DeviceBuffer<int32_t>(rows);
    targets_ = DeviceBuffer<int32_t>(rows);
    losses_ = DeviceBuffer<float>(M);
    norms_ = DeviceBuffer<float>(M);
    scales_ = DeviceBuffer<float>(M);
    finite_ = DeviceBuffer<int>(1);
    step_params_ = DeviceBuffer<cuda::OptimizerStep>(1);
  }

  // The step's constants, in float64 as the CPU backend computes them.
  cuda::OptimizerStep optimizer_step(double lr, int64_t t) const {
    const OptimConfig& o = config_.optim;
    const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(t));
    return {static_cast<float>(lr / bc1),          static_cast<float>(1.0 / std::sqrt(bc2)),
            static_cast<float>(1.0 - lr * o.weight_decay), static_cast<float>(o.beta1),
            static_cast<float>(o.beta2),           static_cast<float>(o.eps),
            o.clip};
  }

  void forward(int B, bool for_backward) {
    const ModelConfig& c = config_.model;
    const int M = config_.models, T = c.seq_len, C = c.d_model, D = c.d_mlp, V = c.vocab, H = c.heads, N = B * T;
    const cudaStream_t s = stream_.get();
    const cublasHandle_t h = cublas_.get();
    const auto p = param_pointers(layout_, c, params_.data());
    const bool learned = c.pos == PosEncoding::learned;
    cuda::embedding_forward(encoded_, inputs_.data(), p.wte, learned ? p.wpe : positions_.data(),
                            learned ? int64_t(T) * C : 0, M, B, T, C, V, s);
    const float* residual = encoded_;
    for (int l = 0; l < c.layers; ++l) {
      const LayerActs& a = layers_[l];
      const auto& w = p.blocks[l];
      cuda::layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, w.ln1_w, w.ln1_b, M, N, C, s);
      cuda::matmul_forward(h, a.qkv, a.ln1, w.qkv_w, M, N, C, 3 * C);
      cuda::bias_forward(a.qkv, w.qkv_b, nullptr, M, N, 3 * C, s);
      cuda::attention_forward(a.atty, a.att, a.qkv, M, B, T, C, H, s);
      cuda::matmul_forward(h, a.resid_mid, a.atty, w.proj_w, M, N, C, C);
      cuda::bias_forward(a.resid_mid, w.proj_b, residual, M, N, C, s);
      cuda::layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.resid_mid, w.ln2_w, w.ln2_b, M, N, C, s);
      cuda::matmul_forward(h, a.pre, a.ln2, w.fc_w, M, N, C, D);
      cuda::bias_activation_forward(a.pre, a.post, w.fc_b, M, N, D, to_act(c.activation), s);
      cuda::matmul_forward(h, a.resid_out, a.post, w.out_w, M, N, D, C);
      cuda::bias_forward(a.resid_out, w.out_b, a.resid_mid, M, N, C, s);
      residual = a.resid_out;
    }
    cuda::layernorm_forward(lnf_, lnf_mean_, lnf_rstd_, residual, p.lnf_w, p.lnf_b, M, N, C, s);
    cuda::matmul_forward(h, logits_, lnf_, p.lm_head, M, N, C, V);
    cuda::crossentropy_forward_backward(losses_.data(), row_loss_, logits_, targets_.data(), M, N, V, for_backward, s);
  }

  // After forward(batch, true): gradients of every model's loss into grads_ (zeroed before).
  void backward() {
    const ModelConfig& c = config_.model;
    const int M = config_.models, B = config_.batch, T = c.seq_len, C = c.d_model, D = c.d_mlp, V = c.vocab,
              H = c.heads, N = B * T;
    const cudaStream_t s = stream_.get();
    const cublasHandle_t h = cublas_.get();
    const auto p = param_pointers(layout_, c, params_.data());
    const auto g = param_pointers(layout_, c, grads_.data());
    const float* last = c.layers > 0 ? layers_.back().resid_out : encoded_;
    cuda::matmul_backward(h, dlnf_, g.lm_head, scratch_, logits_, lnf_, p.lm_head, M, N, C, V);  // logits hold dlogits
    UNIV_CUDA_CHECK(cudaMemsetAsync(dresidual_, 0, sizeof(float) * size_t(M) * N * C, s));
    cuda::layernorm_backward(dresidual_, g.lnf_w, g.lnf_b, scratch_, dlnf_, last, p.lnf_w, lnf_mean_, lnf_rstd_, M, N,
                             C, s);
    for (int l = c.layers - 1; l >= 0; --l) {
      const LayerActs& a = layers_[l];
      const auto& w = p.blocks[l];
      const auto& gw = g.blocks[l];
      const float* residual = l == 0 ? encoded_ : layers_[l - 1].resid_out;
      // MLP branch: resid_out = resid_mid + act(ln2 W1^T + b1) W2^T + b2
      cuda::bias_activation_backward(nullptr, gw.out_b, scratch_, dresidual_, nullptr, M, N, C, cuda::Act::none, s);
      cuda::matmul_backward(h, dpost_, gw.out_w, scratch_, dresidual_, a.post, w.out_w, M, N, D, C);
      cuda::bias_activation_backward(dpre_, gw.fc_b, scratch_, dpost_, a.pre, M, N, D, to_act(c.activation), s);
      cuda::matmul_backward(h, dln_, gw.fc_w, scratch_, dpre_, a.ln2, w.fc_w, M, N, C, D);
      cuda::layernorm_backward(dresidual_, gw.ln2_w, gw.ln2_b, scratch_, dln_, a.resid_mid, w.ln2_w, a.ln2_mean,
                               a.ln2_rstd, M, N, C, s);
      // attention branch: resid_mid = residual + attention(ln1 Wqkv^T + bqkv) Wproj^T + bproj
      cuda::bias_activation_backward(nullptr, gw.proj_b, scratch_, dresidual_, nullptr, M, N, C, cuda::Act::none, s);
      cuda::matmul_backward(h, datty_, gw.proj_w, scratch_, dresidual_, a.atty, w.proj_w, M, N, C, C);
      cuda::attention_backward(dqkv_, datty_, a.qkv, a.att, M, B, T, C, H, s);
      cuda::bias_activation_backward(nullptr, gw.qkv_b, scratch_, dqkv_, nullptr, M, N, 3 * C, cuda::Act::none, s);
      cuda::matmul_backward(h, dln_, gw.qkv_w, scratch_, dqkv_, a.ln1, w.qkv_w, M, N, C, 3 * C);
      cuda::layernorm_backward(dresidual_, gw.ln1_w, gw.ln1_b, scratch_, dln_, residual, w.ln1_w, a.ln1_mean,
                               a.ln1_rstd, M, N, C, s);
    }
    cuda::embedding_backward(g.wte, g.wpe, dresidual_, inputs_.data(), M, B, T, C, V, s);
  }

  // Norms, clipping, AdamW (skipped on device when anything is not finite), and the
  // losses, norms and verdict copied to pinned host memory.
  void optimize() {
    const int M = config_.models, S = static_cast<int>(host_segments_.size());
    const cudaStream_t s = stream_.get();
    cuda::grad_norms(partials_.data(), norms_.data(), scales_.data(), finite_.data(), grads_.data(), segments_.data(),
                     S, losses_.data(), M, step_params_.data(), s);
    cuda::adamw_update(params_.data(), grads_.data(), exp_avg_.data(), exp_avg_sq_.data(), segments_.data(), S,
                       scales_.data(), finite_.data(), step_params_.data(), s);
    losses_.download(host_stats_.data(), M, s);
    norms_.download(host_stats_.data() + M, M, s);
    finite_.download(host_finite_.data(), 1, s);
  }

  std::vector<float> download(const DeviceBuffer<float>& b) const {
    std::vector<float> out(b.size());
    stream_.synchronize();
    UNIV_CUDA_CHECK(cudaMemcpy(out.data(), b.data(), b.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
  }

  RunConfig config_;
  ParamLayout layout_;
  cuda::Stream stream_;
  cuda::CublasHandle cublas_;
  DeviceBuffer<float> params_, grads_, exp_avg_, exp_avg_sq_, positions_;
  Arena arena_;
  float* encoded_ = nullptr;
  std::vector<LayerActs> layers_;
  float *lnf_ = nullptr, *lnf_mean_ = nullptr, *lnf_rstd_ = nullptr, *logits_ = nullptr, *row_loss_ = nullptr;
  float *dresidual_ = nullptr, *dln_ = nullptr, *datty_ = nullptr, *dqkv_ = nullptr, *dpre_ = nullptr,
        *dpost_ = nullptr, *dlnf_ = nullptr, *scratch_ = nullptr;
  DeviceBuffer<int32_t> inputs_, targets_;
  std::vector<cuda::ParamSegment> host_segments_;
  DeviceBuffer<cuda::ParamSegment> segments_;
  DeviceBuffer<double> partials_;
  DeviceBuffer<float> losses_, norms_, scales_;
  DeviceBuffer<int> finite_;
  DeviceBuffer<cuda::OptimizerStep> step_params_;
  PinnedBuffer<int32_t> host_tokens_;
  PinnedBuffer<cuda::OptimizerStep> host_step_;
  PinnedBuffer<float> host_stats_;
  PinnedBuffer<int> host_finite_;
  std::unique_ptr<cuda::Graph> graph_;
  int64_t step_ = 0;
};

}  // namespace

std::unique_ptr<TrainBackend> make_cuda_backend(const RunConfig& config, Precision precision) {
  return std::make_unique<CudaBackend>(config, precision);
}

std::unique_ptr<DeviceForward> make_device_forward(const RunConfig& config, const std::vector<float>& params) {
  if (config.models != 1) throw std::invalid_argument("make_device_forward: one model");
  auto net = std::make_unique<CudaBackend>(config, Precision::fp32);
  const std::vector<float> zeros(params.size(), 0.0f);
  net->set_state({params, zeros, zeros, 0});
  return net;
}

}  // namespace univ
