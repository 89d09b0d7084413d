// Runs of training steps queued on the device: the host writes each step's constants and
// batch into a slot, laid out as the step's own buffers, and uploads the run at once;
// each replay of the step's graph begins by copying the cursor's slot into those
// buffers, and grad_norms (adamw.cu) ends it by writing the step's report to the
// slot's place and moving the cursor on. The host waits once per run, not per step.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;

// Grid-stride copy of `words` 16-byte words of slot cursor->next.
__global__ void load_queued_step_kernel(uint4* __restrict__ step, const uint4* __restrict__ slots, int64_t words,
                                        const StepCursor* __restrict__ cursor) {
  chain_after_prior_grids();
  const uint4* slot = slots + int64_t(cursor->next) * words;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words; i += int64_t(gridDim.x) * blockDim.x)
    step[i] = slot[i];
}

}  // namespace

void load_queued_step(char* step, const char* slots, int64_t bytes, const StepCursor* cursor, cudaStream_t stream) {
  const int64_t words = bytes / 16;
  launch_chained(load_queued_step_kernel, std::min(blocks_for(words, kThreads), 32), kThreads, 0, stream,
                 reinterpret_cast<uint4*>(step), reinterpret_cast<const uint4*>(slots), words, cursor);
}

}  // namespace univ::cuda
