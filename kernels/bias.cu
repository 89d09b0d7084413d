// The epilogues around the matrix products: bias (+ residual) after a linear layer,
// bias + activation after the MLP's first one; backward, the activation derivative
// fused with the bias gradient, a column sum over rows in a fixed order.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kColumnTile = 32;
constexpr int kRowGroups = 16;
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__device__ inline float activate(float x, Act act) {
  if (act == Act::relu) return x < 0.0f ? 0.0f : x;  // NaN passes, as in PyTorch
  if (act == Act::gelu) return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  return x;
}

__device__ inline float activation_derivative(float x, Act act) {
  if (act == Act::relu) return x > 0.0f ? 1.0f : 0.0f;
  if (act == Act::gelu) return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  return 1.0f;
}

__global__ void bias_forward_kernel(float* __restrict__ out, const float* __restrict__ bias,
                                    const float* __restrict__ residual, int64_t rows_per_model, int OC,
                                    int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / (rows_per_model * OC);
    float v = out[i] + bias[m * OC + i % OC];
    if (residual) v += residual[i];
    out[i] = v;
  }
}

__global__ void bias_activation_forward_kernel(float* __restrict__ pre, float* __restrict__ post,
                                               const float* __restrict__ bias, int64_t rows_per_model, int D, Act act,
                                               int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / (rows_per_model * D);
    const float x = pre[i] + bias[m * D + i % D];
    pre[i] = x;
    post[i] = activate(x, act);
  }
}

// Block (column tile, model): dpre for its columns, and the bias gradient summed
// over rows y, y + kRowGroups, ... per thread, then over the groups in order.
__global__ void bias_activation_backward_kernel(float* __restrict__ dpre, float* __restrict__ dbias,
                                                const float* __restrict__ dpost, const float* __restrict__ pre,
                                                int N, int D, Act act) {
  __shared__ float partial[kRowGroups][kColumnTile];
  const int d = blockIdx.x * kColumnTile + threadIdx.x;
  const int64_t m = blockIdx.y;
  float sum = 0.0f;
  if (d < D)
    for (int n = threadIdx.y; n < N; n += kRowGroups) {
      const int64_t i = (m * N + n) * D + d;
      float g = dpost[i];
      if (act != Act::none) {
        g *= activation_derivative(pre[i], act);
        dpre[i] = g;
      }
      sum += g;
    }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    for (int g = 1; g < kRowGroups; ++g) sum += partial[g][threadIdx.x];
    dbias[m * D + d] += sum;
  }
}

}  // namespace

void bias_forward(float* out, const float* bias, const float* residual, int M, int N, int OC, cudaStream_t stream) {
  const int64_t total = int64_t(M) * N * OC;
  bias_forward_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(out, bias, residual, N, OC, total);
  UNIV_CUDA_CHECK_LAUNCH();
}

void bias_activation_forward(float* pre, float* post, const float* bias, int M, int N, int D, Act act,
                             cudaStream_t stream) {
  const int64_t total = int64_t(M) * N * D;
  bias_activation_forward_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(pre, post, bias, N, D, act,
                                                                                       total);
  UNIV_CUDA_CHECK_LAUNCH();
}

void bias_activation_backward(float* dpre, float* dbias, const float* dpost, const float* pre, int M, int N, int D,
                              Act act, cudaStream_t stream) {
  bias_activation_backward_kernel<<<dim3(ceil_div(D, kColumnTile), M), dim3(kColumnTile, kRowGroups), 0, stream>>>(
      dpre, dbias, dpost, pre, N, D, act);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
