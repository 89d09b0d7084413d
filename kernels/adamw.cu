// Global-norm clipping and AdamW over the flat parameter buffer, as one multi-tensor
// pass over (tensor, model) segments. Norms are summed in float64 in a fixed order,
// over pieces of the segments small enough to spread a step's few tensors over the
// GPU; a non-finite loss or norm leaves every parameter untouched.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kNormPiece = 8 * kThreads;  // gradient elements per block of the norm's squares

// Block s: the sum of squares of piece s, in a fixed tree.
__global__ void piece_squares_kernel(double* __restrict__ partials, const float* __restrict__ grads,
                                     const ParamSegment* __restrict__ pieces) {
  __shared__ double partial[kThreads];
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

// One block: per model, its pieces' sums in a fixed tree, the norm, the clipping
// factor; then whether the step may update.
__global__ void finish_norms_kernel(float* __restrict__ norms, float* __restrict__ scales, int* __restrict__ finite,
                                    const double* __restrict__ partials, const ParamSegment* __restrict__ pieces,
                                    int num_pieces, const float* __restrict__ losses, int M,
                                    const OptimizerStep* __restrict__ step) {
  __shared__ double partial[kThreads];
  for (int m = 0; m < M; ++m) {
    double sum = 0.0;
    for (int s = threadIdx.x; s < num_pieces; s += kThreads)
      if (pieces[s].model == m) sum += partials[s];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const double norm = sqrt(partial[0]);
      norms[m] = static_cast<float>(norm);
      // PyTorch's clip_grad_norm_: scale by clip / (norm + 1e-6) when that is below 1.
      scales[m] = static_cast<float>(step->clip > 0 ? fmin(1.0, step->clip / (norm + 1e-6)) : 1.0);
    }
    __syncthreads();  // partial[0] read before the next model's sums
  }
  if (threadIdx.x == 0) {
    int ok = 1;
    for (int i = 0; i < M; ++i) ok &= isfinite(norms[i]) && isfinite(losses[i]);
    finite[0] = ok;
  }
}

// Blocks over (segment, chunk): PyTorch's AdamW update, element by element.
__global__ void adamw_kernel(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ exp_avg,
                             float* __restrict__ exp_avg_sq, const ParamSegment* __restrict__ segments,
                             const float* __restrict__ scales, const int* __restrict__ finite,
                             const OptimizerStep* __restrict__ step) {
  if (!finite[0]) return;
  const ParamSegment seg = segments[blockIdx.y];
  const OptimizerStep h = *step;
  const float scale = scales[seg.model];
  const float decay = seg.decay ? h.decay_factor : 1.0f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < seg.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t at = seg.offset + i;
    const float g = grads[at] * scale;
    const float m = h.beta1 * exp_avg[at] + (1.0f - h.beta1) * g;
    const float v = h.beta2 * exp_avg_sq[at] + (1.0f - h.beta2) * g * g;
    exp_avg[at] = m;
    exp_avg_sq[at] = v;
    params[at] = params[at] * decay - h.step_size * m / (sqrtf(v) * h.inv_sqrt_bc2 + h.eps);
  }
}

}  // namespace

std::vector<ParamSegment> norm_pieces(const std::vector<ParamSegment>& segments) {
  std::vector<ParamSegment> pieces;
  for (const ParamSegment& s : segments)
    for (int64_t at = 0; at < s.numel; at += kNormPiece)
      pieces.push_back({s.offset + at, std::min<int64_t>(kNormPiece, s.numel - at), s.model, s.decay});
  return pieces;
}

void grad_norms(double* partials, float* norms, float* scales, int* finite, const float* grads,
                const ParamSegment* pieces, int num_pieces, const float* losses, int M, const OptimizerStep* step,
                cudaStream_t stream) {
  if (num_pieces > 0) {
    piece_squares_kernel<<<num_pieces, kThreads, 0, stream>>>(partials, grads, pieces);
    UNIV_CUDA_CHECK_LAUNCH();
  }
  finish_norms_kernel<<<1, kThreads, 0, stream>>>(norms, scales, finite, partials, pieces, num_pieces, losses, M, step);
  UNIV_CUDA_CHECK_LAUNCH();
}

void adamw_update(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, const ParamSegment* segments,
                  int num_segments, const float* scales, const int* finite, const OptimizerStep* step,
                  cudaStream_t stream) {
  constexpr int kChunks = 64;  // blocks per segment; large segments loop
  adamw_kernel<<<dim3(kChunks, num_segments), kThreads, 0, stream>>>(params, grads, exp_avg, exp_avg_sq, segments,
                                                                     scales, finite, step);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
