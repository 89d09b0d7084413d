// The start and end of every kernel the GPU runs while a KernelTrace lives (CUPTI's
// activity records, kernels inside CUDA graphs included), for bench_kernels --timeline.
// One at a time per process.
#pragma once
#include <vector>

#include "univ/step_timeline.hpp"

namespace univ {

class KernelTrace {
 public:
  KernelTrace();  // throws std::runtime_error where CUPTI refuses
  ~KernelTrace();
  KernelTrace(const KernelTrace&) = delete;
  KernelTrace& operator=(const KernelTrace&) = delete;
  // Every kernel finished since the trace began or the last take(), names shortened
  // (short_kernel_name); the GPU should be idle.
  std::vector<KernelSpan> take();
};

}  // namespace univ
