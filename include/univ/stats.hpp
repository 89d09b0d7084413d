// Sufficient statistics for neuron correlations across models: token count, means,
// and the centered co-moment blocks the analysis needs (every cross-model block, and
// every model's within-layer blocks for the rotation baseline), all in float64.
//
// Chunks are accumulated shifted by a fixed reference (each neuron's mean over the
// first chunk) and merged into the masters with the pairwise update of Chan et al.
// and Pebay, so a mean 1e3 times the standard deviation costs no accuracy; shards
// accumulated apart merge into the statistics of their union.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "univ/split_precision.hpp"

namespace univ {

// The neurons of one model: `layers` blocks of `width` neurons; neuron index l*width + k.
struct NeuronShape {
  int layers = 0;
  int width = 0;
  int64_t neurons() const { return int64_t(layers) * width; }
  bool operator==(const NeuronShape&) const = default;
};

class CorrelationStats {
 public:
  CorrelationStats() = default;
  explicit CorrelationStats(std::vector<NeuronShape> shapes);

  int models() const { return static_cast<int>(shapes_.size()); }
  const std::vector<NeuronShape>& shapes() const { return shapes_; }
  int64_t count() const { return count_; }
  // Per-neuron means of model m, [neurons(m)].
  const std::vector<double>& mean(int m) const { return means_[m]; }
  // Centered co-moment sum_t (a_t - mean_a)(b_t - mean_b)^T of models i < j, [N_i, N_j].
  const std::vector<double>& cross(int i, int j) const { return cross_[pair_index(i, j)]; }
  // The same for any i != j: [N_i, N_j], for i > j cross(j, i) transposed.
  std::vector<double> cross_rows(int i, int j) const;
  // Centered co-moment of layer l of model m with itself, [width, width].
  const std::vector<double>& within(int m, int l) const { return within_[m][l]; }
  // Variance sums (co-moment diagonal) of model m's neurons, [neurons(m)].
  std::vector<double> variance_sums(int m) const;

  // Adds the statistics of another set of tokens (same models) by the pairwise update.
  void merge(const CorrelationStats& other);

  // Saved as safetensors (float64 tensors, our checksum); metadata is the caller's.
  void save(const std::filesystem::path& file, const std::map<std::string, std::string>& metadata) const;
  std::string bytes(const std::map<std::string, std::string>& metadata) const;  // the file's contents
  static CorrelationStats load(const std::filesystem::path& file, std::map<std::string, std::string>* metadata);
  // The same from the bytes of a file; `what` names it in errors.
  static CorrelationStats parse(std::string bytes, const std::string& what, std::map<std::string, std::string>* metadata);

  bool operator==(const CorrelationStats&) const = default;

 private:
  friend class CpuStatsAccumulator;
  friend class CudaStatsAccumulator;
  int pair_index(int i, int j) const;
  // Pairwise update of one centered block with another set's block of n_b tokens.
  void merge_block(std::vector<double>& master, const std::vector<double>& other, const double* delta_a,
                   const double* delta_b, int64_t rows, int64_t cols, double factor) const;

  std::vector<NeuronShape> shapes_;
  int64_t count_ = 0;
  std::vector<std::vector<double>> means_;
  std::vector<std::vector<double>> cross_;                 // pairs (i < j) in order (0,1), (0,2), ..., (1,2), ...
  std::vector<std::vector<std::vector<double>>> within_;   // [m][l]
};

// Streams float32 activation chunks of all models into a CorrelationStats on the CPU.
class CpuStatsAccumulator {
 public:
  explicit CpuStatsAccumulator(std::vector<NeuronShape> shapes);
  // acts[m]: model m's activations for n tokens, token-major [n, N_m].
  void add(const std::vector<const float*>& acts, int64_t n);
  const CorrelationStats& stats() const { return stats_; }

 private:
  CorrelationStats stats_;
  CorrelationStats chunk_;                    // the current chunk's statistics
  std::vector<std::vector<float>> shift_;     // each neuron's mean over the first chunk
  std::vector<std::vector<double>> shifted_;  // scratch: x - shift in float64, [n, N_m]
};

// A value of the FP16 split left FP16's range: the statistics must be computed again
// with the TF32 split.
class Fp16SplitOverflow : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Streams float32 activation chunks that are already on the GPU into a
// CorrelationStats: the shifted sums and co-moment blocks are float64 masters on the
// device (kernels/comoment.cu), centered once when stats() is asked. CUDA builds only.
class CudaStatsAccumulator {
 public:
  // span: tokens whose products one float32 GEMM sums (0: cuda::kComomentSpan; longer
  // spans lose accuracy); spans_per_pass: spans whose float32 products one float64
  // pass adds into the masters (0: up to 16, as memory allows; more mean fewer passes
  // over the masters). The FP16 split runs at twice the TF32 split's rate.
  explicit CudaStatsAccumulator(std::vector<NeuronShape> shapes, int64_t span = 0,
                                SplitPrecision split = SplitPrecision::f16, int spans_per_pass = 0);
  ~CudaStatsAccumulator();
  // acts[m]: device pointers to model m's activations for n tokens, token-major
  // [n, N_m], complete before the call. Returns once the chunk's work is enqueued:
  // acts must stay unchanged until synchronize().
  void add(const std::vector<const float*>& acts, int64_t n);
  // The same from host memory, copied on the accumulator's stream (asynchronously when
  // pinned): host_acts too must stay unchanged until synchronize().
  void add_from_host(const std::vector<const float*>& host_acts, int64_t n);
  // Waits for the work enqueued; Fp16SplitOverflow when an FP16 part overflowed.
  void synchronize() const;
  // Fp16SplitOverflow when an FP16 part overflowed.
  CorrelationStats stats() const;

 private:
  struct Device;
  std::vector<NeuronShape> shapes_;
  int64_t span_;
  SplitPrecision split_;
  int spans_per_pass_;
  std::unique_ptr<Device> device_;  // keeps CUDA types out of this header
  int64_t count_ = 0;
};

}  // namespace univ
