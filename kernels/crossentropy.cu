// Softmax cross-entropy over the vocabulary, forward and backward fused: a warp per
// row; the gradient overwrites the logits, so probabilities are never stored apart.
// The mean over rows, per model in a fixed tree order, is a launch of its own, so that
// a training step can take it off the backward pass's path.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kReduceThreads = 256;

__global__ void crossentropy_rows_kernel(float* __restrict__ row_loss, float* __restrict__ logits,
                                         const int32_t* __restrict__ targets, int64_t rows, int N, int V,
                                         bool backward) {
  chain_after_prior_grids();
  const int64_t row = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const float loss = crossentropy_lanes(logits + row * V, 1, targets[row], V, N, backward);
  if (threadIdx.x % kWarpSize == 0) row_loss[row] = loss;
}

// One block per model: the mean of its N row losses, summed in float64 in a fixed tree.
__global__ void mean_per_model_kernel(float* __restrict__ losses, const float* __restrict__ row_loss, int N) {
  chain_after_prior_grids();
  __shared__ double partial[kReduceThreads];
  const float* rows = row_loss + int64_t(blockIdx.x) * N;
  double sum = 0.0;
  for (int n = threadIdx.x; n < N; n += blockDim.x) sum += rows[n];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) losses[blockIdx.x] = static_cast<float>(partial[0] / N);
}

}  // namespace

void crossentropy_forward_backward(float* row_loss, float* logits, const int32_t* targets, int M, int N, int V,
                                   bool backward, cudaStream_t stream) {
  const int64_t rows = int64_t(M) * N;
  launch_chained(crossentropy_rows_kernel, static_cast<unsigned>(ceil_div<int64_t>(rows, kWarpsPerBlock)),
                 kWarpsPerBlock * kWarpSize, 0, stream, row_loss, logits, targets, rows, N, V, backward);
}

void mean_loss_per_model(float* losses, const float* row_loss, int M, int N, cudaStream_t stream) {
  launch_chained(mean_per_model_kernel, M, kReduceThreads, 0, stream, losses, row_loss, N);
}

}  // namespace univ::cuda
