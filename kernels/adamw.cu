// Global-norm clipping and AdamW over the flat parameter buffer, as multi-tensor
// passes over pieces of the (tensor, model) segments, small enough to spread a step's
// few tensors over the GPU: one launch for the norms, summed in float64 in a fixed
// order, and one for the update. A non-finite loss or norm leaves every parameter
// untouched.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kNormPiece = 8 * kThreads;  // gradient elements per block of either pass

// Block s: the sum of squares of piece s, in a fixed tree. The last block to finish
// (a counter, as in the CUDA samples' threadFenceReduction) then adds up each model's
// pieces in a fixed tree, writes the norm and the clipping factor and whether the step
// may update (and the report for the host, at the cursor's slot, moving the cursor on),
// and sets the counter back to zero for the next launch.
__global__ void grad_norms_kernel(double* __restrict__ partials, unsigned* __restrict__ blocks_done,
                                  float* __restrict__ norms, float* __restrict__ scales, int* __restrict__ finite,
                                  const float* __restrict__ grads, const ParamSegment* __restrict__ pieces,
                                  int num_pieces, const float* __restrict__ losses, int M,
                                  const OptimizerStep* __restrict__ step, const StepReport report) {
  chain_after_prior_grids();
  __shared__ double partial[kThreads];
  __shared__ bool last;
  if (static_cast<int>(blockIdx.x) < num_pieces) {
    const ParamSegment piece = pieces[blockIdx.x];
    double sum = 0.0;
#pragma unroll
    for (int k = 0; k < kNormPiece / kThreads; ++k) {
      const int64_t i = threadIdx.x + int64_t(k) * kThreads;
      if (i < piece.numel) {
        const double g = grads[piece.offset + i];
        sum += g * g;
      }
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = partial[0];
  }
  if (threadIdx.x == 0) {
    __threadfence();  // this block's partial is visible before it counts as done
    last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  const volatile double* done = partials;  // written by other blocks: read past the L1 cache
  const int slot = report.cursor ? report.cursor->next : 0;
  for (int m = 0; m < M; ++m) {
    double sum = 0.0;
    for (int s = threadIdx.x; s < num_pieces; s += kThreads)
      if (pieces[s].model == m) sum += done[s];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const double norm = sqrt(partial[0]);
      norms[m] = static_cast<float>(norm);
      if (report.norms) report.norms[slot * M + m] = norms[m];
      if (report.losses) report.losses[slot * M + m] = losses[m];
      // PyTorch's clip_grad_norm_: scale by clip / (norm + 1e-6) when that is below 1.
      scales[m] = static_cast<float>(step->clip > 0 ? fmin(1.0, step->clip / (norm + 1e-6)) : 1.0);
    }
    __syncthreads();  // partial[0] read before the next model's sums
  }
  if (threadIdx.x == 0) {
    int ok = 1;
    for (int i = 0; i < M; ++i) ok &= isfinite(norms[i]) && isfinite(losses[i]);
    if (report.cursor) {  // a run stops updating at its first step that is not finite
      ok &= !report.cursor->halted;
      report.cursor->halted = !ok;
      report.cursor->next = slot + 1;
    }
    finite[0] = ok;
    if (report.finite) report.finite[slot] = ok;
    *blocks_done = 0;
  }
}

// Block (s, k): PyTorch's AdamW update of the k-th kThreads elements of piece s, a
// thread per element.
__global__ void adamw_kernel(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ exp_avg,
                             float* __restrict__ exp_avg_sq, const ParamSegment* __restrict__ pieces,
                             const float* __restrict__ scales, const int* __restrict__ finite,
                             const OptimizerStep* __restrict__ step) {
  chain_after_prior_grids();
  const ParamSegment piece = pieces[blockIdx.x];
  const int64_t i = threadIdx.x + int64_t(blockIdx.y) * kThreads;
  if (!finite[0] || i >= piece.numel) return;
  const OptimizerStep h = *step;
  const float scale = scales[piece.model];
  const float decay = piece.decay ? h.decay_factor : 1.0f;
  const int64_t at = piece.offset + i;
  const float g = grads[at] * scale;
  const float m = h.beta1 * exp_avg[at] + (1.0f - h.beta1) * g;
  const float v = h.beta2 * exp_avg_sq[at] + (1.0f - h.beta2) * g * g;
  exp_avg[at] = m;
  exp_avg_sq[at] = v;
  params[at] = params[at] * decay - h.step_size * m / (sqrtf(v) * h.inv_sqrt_bc2 + h.eps);
}

}  // namespace

std::vector<ParamSegment> norm_pieces(const std::vector<ParamSegment>& segments) {
  std::vector<ParamSegment> pieces;
  for (const ParamSegment& s : segments)
    for (int64_t at = 0; at < s.numel; at += kNormPiece)
      pieces.push_back({s.offset + at, std::min<int64_t>(kNormPiece, s.numel - at), s.model, s.decay});
  return pieces;
}

void grad_norms(double* partials, unsigned* blocks_done, float* norms, float* scales, int* finite, const float* grads,
                const ParamSegment* pieces, int num_pieces, const float* losses, int M, const OptimizerStep* step,
                const StepReport& report, cudaStream_t stream) {
  launch_chained(grad_norms_kernel, std::max(num_pieces, 1), kThreads, 0, stream, partials, blocks_done, norms, scales,
                 finite, grads, pieces, num_pieces, losses, M, step, report);
}

void adamw_update(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, const ParamSegment* pieces,
                  int num_pieces, const float* scales, const int* finite, const OptimizerStep* step,
                  cudaStream_t stream) {
  if (num_pieces == 0) return;
  launch_chained(adamw_kernel, dim3(num_pieces, kNormPiece / kThreads), kThreads, 0, stream, params, grads, exp_avg,
                 exp_avg_sq, pieces, scales, finite, step);
}

}  // namespace univ::cuda
