// The CPU training backend: Model<float> plus clipping and AdamW on the host.
#include <algorithm>
#include <cmath>
#include <memory>

#include "univ/backend.hpp"
#include "univ/cpu/model.hpp"
#include "univ/cpu/ops.hpp"
#include "univ/data.hpp"

namespace univ {

namespace {

class CpuBackend final : public TrainBackend {
 public:
  explicit CpuBackend(const RunConfig& config)
      : config_(config),
        model_(config.model, config.models, config.batch),
        exp_avg_(model_.layout().total(), 0.0f),
        exp_avg_sq_(model_.layout().total(), 0.0f) {}

  Device device() const override { return Device::cpu; }

  void set_state(const TrainState& s) override {
    const size_t n = model_.layout().total();
    if (s.params.size() != n || s.exp_avg.size() != n || s.exp_avg_sq.size() != n)
      throw std::invalid_argument("CpuBackend::set_state: state does not match the parameter layout");
    model_.params() = s.params;
    exp_avg_ = s.exp_avg;
    exp_avg_sq_ = s.exp_avg_sq;
    step_ = s.step;
  }

  TrainState state() const override { return {model_.params(), exp_avg_, exp_avg_sq_, step_}; }
  std::vector<float> gradients() const override { return model_.grads(); }

  StepStats step(const int32_t* inputs, const int32_t* targets, double lr) override {
    const int M = config_.models;
    const ParamLayout& layout = model_.layout();
    std::vector<float> losses(M);
    model_.forward(inputs, targets, config_.batch, losses.data(), true);
    model_.backward();

    // Norms, clipping and AdamW per model, one thread per model as in the model's passes.
    StepStats stats;
    stats.loss.assign(losses.begin(), losses.end());
    stats.grad_norm.resize(M);
#pragma omp parallel for schedule(static, 1) if (M > 1)
    for (int m = 0; m < M; ++m) {
      double squares = 0;
      for (const auto& t : layout.tensors())
        squares += cpu::sum_squares(model_.grads().data() + layout.offset(t, m), t.numel);
      stats.grad_norm[m] = std::sqrt(squares);
    }
    for (int m = 0; m < M; ++m)
      stats.finite = stats.finite && std::isfinite(stats.loss[m]) && std::isfinite(stats.grad_norm[m]);
    if (!stats.finite) {
      stats.fault = describe_fault(stats, layout, model_.params(), model_.grads());
      return stats;
    }

    ++step_;
    const OptimConfig& o = config_.optim;
#pragma omp parallel for schedule(static, 1) if (M > 1)
    for (int m = 0; m < M; ++m) {
      // PyTorch's clip_grad_norm_: scale by clip / (norm + 1e-6) when that is below 1.
      const double scale = o.clip > 0 ? std::min(1.0, o.clip / (stats.grad_norm[m] + 1e-6)) : 1.0;
      for (const auto& t : layout.tensors()) {
        const int64_t at = layout.offset(t, m);
        const cpu::AdamWStep h{lr, o.beta1, o.beta2, o.eps, t.decay ? o.weight_decay : 0.0, step_};
        cpu::adamw_update(model_.params().data() + at, model_.grads().data() + at, exp_avg_.data() + at,
                          exp_avg_sq_.data() + at, t.numel, scale, h);
      }
    }
    return stats;
  }

  std::vector<StepStats> steps(const int32_t* inputs, const int32_t* targets, const double* lr, int n) override {
    const int64_t tokens = int64_t(config_.models) * config_.batch * config_.model.seq_len;
    std::vector<StepStats> done;
    for (int k = 0; k < n && (done.empty() || done.back().finite); ++k)
      done.push_back(step(inputs + k * tokens, targets + k * tokens, lr[k]));
    return done;
  }

  std::vector<double> evaluate(const int32_t* sequences, int64_t count) override {
    const int M = config_.models, T = config_.model.seq_len;
    std::vector<double> total(M, 0.0);
    std::vector<int32_t> inputs(int64_t(M) * config_.batch * T), targets(inputs.size());
    std::vector<float> losses(M);
    for (int64_t first = 0; first < count; first += config_.batch) {
      const int b = static_cast<int>(std::min<int64_t>(config_.batch, count - first));
      for (int m = 0; m < M; ++m)  // every model sees the same sequences
        split_inputs_targets(sequences + first * (T + 1), b, T, inputs.data() + int64_t(m) * b * T,
                             targets.data() + int64_t(m) * b * T);
      model_.forward(inputs.data(), targets.data(), b, losses.data(), false);
      for (int m = 0; m < M; ++m) total[m] += double(losses[m]) * b;
    }
    for (double& t : total) t /= static_cast<double>(std::max<int64_t>(count, 1));
    return total;
  }

 private:
  RunConfig config_;
  cpu::Model<float> model_;
  std::vector<float> exp_avg_, exp_avg_sq_;
  int64_t step_ = 0;
};

}  // namespace

std::unique_ptr<TrainBackend> make_cpu_backend(const RunConfig& config) { return std::make_unique<CpuBackend>(config); }

}  // namespace univ
