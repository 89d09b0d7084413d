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

// How the CUDA backend groups a step's work into kernels; all three compute the same to
// float32 rounding, and bench_kernels times each.
//   sublayers  each product in one kernel with the row op that reads its output next
//              (layer norm, loss), the MLP sublayer in one kernel each way, and where
//              flash attention's kernels (whose products are cuBLAS's) do not fit, the
//              attention with the products at its ends, where the shapes fit (else as
//              ops);
//   ops        one launch per op: cuBLAS for the products, then the epilogues' and
//              row ops' kernels;
//   blocks     one kernel per transformer block for the forward and one for its input
//              gradients where the block fits in shared memory (else as sublayers).
// blocks lost to the per-op chain on an H200 (0.41 against 0.35 ms per seed step), and
// ops and sublayers came within 3% of each other on an H200 and two H100s, ops ahead
// (docs/PERFORMANCE.md); sublayers stays the default until the queued step is measured
// both ways (bench_kernels' queued_step_ms_fp32_ops).
enum class CudaFusion { sublayers, ops, blocks };
std::string to_string(CudaFusion f);

// How the kernels of the CUDA backend's step graph follow one another:
//   ordered    each starts when the node before it has finished (plain stream order);
//   chained    where one kernel follows another, it launches while that one runs its
//              last blocks and waits for it at its first instruction (programmatic
//              dependent launch, compute capability 9.0 and up; elsewhere ordered),
//              so that its launch and start-up overlap the kernel before.
// Both compute the same, bit for bit. chained has not yet run on a GPU: ordered stays the
// default until bench_kernels' queued_step_ms_*_chained says which is faster.
enum class CudaLaunch { ordered, chained };

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
  // n updates in a row, inputs/targets [n, models, batch, seq_len] and lr [n]: as n calls
  // of step(), except that it stops after the first step that is not finite (its stats
  // last). The CUDA backend queues them on the device, the host not waiting between steps.
  virtual std::vector<StepStats> steps(const int32_t* inputs, const int32_t* targets, const double* lr,
                                       int n) = 0;
  // Whether steps() runs faster than as many step() calls (the training loop then
  // passes it all the steps up to the next checkpoint).
  virtual bool queues_steps() const { return false; }
  // Mean loss of every model over `count` sequences of seq_len + 1 tokens (shared by
  // all models), in batches; nothing is updated.
  virtual std::vector<double> evaluate(const int32_t* sequences, int64_t count) = 0;
  // The gradients of the last step, laid out like the parameters (for tests and checks).
  virtual std::vector<float> gradients() const = 0;
};

std::unique_ptr<TrainBackend> make_backend(Device device, const RunConfig& config,
                                           Precision precision = Precision::fp32,
                                           CudaFusion fusion = CudaFusion::sublayers,
                                           CudaLaunch launch = CudaLaunch::ordered);

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

// config.models must be 1; params in that layout. CUDA builds only.
std::unique_ptr<DeviceForward> make_device_forward(const RunConfig& config, const std::vector<float>& params,
                                                   CudaFusion fusion = CudaFusion::sublayers);

}  // namespace univ
