// Programmatic dependent launch (compute capability 9.0 and up) for the kernels of a
// captured step: a kernel may launch while the kernel before it in its stream runs its
// last blocks, and waits for it at its first instruction (kernels/common.cuh's
// launch_chained and chain_after_prior_grids), so that launches and block start-up
// overlap the kernel before instead of following it. Results do not change.
// Plain C++17: included by kernels (nvcc) and host code (g++) alike.
#pragma once
#include <cuda_runtime.h>

namespace univ::cuda {

// While one is alive and on, launch_chained on this thread may chain (chains_launches).
class ChainedLaunches {
 public:
  explicit ChainedLaunches(bool on);
  ~ChainedLaunches();
  ChainedLaunches(const ChainedLaunches&) = delete;
  ChainedLaunches& operator=(const ChainedLaunches&) = delete;

 private:
  bool before_;
};

// Whether a kernel launched into `stream` now may start before the node it follows
// finishes: a ChainedLaunches is on on this thread, the device has compute capability
// 9.0 or more, `stream` is capturing, and the launch would follow one node, a kernel
// (programmatic edges join kernels only; after copies, and where streams join, the
// launch stays ordered).
bool chains_launches(cudaStream_t stream);

}  // namespace univ::cuda
