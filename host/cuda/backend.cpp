// The CUDA training backend: every op a kernel over all M models, matrix products
// as cuBLAS strided-batched GEMMs, and one training step (forward, backward, norms,
// AdamW, the copy of losses and norms to the host) captured once as a CUDA graph.
// Per step only the batch and the step's constants go up before the graph launch.
// Backward, the parameter gradients (weight products, bias and layer-norm column sums)
// run on more streams beside the chain of input gradients, which is all the next
// layer waits for; their column sums' second stages run once a layer beside it.
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "univ/backend.hpp"
#include "univ/cpu/ops.hpp"
#include "univ/cuda/chained_launch.hpp"
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

// Device memory with a pinned host mirror, carved into parts like Arena and copied
// whole: a step's constants and batch go up, and its report comes down, in one copy.
class Mirrored {
 public:
  template <class T>
  void reserve(T*& device, T*& host, size_t n) {
    const size_t at = used_;
    pending_.push_back([&device, &host, at](char* d, char* h) {
      device = reinterpret_cast<T*>(d + at);
      host = reinterpret_cast<T*>(h + at);
    });
    used_ += (n * sizeof(T) + 15) / 16 * 16;
  }
  void allocate() {
    device_ = DeviceBuffer<char>(used_);
    host_.emplace(used_);
    for (const auto& set : pending_) set(device_.data(), host_->data());
    pending_.clear();
  }
  void upload(cudaStream_t stream) { device_.upload(host_->data(), used_, stream); }
  void download(cudaStream_t stream) { device_.download(host_->data(), used_, stream); }
  char* device_data() { return device_.data(); }
  const char* host_data() const { return host_->data(); }
  size_t bytes() const { return used_; }  // a multiple of 16

 private:
  size_t used_ = 0;
  std::vector<std::function<void(char*, char*)>> pending_;
  DeviceBuffer<char> device_;
  std::optional<PinnedBuffer<char>> host_;
};

// Runs of training steps queued on the device (kernels/step_queue.cu): the cursor, then
// two halves of `capacity` slots, each an image of the step's Mirrored batch (its
// constants and batch), in pinned host memory and on the device; and each slot's report
// (losses, norms, finite), which grad_norms writes into pinned memory. Runs alternate
// halves, so that the host fills the next run's slots while the device works through
// the current one.
class StepQueue {
 public:
  StepQueue(size_t slot_bytes, int M)
      : capacity_(static_cast<int>(std::clamp<int64_t>(kHalfBytes / int64_t(slot_bytes), 1, kMaxCapacity))),
        slot_bytes_(slot_bytes),
        M_(M),
        device_(kHeaderBytes + 2 * capacity_ * slot_bytes),
        host_(device_.size()),
        losses_(size_t(2) * capacity_ * M),
        norms_(losses_.size()),
        finite_(size_t(2) * capacity_) {}
  int capacity() const { return capacity_; }
  // Where `at`, a part of the step's host image `image`, sits in slot k.
  template <class T>
  T* in_slot(T* at, const char* image, int k) {
    return reinterpret_cast<T*>(host_.data() + offset(k) + (reinterpret_cast<const char*>(at) - image));
  }
  // The cursor at slot `first` (and the slots [first, first + count) with upload_slots,
  // in the same copy where they follow the cursor), then `count` replays of the step's
  // graph, which take those slots in turn.
  void run(int first, int count, bool upload_slots, const cuda::Graph& graph, cudaStream_t stream) {
    *reinterpret_cast<cuda::StepCursor*>(host_.data()) = {first, 0};
    if (upload_slots && first == 0) {
      device_.upload(host_.data(), offset(count), stream);
    } else {
      device_.upload(host_.data(), kHeaderBytes, stream);
      if (upload_slots) device_.upload(host_.data() + offset(first), count * slot_bytes_, stream, offset(first));
    }
    for (int k = 0; k < count; ++k) graph.launch(stream);
  }
  const cuda::StepCursor* cursor() const { return reinterpret_cast<const cuda::StepCursor*>(device_.data()); }
  const char* slots() const { return device_.data() + kHeaderBytes; }
  cuda::StepReport report() {
    return {losses_.data(), norms_.data(), finite_.data(), reinterpret_cast<cuda::StepCursor*>(device_.data())};
  }
  // Slot k's report, once its run is complete.
  StepStats stats(int k) const {
    StepStats s;
    s.loss.assign(losses_.data() + int64_t(k) * M_, losses_.data() + int64_t(k + 1) * M_);
    s.grad_norm.assign(norms_.data() + int64_t(k) * M_, norms_.data() + int64_t(k + 1) * M_);
    s.finite = finite_.data()[k] != 0;
    return s;
  }

 private:
  static constexpr int64_t kHeaderBytes = 16, kHalfBytes = int64_t(32) << 20;
  static constexpr int kMaxCapacity = 32;
  size_t offset(int k) const { return kHeaderBytes + size_t(k) * slot_bytes_; }
  int capacity_;
  size_t slot_bytes_;
  int M_;
  DeviceBuffer<char> device_;
  PinnedBuffer<char> host_;
  PinnedBuffer<float> losses_, norms_;
  PinnedBuffer<int> finite_;
};

// A stream for parameter gradients with its own cuBLAS handle (and workspace).
struct Lane {
  explicit Lane(bool tf32) : cublas(stream.get(), tf32) {}
  cuda::Stream stream;
  cuda::CublasHandle cublas;
  cuda::Event done{cudaEventDisableTiming};
};

// The backward pass's streams beside the main one: lanes for the parameter gradients
// (weight products and column sums), taken in turn so that a layer's run side by side
// (each is a small launch that leaves most of the GPU idle), one stream that ends the
// pass (the loss means, the column sums' second stage), and the events that order
// them against the main stream (edges of the captured graph).
struct SideStreams {
  static constexpr int kLanes = 4;
  explicit SideStreams(bool tf32) {
    for (int i = 0; i < kLanes; ++i) lanes.push_back(std::make_unique<Lane>(tf32));
  }
  Lane& next() { return *lanes[next_lane++ % lanes.size()]; }
  std::vector<std::unique_ptr<Lane>> lanes;
  size_t next_lane = 0;
  cuda::Stream end;
  cuda::Event fork{cudaEventDisableTiming}, join{cudaEventDisableTiming};
};

class CudaBackend final : public TrainBackend, public DeviceForward {
 public:
  // training false: a forward-only network (no gradients, optimizer state or
  // backward buffers), for DeviceForward; its parameters come from load_params().
  CudaBackend(const RunConfig& config, Precision precision, CudaFusion fusion, CudaLaunch launch, bool training = true)
      : config_(config),
        layout_(config.model, config.models),
        training_(training),
        tf32_(precision == Precision::tf32),
        apart_(fusion == CudaFusion::ops),
        chained_(launch == CudaLaunch::chained),
        fused_(fusion == CudaFusion::blocks && config.model.layers > 0 &&
               cuda::block_forward_fits(config.model.seq_len, config.model.d_model, config.model.heads,
                                        config.model.d_mlp)),
        fused_head_(fused_ && cuda::block_forward_fits(config.model.seq_len, config.model.d_model,
                                                       config.model.heads, config.model.d_mlp, config.model.vocab)),
        fused_backward_(training && fused_ &&
                        cuda::block_backward_fits(config.model.seq_len, config.model.d_model, config.model.heads,
                                                  config.model.d_mlp)),
        cublas_(stream_.get(), tf32_),
        params_(layout_.total()),
        grads_(training ? layout_.total() : 0),
        exp_avg_(training ? layout_.total() : 0),
        exp_avg_sq_(training ? layout_.total() : 0) {
    const ModelConfig& c = config.model;
    const int max_T = cuda::attention_max_seq_len(c.head_dim());
    if (c.seq_len > max_T)
      throw UserError("--seq-len " + std::to_string(c.seq_len) + " is beyond what the CUDA attention kernel holds for " +
                      "head width " + std::to_string(c.head_dim()) + " (at most " + std::to_string(max_T) + ")");
    cuda::prepare_attention_kernels();
    cuda::prepare_mlp_kernels();
    if (fused_) cuda::prepare_block_kernels();
    allocate();
    if (training) {
      std::vector<cuda::ParamSegment> segments;
      for (const auto& t : layout_.tensors())
        for (int m = 0; m < config.models; ++m) segments.push_back({layout_.offset(t, m), t.numel, m, t.decay ? 1 : 0});
      const auto pieces = cuda::norm_pieces(segments);
      pieces_ = DeviceBuffer<cuda::ParamSegment>(pieces.size());
      pieces_.upload(pieces.data(), pieces.size(), stream_.get());
      norm_partials_ = DeviceBuffer<double>(pieces.size());
      norm_blocks_done_ = DeviceBuffer<unsigned>(1);
      norm_blocks_done_.fill_bytes(0, stream_.get());
    }
    if (c.pos == PosEncoding::sinusoidal) {
      std::vector<float> table(size_t(c.seq_len) * c.d_model);
      cpu::sinusoidal_positions(table.data(), c.seq_len, c.d_model);
      positions_ = DeviceBuffer<float>(table.size());
      positions_.upload(table.data(), table.size(), stream_.get());
    }
    // Zero once: the padding between tensors is never written after.
    for (auto* b : {&params_, &grads_, &exp_avg_, &exp_avg_sq_}) b->fill_bytes(0, stream_.get());
    stream_.synchronize();
  }

  Device device() const override { return Device::cuda; }

  // Parameters only, for a forward-only network.
  void load_params(const std::vector<float>& params) {
    if (params.size() != static_cast<size_t>(layout_.total()))
      throw std::invalid_argument("CudaBackend::load_params: parameters do not match the layout");
    params_.upload(params.data(), params.size(), stream_.get());
    stream_.synchronize();
  }

  void set_state(const TrainState& s) override {
    require_training("set_state");
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
    require_training("state");
    TrainState s{download(params_), download(exp_avg_), download(exp_avg_sq_), step_};
    return s;
  }

  std::vector<float> gradients() const override {
    require_training("gradients");
    return download(grads_);
  }

  void start(const int32_t* inputs, const int32_t* targets, int b, bool post, float* out, int64_t n) override {
    const ModelConfig& c = config_.model;
    if (config_.models != 1 || b < 1 || b > config_.batch || n > int64_t(b) * c.seq_len)
      throw std::invalid_argument("CudaBackend::start: one model, at most batch sequences, at most b * seq_len tokens");
    if (started_) throw std::logic_error("CudaBackend::start: the last run is not finished");
    const cudaStream_t s = stream_.get();
    std::copy_n(inputs, size_t(b) * c.seq_len, host_inputs_);
    std::copy_n(targets, size_t(b) * c.seq_len, host_targets_);
    batch_.upload(s);
    forward(b, false);
    const size_t width = sizeof(float) * c.d_mlp;
    for (int l = 0; l < c.layers; ++l)  // [n, D] per layer -> columns [l D, (l + 1) D) of out
      UNIV_CUDA_CHECK(cudaMemcpy2DAsync(out + int64_t(l) * c.d_mlp, width * c.layers,
                                        post ? layers_[l].post : layers_[l].pre, width, width, n,
                                        cudaMemcpyDeviceToDevice, s));
    report_.download(s);
    started_ = true;
  }

  double finish() override {
    if (!started_) throw std::logic_error("CudaBackend::finish: no run started");
    stream_.synchronize();
    started_ = false;
    return host_losses_[0];
  }

  StepStats step(const int32_t* inputs, const int32_t* targets, double lr) override {
    return steps(inputs, targets, &lr, 1).front();
  }

  // The steps in runs of up to the queue's capacity: each run's slots filled on the host
  // (the next run's while the device works through this one), uploaded in one copy and
  // replayed without waiting in between; one wait per run. A run's first step that is
  // not finite stops it on the device (no later step of the run updates) and here; it
  // runs once more alone, so that the gradients describe_fault reads are its own.
  std::vector<StepStats> steps(const int32_t* inputs, const int32_t* targets, const double* lr, int n) override {
    require_training("steps");
    const int64_t tokens = int64_t(config_.models) * config_.batch * config_.model.seq_len;
    cuda::check_tokens(inputs, tokens * n, config_.model.vocab);  // before any step runs
    if (!graph_) {
      side_ = std::make_unique<SideStreams>(tf32_);
      graph_ = std::make_unique<cuda::Graph>(stream_.get(), [&] {
        const cuda::ChainedLaunches chaining(chained_);
        cuda::load_queued_step(batch_.device_data(), queue_->slots(), static_cast<int64_t>(batch_.bytes()),
                               queue_->cursor(), stream_.get());
        forward(config_.batch, true);
        backward();
        optimize();
      });
    }
    StepQueue& q = *queue_;
    const int64_t updates_before = step_;
    auto fill = [&](int half, int first, int count) {  // steps [first, first + count) into a half's slots
      for (int k = 0; k < count; ++k)
        fill_slot(half * q.capacity() + k, inputs + (first + k) * tokens, targets + (first + k) * tokens,
                  optimizer_step(lr[first + k], updates_before + first + k + 1));
    };
    std::vector<StepStats> done;
    int half = 0, count = std::min(n, q.capacity());
    fill(half, 0, count);
    for (int first = 0; first < n; half ^= 1) {
      q.run(half * q.capacity(), count, true, *graph_, stream_.get());
      const int next = first + count, next_count = std::min(n - next, q.capacity());
      if (next_count > 0) fill(1 - half, next, next_count);
      stream_.synchronize();
      for (int k = 0; k < count; ++k) {
        StepStats stats = q.stats(half * q.capacity() + k);
        if (!stats.finite) {
          if (k + 1 < count) {
            q.run(half * q.capacity() + k, 1, false, *graph_, stream_.get());
            stream_.synchronize();
          }
          stats.fault = describe_fault(stats, layout_, download(params_), download(grads_));
          done.push_back(std::move(stats));
          return done;
        }
        ++step_;
        done.push_back(std::move(stats));
      }
      first = next, count = next_count;
    }
    return done;
  }

  bool queues_steps() const override { return true; }

  std::vector<double> evaluate(const int32_t* sequences, int64_t count) override {
    const int M = config_.models, T = config_.model.seq_len;
    std::vector<double> total(M, 0.0);
    for (int64_t first = 0; first < count; first += config_.batch) {
      const int b = static_cast<int>(std::min<int64_t>(config_.batch, count - first));
      for (int m = 0; m < M; ++m)  // every model sees the same sequences
        split_inputs_targets(sequences + first * (T + 1), b, T, host_inputs_ + int64_t(m) * b * T,
                             host_targets_ + int64_t(m) * b * T);
      batch_.upload(stream_.get());
      forward(b, false);
      report_.download(stream_.get());
      stream_.synchronize();
      for (int m = 0; m < M; ++m) total[m] += double(host_losses_[m]) * b;
    }
    for (double& t : total) t /= static_cast<double>(std::max<int64_t>(count, 1));
    return total;
  }

 private:
  // qkv holds the QKV bias where the block forward wrote it, not where the attention
  // kernel added it as it loaded.
  struct LayerActs {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *att, *lse, *atty, *resid_mid, *ln2, *ln2_mean, *ln2_rstd, *pre, *post,
        *resid_out;
  };
  // A layer's gradients that the side stream reads: each written once per pass, so the
  // main stream never overwrites what the side stream has yet to read.
  struct LayerGrads {
    float *dresid_in, *dresid_mid, *dln1, *dqkv, *dln2, *dpre;
  };

  void require_training(const char* what) const {
    if (!training_) throw std::logic_error(std::string("CudaBackend::") + what + ": a forward-only network");
  }

  void allocate() {
    const ModelConfig& c = config_.model;
    const int64_t M = config_.models, T = c.seq_len, C = c.d_model, D = c.d_mlp, V = c.vocab, H = c.heads;
    const int64_t rows = M * config_.batch * T;
    // The probabilities, where the block kernels or the attention's forward write them
    // (attention_with_products sets lse where the block kernels do not run)
    const bool keeps_att =
        fused_ || cuda::attention_keeps_probabilities(c.seq_len, c.d_model, c.heads, tf32_, training_, true);
    auto& r = arena_;
    r.reserve(encoded_, rows * C);
    layers_.resize(c.layers);
    for (auto& l : layers_) {
      r.reserve(l.ln1, rows * C), r.reserve(l.ln1_mean, rows), r.reserve(l.ln1_rstd, rows);
      r.reserve(l.qkv, rows * 3 * C), r.reserve(l.lse, rows * H), r.reserve(l.atty, rows * C);
      if (keeps_att) r.reserve(l.att, M * config_.batch * H * T * T);
      r.reserve(l.resid_mid, rows * C), r.reserve(l.ln2, rows * C), r.reserve(l.ln2_mean, rows);
      r.reserve(l.ln2_rstd, rows), r.reserve(l.pre, rows * D), r.reserve(l.post, rows * D);
      r.reserve(l.resid_out, rows * C);
    }
    r.reserve(lnf_, rows * C), r.reserve(lnf_mean_, rows), r.reserve(lnf_rstd_, rows), r.reserve(logits_, rows * V);
    r.reserve(row_loss_, rows);
    if (training_) {
      r.reserve(dlnf_, rows * C), r.reserve(dresid_top_, rows * C);
      if (!fused_backward_) r.reserve(datty_, rows * C);  // unused where the kernels keep it in shared memory
      layer_grads_.resize(c.layers);
      for (auto& l : layer_grads_) {
        r.reserve(l.dresid_in, rows * C), r.reserve(l.dresid_mid, rows * C), r.reserve(l.dln1, rows * C);
        r.reserve(l.dqkv, rows * 3 * C), r.reserve(l.dln2, rows * C), r.reserve(l.dpre, rows * D);
      }
      // Every column sum's partials wait in the scratch until the pass's one stage-2
      // launch: room for each bias and norm vector (in row chunks, or a share per
      // sequence from the block kernel) and each weight matrix whose rows split (the
      // embeddings sum without partials).
      const int models = config_.models, n = config_.batch * c.seq_len;
      int64_t partials = 0;
      for (const auto& t : layout_.tensors()) {
        if (t.shape.size() == 1)
          partials += std::max(cuda::column_sum_partials(models, n, t.numel),
                               cuda::ColumnSums::room(int64_t(models) * config_.batch * t.numel));
        else if (t.name != "wte" && t.name != "wpe")
          partials += cuda::matmul_backward_partials(models, n, static_cast<int>(t.shape[1]),
                                                     static_cast<int>(t.shape[0]));
      }
      r.reserve(partials_, partials);
      r.allocate();
      column_sums_ = std::make_unique<cuda::ColumnSums>(partials_, partials);
    } else {
      r.allocate();
    }
    batch_.reserve(step_params_, host_step_, 1);
    batch_.reserve(inputs_, host_inputs_, rows);
    batch_.reserve(targets_, host_targets_, rows);
    if (training_) {
      batch_.reserve(token_rows_, host_token_rows_, rows);
      batch_.reserve(token_starts_, host_token_starts_, M * (V + 1));
    }
    batch_.allocate();
    report_.reserve(losses_, host_losses_, M);
    report_.allocate();
    scales_ = DeviceBuffer<float>(M);
    if (training_) {
      norms_ = DeviceBuffer<float>(M);
      finite_ = DeviceBuffer<int>(1);
      queue_ = std::make_unique<StepQueue>(batch_.bytes(), M);
    }
  }

  // Slot k of the queue: a step's constants and batch (inputs, targets [models, batch,
  // seq_len]), with the inputs' positions sorted by token for the embedding's backward.
  void fill_slot(int k, const int32_t* inputs, const int32_t* targets, const cuda::OptimizerStep& constants) {
    const int M = config_.models, N = config_.batch * config_.model.seq_len;
    const char* image = batch_.host_data();
    *queue_->in_slot(host_step_, image, k) = constants;
    std::copy_n(inputs, size_t(M) * N, queue_->in_slot(host_inputs_, image, k));
    std::copy_n(targets, size_t(M) * N, queue_->in_slot(host_targets_, image, k));
    cuda::sort_positions_by_token(queue_->in_slot(host_token_rows_, image, k),
                                  queue_->in_slot(host_token_starts_, image, k), inputs, M, N, config_.model.vocab);
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

  // The layers (one fused kernel per layer where the shape fits, block.cu, else one
  // kernel per op), the final norm, the logits and row losses (for_backward: logits_
  // then holds their gradient, and dlnf_ and dresid_top_ the gradient back to the last
  // layer's output) and each model's mean loss.
  void forward(int B, bool for_backward) {
    const ModelConfig& c = config_.model;
    const int M = config_.models, N = B * c.seq_len;
    const cudaStream_t s = stream_.get();
    const auto p = param_pointers(layout_, c, params_.data());
    if (fused_) {
      forward_fused_blocks(B, p, for_backward);
      if (!fused_head_)
        for (const auto& product : head_products(B, p, for_backward)) cuda::run_row_product(cublas_.get(), product, M);
    } else {
      forward_per_op(B, p, for_backward);
    }
    if (for_backward) {  // the losses wait beside the backward pass (its join orders them before the norms)
      fork();
      cuda::mean_loss_per_model(losses_, row_loss_, M, N, side_->end.get());
    } else {
      cuda::mean_loss_per_model(losses_, row_loss_, M, N, s);
    }
  }

  // Layer l's MLP sublayer (N rows per model): its weights and the activations both
  // directions read; the caller adds the norm after it or the gradients.
  cuda::MlpSublayer mlp_sublayer(int l, const ParamPointers<float>::Block& w, int N) const {
    const LayerActs& a = layers_[l];
    cuda::MlpSublayer m{};
    m.ln2 = a.ln2, m.fc_w = w.fc_w, m.fc_b = w.fc_b, m.out_w = w.out_w, m.out_b = w.out_b, m.resid_mid = a.resid_mid;
    m.pre = a.pre, m.post = a.post, m.resid_out = a.resid_out;
    m.ln2_w = w.ln2_w, m.ln2_mean = a.ln2_mean, m.ln2_rstd = a.ln2_rstd;
    m.N = N, m.C = config_.model.d_model, m.D = config_.model.d_mlp, m.act = to_act(config_.model.activation);
    m.apart = apart_, m.tf32 = tf32_;
    return m;
  }

  // What the backward's activation derivative reads: pre, or a ReLU's post, which the
  // per-op forward of a step keeps instead (relu'(pre) = relu'(post), NaN too: 0), so
  // that it writes one [N, d_mlp] tensor fewer.
  bool relu() const { return config_.model.activation == Activation::relu; }
  float* relu_derivative_input(const LayerActs& a) const { return relu() ? a.post : a.pre; }

  // Layer l's attention with its products (B sequences per model): the weights and the
  // activations both directions use; the caller sets the bias and the gradients.
  cuda::AttentionWithProducts attention_with_products(int l, const ParamPointers<float>::Block& w, int B) const {
    const LayerActs& a = layers_[l];
    const ModelConfig& c = config_.model;
    cuda::AttentionWithProducts att{};
    att.ln = a.ln1, att.qkv_w = w.qkv_w, att.proj_w = w.proj_w, att.qkv = a.qkv, att.att = a.att, att.out = a.atty;
    att.lse = fused_ ? nullptr : a.lse;  // the block kernels' forward keeps att
    att.datty = datty_, att.B = B, att.T = c.seq_len, att.C = c.d_model, att.H = c.heads, att.apart = apart_;
    att.tf32 = tf32_;
    return att;
  }

  // The head over B sequences per model: the logits and loss, and for the backward
  // pass their gradient back to the last layer's output (dlnf, dresid_top; the logits
  // become their gradient).
  std::vector<cuda::RowProduct> head_products(int B, const ParamPointers<float>& p, bool for_backward) const {
    const ModelConfig& c = config_.model;
    const int N = B * c.seq_len, C = c.d_model, V = c.vocab;
    std::vector<cuda::RowProduct> head{
        cuda::crossentropy_product(row_loss_, logits_, lnf_, p.lm_head, targets_, N, C, V, for_backward)};
    if (for_backward)
      head.push_back(cuda::backward_input_layernorm_product(dlnf_, dresid_top_, nullptr, logits_, p.lm_head,
                                                            c.layers > 0 ? layers_.back().resid_out : encoded_,
                                                            p.lnf_w, lnf_mean_, lnf_rstd_, N, C, V));
    for (auto& product : head) product.apart = apart_;
    return head;
  }

  // Linear layers' biases are added by what reads their output next: the attention
  // adds the QKV bias, and the products that close a sublayer add theirs with the
  // residual, written straight into the residual stream, and take the layer norm after
  // it (the next layer's first, or the final norm). The attention's projection and the
  // head, or the next layer's QKV product, run in the MLP's kernel where they fit
  // (before and after it).
  void forward_per_op(int B, const ParamPointers<float>& p, bool for_backward) {
    const ModelConfig& c = config_.model;
    const int M = config_.models, T = c.seq_len, C = c.d_model, V = c.vocab, N = B * T;
    const cudaStream_t s = stream_.get();
    const cublasHandle_t h = cublas_.get();
    const bool learned = c.pos == PosEncoding::learned;
    // The norm of the embedding: the first layer's (formed by its attention, in its
    // kernel where it fits), or with no layers the final norm.
    auto embedding_norm = [&](float* ln, float* mean, float* rstd, const float* w, const float* b) {
      return cuda::EmbeddingNorm{ln, mean, rstd, encoded_, inputs_, p.wte, learned ? p.wpe : positions_.data(),
                                 learned ? int64_t(T) * C : 0, w, b, V};
    };
    const std::vector<cuda::RowProduct> head = head_products(B, p, for_backward);
    if (c.layers == 0) {
      cuda::embedding_layernorm_forward(embedding_norm(lnf_, lnf_mean_, lnf_rstd_, p.lnf_w, p.lnf_b), M, B, T, C, s);
      for (const auto& product : head) cuda::run_row_product(h, product, M);
    }
    for (int l = 0; l < c.layers; ++l) {
      const LayerActs& a = layers_[l];
      const auto& w = p.blocks[l];
      const float* residual = l == 0 ? encoded_ : layers_[l - 1].resid_out;
      cuda::AttentionWithProducts att = attention_with_products(l, w, B);
      att.qkv_b = w.qkv_b;  // added as q, k and v are formed
      att.for_backward = for_backward;
      cuda::EmbeddingNorm embedding{};
      if (l == 0) embedding = embedding_norm(a.ln1, a.ln1_mean, a.ln1_rstd, w.ln1_w, w.ln1_b), att.embedding = &embedding;
      if (l > 0) att.ln = nullptr;  // qkv formed after the MLP below
      cuda::attention_forward_with_products(h, att, M);
      cuda::RowProduct proj = cuda::add_layernorm_product(a.ln2, a.ln2_mean, a.ln2_rstd, a.resid_mid, a.atty, w.proj_w,
                                                          w.proj_b, residual, w.ln2_w, w.ln2_b, N, C, C);
      proj.apart = apart_;
      cuda::MlpSublayer mlp = mlp_sublayer(l, w, N);
      mlp.before = &proj;
      if (for_backward && relu()) mlp.pre = nullptr;  // the backward takes post (relu_derivative_input)
      const bool last = l + 1 == c.layers;  // the next norm: the next layer's first, or the final one
      mlp.next_ln = last ? lnf_ : layers_[l + 1].ln1, mlp.next_mean = last ? lnf_mean_ : layers_[l + 1].ln1_mean;
      mlp.next_rstd = last ? lnf_rstd_ : layers_[l + 1].ln1_rstd;
      mlp.next_w = last ? p.lnf_w : p.blocks[l + 1].ln1_w, mlp.next_b = last ? p.lnf_b : p.blocks[l + 1].ln1_b;
      cuda::RowProduct next_qkv{};  // the next layer's QKV product, after the MLP
      if (last) {
        mlp.after = head.data(), mlp.after_count = static_cast<int>(head.size());
      } else {
        next_qkv = cuda::linear_product(layers_[l + 1].qkv, layers_[l + 1].ln1, p.blocks[l + 1].qkv_w, N, C, 3 * C);
        next_qkv.apart = apart_;
        mlp.after = &next_qkv, mlp.after_count = 1;
      }
      cuda::mlp_forward(h, mlp, M);
    }
  }

  // One launch per layer; the last layer's ends with the final norm and, where it fits,
  // the head (with for_backward, back to the gradient at the last layer's output).
  void forward_fused_blocks(int B, const ParamPointers<float>& p, bool for_backward) {
    const ModelConfig& c = config_.model;
    const bool learned = c.pos == PosEncoding::learned;
    for (int l = 0; l < c.layers; ++l) {
      const LayerActs& a = layers_[l];
      const auto& w = p.blocks[l];
      const bool last = l + 1 == c.layers;
      cuda::BlockForward f{};
      f.resid_in = l == 0 ? nullptr : layers_[l - 1].resid_out;
      f.encoded = encoded_, f.tokens = inputs_, f.wte = p.wte;
      f.pos = learned ? p.wpe : positions_.data(), f.pos_model_stride = learned ? int64_t(c.seq_len) * c.d_model : 0;
      f.ln1_w = w.ln1_w, f.ln1_b = w.ln1_b, f.qkv_w = w.qkv_w, f.qkv_b = w.qkv_b, f.proj_w = w.proj_w;
      f.proj_b = w.proj_b, f.ln2_w = w.ln2_w, f.ln2_b = w.ln2_b, f.fc_w = w.fc_w, f.fc_b = w.fc_b;
      f.out_w = w.out_w, f.out_b = w.out_b;
      f.ln1 = a.ln1, f.ln1_mean = a.ln1_mean, f.ln1_rstd = a.ln1_rstd, f.qkv = a.qkv, f.att = a.att, f.atty = a.atty;
      f.resid_mid = a.resid_mid, f.ln2 = a.ln2, f.ln2_mean = a.ln2_mean, f.ln2_rstd = a.ln2_rstd, f.pre = a.pre;
      f.post = a.post, f.resid_out = a.resid_out;
      if (last) {
        f.lnf_w = p.lnf_w, f.lnf_b = p.lnf_b;
        f.lnf = lnf_, f.lnf_mean = lnf_mean_, f.lnf_rstd = lnf_rstd_;
      }
      if (last && fused_head_) {
        f.lm_head = p.lm_head, f.targets = targets_, f.logits = logits_, f.row_loss = row_loss_;
        f.backward = for_backward;
        if (for_backward) f.dlnf = dlnf_, f.dresid_top = dresid_top_;
      }
      f.B = B, f.T = c.seq_len, f.C = c.d_model, f.H = c.heads, f.D = c.d_mlp, f.V = c.vocab;
      f.scale = cuda::attention_scale(c.head_dim());
      f.act = to_act(c.activation);
      cuda::block_forward(f, config_.models, stream_.get());
    }
  }

  // What the side streams enqueue next waits for everything on the main stream so far.
  void fork() {
    side_->fork.record(stream_.get());
    for (const auto& lane : side_->lanes) side_->fork.make_wait(lane->stream.get());
    side_->fork.make_wait(side_->end.get());
  }

  // After forward(batch, true): gradients of every model's loss into grads_ (each
  // written once). The main stream runs the chain of input gradients; each parameter
  // gradient runs on a side lane once its inputs exist, every buffer they read
  // written once per pass; the column sums' second stages wait for all lanes, once
  // per layer and at the end, and the main stream for the last.
  void backward() {
    const ModelConfig& c = config_.model;
    const int M = config_.models, B = config_.batch, T = c.seq_len, C = c.d_model, D = c.d_mlp, V = c.vocab,
              H = c.heads, N = B * T;
    const cudaStream_t s = stream_.get(), end = side_->end.get();
    const cublasHandle_t h = cublas_.get();
    auto hs = [&] { return side_->next().cublas.get(); };   // the next lane's handle ...
    auto side = [&] { return side_->next().stream.get(); };  // ... or stream
    const cuda::Act none = cuda::Act::none;
    cuda::ColumnSums& sums = *column_sums_;
    const auto p = param_pointers(layout_, c, params_.data());
    const auto g = param_pointers(layout_, c, grads_.data());
    auto layer_input = [&](int l) { return l == 0 ? encoded_ : layers_[l - 1].resid_out; };
    // The second stage of the column sums added so far, on the end stream once every
    // lane has run their first: called once a layer, so that most of them run beside
    // the chain of input gradients and the last, which the optimizer waits for, sums
    // only the first layer's last few.
    auto sum_after_lanes = [&](bool last) {
      for (const auto& lane : side_->lanes) {  // split products are partials too
        lane->done.record(lane->stream.get());
        lane->done.make_wait(end);
      }
      if (last) sums.finish(end); else sums.sum_added(end);
    };
    // The forward pass ran the head's backward: logits hold dlogits, dlnf and dresid_top
    // are written.
    fork();
    cuda::matmul_backward_weight(hs(), g.lm_head, sums, logits_, lnf_, M, N, C, V);
    cuda::layernorm_backward_params(g.lnf_w, g.lnf_b, sums, dlnf_, layer_input(c.layers), lnf_mean_, lnf_rstd_, M, N,
                                    C, side());
    // Per op, layer l's input gradient through its QKV product and first norm (dln1,
    // dresid_in) runs before the MLP backward of the layer below, in its kernel where it
    // fits (pending until then), and then its norm's parameter gradients.
    auto qkv_input = [&](int l) {
      const LayerActs& a = layers_[l];
      const LayerGrads& d = layer_grads_[l];
      cuda::RowProduct product = cuda::backward_input_layernorm_product(
          d.dln1, d.dresid_in, d.dresid_mid, d.dqkv, p.blocks[l].qkv_w, layer_input(l), p.blocks[l].ln1_w, a.ln1_mean,
          a.ln1_rstd, N, C, 3 * C);
      product.apart = apart_;
      return product;
    };
    auto ln1_params = [&](int l) {
      const auto& gw = g.blocks[l];
      cuda::layernorm_backward_params(gw.ln1_w, gw.ln1_b, sums, layer_grads_[l].dln1, layer_input(l),
                                      layers_[l].ln1_mean, layers_[l].ln1_rstd, M, N, C, side());
    };
    std::optional<cuda::RowProduct> pending;
    const float* dresid = dresid_top_;  // the gradient at the current layer's output
    for (int l = c.layers - 1; l >= 0; --l) {
      const LayerActs& a = layers_[l];
      const LayerGrads& d = layer_grads_[l];
      const auto& w = p.blocks[l];
      const auto& gw = g.blocks[l];
      const float* residual = layer_input(l);
      // The parameter gradients on the side lanes, each once what it reads exists: the
      // weight products, and on the per-op path the bias and norm column sums (the
      // block kernel sums each sequence's share of those itself).
      // MLP: resid_out = resid_mid + act(ln2 W1^T + b1) W2^T + b2
      // attention: resid_mid = residual + attention(ln1 Wqkv^T + bqkv) Wproj^T + bproj
      auto fc_weight_grad = [&] { cuda::matmul_backward_weight(hs(), gw.fc_w, sums, d.dpre, a.ln2, M, N, C, D); };
      auto proj_weight_grad = [&] {
        cuda::matmul_backward_weight(hs(), gw.proj_w, sums, d.dresid_mid, a.atty, M, N, C, C);
      };
      auto qkv_weight_grad = [&] { cuda::matmul_backward_weight(hs(), gw.qkv_w, sums, d.dqkv, a.ln1, M, N, C, 3 * C); };
      auto bias_grad = [&](float* grad, const float* dout, int columns) {
        cuda::bias_activation_backward(nullptr, grad, sums, dout, nullptr, M, N, columns, none, side());
      };
      auto out_weight_grad = [&] { cuda::matmul_backward_weight(hs(), gw.out_w, sums, dresid, a.post, M, N, D, C); };
      if (fused_backward_) {
        fork();
        out_weight_grad();
        sum_after_lanes(false);  // the layer above's and the head's
        cuda::BlockBackward b{};
        b.dresid_out = dresid, b.resid_in = residual, b.ln1_mean = a.ln1_mean, b.ln1_rstd = a.ln1_rstd;
        b.qkv = a.qkv, b.att = a.att, b.resid_mid = a.resid_mid, b.ln2_mean = a.ln2_mean, b.ln2_rstd = a.ln2_rstd;
        b.pre = a.pre, b.ln1_w = w.ln1_w, b.qkv_w = w.qkv_w, b.proj_w = w.proj_w, b.ln2_w = w.ln2_w;
        b.fc_w = w.fc_w, b.out_w = w.out_w;
        b.dpre = d.dpre, b.dln2 = d.dln2, b.dresid_mid = d.dresid_mid, b.dqkv = d.dqkv, b.dln1 = d.dln1;
        b.dresid_in = d.dresid_in;
        b.B = B, b.T = T, b.C = C, b.H = H, b.D = D, b.scale = cuda::attention_scale(c.head_dim());
        b.act = to_act(c.activation);
        auto shares = [&](float* grad, int columns) { return sums.add(grad, nullptr, M, B, columns); };
        auto norm_shares = [&](float* dweight, float* dbias) {  // the weight's shares, then the bias's
          float* weight_shares = sums.add(dweight, dbias, M, B, C);
          return std::make_pair(weight_shares, weight_shares + int64_t(M) * B * C);
        };
        b.sums.out_b = shares(gw.out_b, C), b.sums.fc_b = shares(gw.fc_b, D), b.sums.proj_b = shares(gw.proj_b, C);
        b.sums.qkv_b = shares(gw.qkv_b, 3 * C);
        std::tie(b.sums.ln2_w, b.sums.ln2_b) = norm_shares(gw.ln2_w, gw.ln2_b);
        std::tie(b.sums.ln1_w, b.sums.ln1_b) = norm_shares(gw.ln1_w, gw.ln1_b);
        cuda::block_backward(b, M, s);
        fork();
        fc_weight_grad();
        proj_weight_grad();
        qkv_weight_grad();
      } else {
        cuda::MlpSublayer mlp = mlp_sublayer(l, w, N);
        mlp.pre = relu_derivative_input(a);
        mlp.dresid_out = dresid, mlp.dpre = d.dpre, mlp.dln2 = d.dln2, mlp.dresid_mid = d.dresid_mid;
        mlp.before = pending ? &*pending : nullptr;  // writes dresid
        // and after it the gradient at the attention's projection's input
        cuda::RowProduct proj_input = cuda::backward_input_product(datty_, d.dresid_mid, w.proj_w, N, C, C);
        proj_input.apart = apart_;
        mlp.after = &proj_input, mlp.after_count = 1;
        cuda::mlp_backward(h, mlp, M);
        fork();
        if (pending) ln1_params(l + 1);
        out_weight_grad();
        bias_grad(gw.out_b, dresid, C);
        bias_grad(gw.fc_b, d.dpre, D);
        fc_weight_grad();
        cuda::layernorm_backward_params(gw.ln2_w, gw.ln2_b, sums, d.dln2, a.resid_mid, a.ln2_mean, a.ln2_rstd, M, N,
                                        C, side());
        bias_grad(gw.proj_b, d.dresid_mid, C);
        proj_weight_grad();
        sum_after_lanes(false);  // the MLP's, the projection's and the layer above's attention's
        cuda::AttentionWithProducts att = attention_with_products(l, w, B);
        att.qkv_b = fused_ ? nullptr : w.qkv_b, att.dproj = nullptr, att.dqkv = d.dqkv;  // datty formed above
        cuda::attention_backward_with_products(h, att, M);
        fork();
        bias_grad(gw.qkv_b, d.dqkv, 3 * C);
        qkv_weight_grad();
        pending = qkv_input(l);
      }
      dresid = d.dresid_in;
    }
    if (pending) {  // the first layer's: no MLP below it, its norm's parameter gradients with it
      pending->dnorm_w = g.blocks[0].ln1_w, pending->dnorm_b = g.blocks[0].ln1_b, pending->sums = &sums;
      cuda::run_row_product(h, *pending, M);
      fork();  // the last stage 2 waits for its partials through the lanes
    }
    cuda::embedding_backward(g.wte, g.wpe, dresid, token_rows_, token_starts_, M, B, T, C, V, s);
    sum_after_lanes(true);
    side_->join.record(end);
    side_->join.make_wait(s);
  }

  // Norms, clipping and AdamW (skipped on device when anything is not finite); the
  // norms' kernel writes the report (losses, norms, verdict) straight into pinned host
  // memory, so that no copy ends the step.
  void optimize() {
    const int M = config_.models, P = static_cast<int>(pieces_.size());
    const cudaStream_t s = stream_.get();
    cuda::grad_norms(norm_partials_.data(), norm_blocks_done_.data(), norms_.data(), scales_.data(), finite_.data(),
                     grads_.data(), pieces_.data(), P, losses_, M, step_params_, queue_->report(), s);
    cuda::adamw_update(params_.data(), grads_.data(), exp_avg_.data(), exp_avg_sq_.data(), pieces_.data(), P,
                       scales_.data(), finite_.data(), step_params_, s);
  }

  std::vector<float> download(const DeviceBuffer<float>& b) const {
    std::vector<float> out(b.size());
    stream_.synchronize();
    UNIV_CUDA_CHECK(cudaMemcpy(out.data(), b.data(), b.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
  }

  RunConfig config_;
  ParamLayout layout_;
  bool training_;
  bool tf32_;
  bool apart_;           // CudaFusion::ops: every product and row op in launches of their own
  bool chained_;         // CudaLaunch::chained: the step graph's kernels launch early where they may
  bool fused_;           // forward_fused_blocks, else forward_per_op
  bool fused_head_;      // the last block kernel runs the head (logits, loss, their backward)
  bool fused_backward_;  // block_backward per layer, else a kernel per op
  cuda::Stream stream_;
  cuda::CublasHandle cublas_;
  std::unique_ptr<SideStreams> side_;  // made with the step's graph
  DeviceBuffer<float> params_, grads_, exp_avg_, exp_avg_sq_, positions_;
  Arena arena_;
  float* encoded_ = nullptr;
  std::vector<LayerActs> layers_;
  std::vector<LayerGrads> layer_grads_;
  float *lnf_ = nullptr, *lnf_mean_ = nullptr, *lnf_rstd_ = nullptr, *logits_ = nullptr, *row_loss_ = nullptr;
  float *dlnf_ = nullptr, *dresid_top_ = nullptr, *datty_ = nullptr, *partials_ = nullptr;
  std::unique_ptr<cuda::ColumnSums> column_sums_;
  DeviceBuffer<cuda::ParamSegment> pieces_;  // of the (tensor, model) segments, for the norms and AdamW
  DeviceBuffer<double> norm_partials_;
  DeviceBuffer<unsigned> norm_blocks_done_;
  DeviceBuffer<float> scales_, norms_;
  DeviceBuffer<int> finite_;
  Mirrored batch_;   // each step's or forward pass's constants, inputs and targets
  Mirrored report_;  // down after a forward pass: its losses
  std::unique_ptr<StepQueue> queue_;  // training steps: batch_'s images, the reports
  cuda::OptimizerStep *step_params_ = nullptr, *host_step_ = nullptr;
  int32_t *inputs_ = nullptr, *host_inputs_ = nullptr, *targets_ = nullptr, *host_targets_ = nullptr;
  int32_t *token_rows_ = nullptr, *host_token_rows_ = nullptr;  // the inputs' positions sorted by token, for
  int32_t *token_starts_ = nullptr, *host_token_starts_ = nullptr;  // the embedding's backward (training only)
  float *losses_ = nullptr, *host_losses_ = nullptr;
  std::unique_ptr<cuda::Graph> graph_;
  int64_t step_ = 0;
  bool started_ = false;  // a forward-only run is on the stream
};

}  // namespace

std::unique_ptr<TrainBackend> make_cuda_backend(const RunConfig& config, Precision precision, CudaFusion fusion,
                                                CudaLaunch launch) {
  return std::make_unique<CudaBackend>(config, precision, fusion, launch);
}

std::unique_ptr<DeviceForward> make_device_forward(const RunConfig& config, const std::vector<float>& params,
                                                   CudaFusion fusion) {
  if (config.models != 1) throw std::invalid_argument("make_device_forward: one model");
  auto net = std::make_unique<CudaBackend>(config, Precision::fp32, fusion, CudaLaunch::ordered, /*training=*/false);
  net->load_params(params);
  return net;
}

}  // namespace univ
