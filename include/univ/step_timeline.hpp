// Where a training step's GPU time goes, from the start and end of every kernel the
// steps ran (bench_kernels --timeline records them): the step's span, the time some
// kernel ran, and the chain of kernels that bounded the step, with the gap before each
// (launch and dependency latency). Plain host code, so that it is tested without a GPU.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace univ {

struct KernelSpan {
  std::string name;
  uint64_t start_ns = 0, end_ns = 0;
  uint32_t stream = 0;
};

struct StepTimeline {
  std::vector<KernelSpan> kernels;  // by start
  double span_us = 0;               // the first kernel's start to the last one's end
  double busy_us = 0;               // some kernel running
  std::vector<std::pair<uint32_t, double>> stream_busy_us;  // the same per stream, by stream
  double kernel_us = 0;             // the kernels' durations added
  // The bounding chain, indices into kernels, first to last: from the kernel that ends
  // last, each link's predecessor is the kernel that ended last before it started (the
  // one it most likely waited for); with chained launches, where a kernel may start
  // while the one it waits for runs its last blocks, also one still running then (the
  // latest started of those).
  std::vector<size_t> chain;
  double chain_kernel_us = 0, chain_gap_us = 0;  // the chain's durations; its gaps, the first link's start on
};

// The steps among the kernels (any order): each starts at a kernel whose name contains
// first_kernel and runs to the next; kernels before the first such one are left out.
// chained: the kernels were launched chained (CudaLaunch::chained).
std::vector<StepTimeline> step_timelines(std::vector<KernelSpan> kernels, const std::string& first_kernel,
                                         bool chained);

// A demangled kernel name without its parameter list, namespaces and return type:
// "void univ::cuda::(anonymous namespace)::mlp_kernel<false>(univ::cuda::MlpProduct)" ->
// "mlp_kernel<false>".
std::string short_kernel_name(const std::string& demangled);

// The step as text: its totals and each stream's busy time, the chain link by link
// (start, gap, duration, stream), then the time per kernel name, the largest first.
std::string describe_step(const StepTimeline& step);

}  // namespace univ
