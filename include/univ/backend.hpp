// The training backends behind one interface: the CPU backend (always built) and
// the CUDA backend (when the build has CUDA and the machine a GPU).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "univ/config.hpp"
#include "univ/param_layout.hpp"
#include "univ/train_state.hpp"

namespace univ {

enum class Device { cpu, cuda };
std::string to_string(Device d);

// --device auto|cpu|cuda -> the device to use (auto: cuda when a GPU is present).
// UserError for unknown names and for cuda without a GPU or without CUDA in this build.
Device resolve_device(const std::string& flag);

// Matrix products in strict float32, or TF32 on tensor cores (CUDA only; the CPU is fp32).
enum class Precision { fp32, tf32 };
std::string to_string(Precision p);
Precision parse_precision(const std::string& name);  // UserError for unknown names

// How the CUDA backend runs the transformer blocks: one kernel per op, or one kernel
// per block for the forward and one for its input gradients where the shape fits in
// shared memory (else as per_op). Both compute the same to float32 rounding;
// benchmarks compare them. Training defaults to per_op, the faster as measured (on an
// H200, 0.35 against 0.41 ms per seed step: docs/PERFORMANCE.md).
enum class CudaBlocks { fused, per_op };

// Number of CUDA devices usable by this process; 0 without CUDA support.
int cuda_device_count();
// Makes GPU `index` modulo the device count this process's GPU (one per MPI rank).
void select_cuda_device(int index);

struct StepStats {
  std::vector<double> loss;       // [models], before the update
  std::vector<double> grad_norm;  // [models], before clipping
  bool finite = true;             // every loss and norm finite; otherwise no parameter changed
  std::string fault;              // when not finite: which model and tensor went bad
};

// Describes the first model whose loss or gradient norm is not finite, and the first
// of its parameter or gradient tensors holding a NaN or an infinity.
std::string describe_fault(const StepStats& stats, const ParamLayout& layout, const std::vector<float>& params,
                           const std::vector<float>& grads);

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;
  virtual Device device() const = 0;
  virtual void set_state(const TrainState& state) = 0;
  virtual TrainState state() const = 0;
  // One update of every model: forward and backward on inputs/targets [models, batch,
  // seq_len], global-norm clipping, AdamW at learning rate lr. When a loss or a
  // gradient norm is not finite, nothing is updated (the state stays the last good one).
  virtual StepStats step(const int32_t* inputs, const int32_t* targets, double lr) = 0;
  // Mean loss of every model over `count` sequences of seq_len + 1 tokens (shared by
  // all models), in batches; nothing is updated.
  virtual std::vector<double> evaluate(const int32_t* sequences, int64_t count) = 0;
  // The gradients of the last step, laid out like the parameters (for tests and checks).
  virtual std::vector<float> gradients() const = 0;
};

std::unique_ptr<TrainBackend> make_backend(Device device, const RunConfig& config,
                                           Precision precision = Precision::fp32,
                                           CudaBlocks blocks = CudaBlocks::per_op);

// One model's forward pass on the GPU whose MLP activations stay on the device:
// correlate's GPU path feeds them straight into the statistics.
class DeviceForward {
 public:
  virtual ~DeviceForward() = default;
  // Starts b sequences (inputs and targets [b, seq_len], b at most the batch it was made
  // for; copied before it returns) on the network's own stream, so that several
  // networks run side by side; the MLP activations at the site (pre: W1 x + b1, post:
  // act(pre)) of the first n tokens, all layers side by side, go to device memory out
  // [n, layers * d_mlp]. One run at a time: finish() before the next start().
  virtual void start(const int32_t* inputs, const int32_t* targets, int b, bool post, float* out, int64_t n) = 0;
  // Waits for the run started last and returns its mean next-token loss; out is complete.
  virtual double finish() = 0;
  double run(const int32_t* inputs, const int32_t* targets, int b, bool post, float* out, int64_t n) {
    start(inputs, targets, b, post, out, n);
    return finish();
  }
};

// config.models must be 1; params in that layout. CUDA builds only. The per-op kernels
// by default, as in training; CudaBlocks::fused runs a block kernel per layer.
std::unique_ptr<DeviceForward> make_device_forward(const RunConfig& config, const std::vector<float>& params,
                                                   CudaBlocks blocks = CudaBlocks::per_op);

}  // namespace univ
