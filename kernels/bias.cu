// The epilogues around the matrix products: bias (+ residual) after a linear layer,
// bias + activation after the MLP's first one; backward, the activation derivative
// fused with the bias gradient, a two-stage column sum over rows in a fixed order
// (common.cuh), whose second stage, shared by the other column sums, lives here.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kChunkGroups = 16;  // add_column_partials: chunk groups per block
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

// Stage 1 of the bias gradient. Block (column tile, row chunk, model): dpre for its
// rows and columns; thread (x, y) sums rows y, y + kColumnRowGroups, ... of the chunk
// in column x, and the groups add up in order into partials [M, chunks, D].
__global__ void bias_activation_backward_kernel(float* __restrict__ dpre, float* __restrict__ partials,
                                                const float* __restrict__ dpost, const float* __restrict__ pre,
                                                int N, int D, int chunk_rows, Act act) {
  __shared__ float group[kColumnRowGroups][kColumnTile];
  const int d = blockIdx.x * kColumnTile + threadIdx.x;
  const int chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t m = blockIdx.z;
  const int end = min(N, (chunk + 1) * chunk_rows);
  float sum = 0.0f;
  if (d < D)
    for (int n = chunk * chunk_rows + threadIdx.y; n < end; n += kColumnRowGroups) {
      const int64_t i = (m * N + n) * D + d;
      float g = dpost[i];
      if (act != Act::none) {
        g *= activation_derivative(pre[i], act);
        dpre[i] = g;
      }
      sum += g;
    }
  group[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    for (int g = 1; g < kColumnRowGroups; ++g) sum += group[g][threadIdx.x];
    partials[(m * chunks + chunk) * D + d] = sum;
  }
}

// Stage 2 of every column sum. Block (column tile, model, output): thread (x, y) sums
// chunks y, y + kChunkGroups, ... of column x; the groups then add up in order.
__global__ void add_column_partials_kernel(float* __restrict__ out0, float* __restrict__ out1,
                                           const float* __restrict__ partials, int chunks, int64_t C) {
  __shared__ float group[kChunkGroups][kColumnTile];
  const int64_t c = blockIdx.x * int64_t(kColumnTile) + threadIdx.x;
  const int64_t m = blockIdx.y;
  const float* p = partials + (int64_t(blockIdx.z) * gridDim.y + m) * chunks * C;
  float sum = 0.0f;
  if (c < C)
    for (int k = threadIdx.y; k < chunks; k += kChunkGroups) sum += p[k * C + c];
  group[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int g = 1; g < kChunkGroups; ++g) sum += group[g][threadIdx.x];
    (blockIdx.z == 0 ? out0 : out1)[m * C + c] += sum;
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

int64_t bias_activation_backward_scratch(int M, int N, int D) { return int64_t(M) * column_chunks(N) * D; }

void bias_activation_backward(float* dpre, float* dbias, float* scratch, const float* dpost, const float* pre, int M,
                              int N, int D, Act act, cudaStream_t stream) {
  const int chunks = column_chunks(N);
  bias_activation_backward_kernel<<<dim3(ceil_div(D, kColumnTile), chunks, M), dim3(kColumnTile, kColumnRowGroups), 0,
                                    stream>>>(dpre, scratch, dpost, pre, N, D, ceil_div(N, chunks), act);
  UNIV_CUDA_CHECK_LAUNCH();
  add_column_partials(dbias, nullptr, scratch, M, chunks, D, stream);
}

void add_column_partials(float* out0, float* out1, const float* partials, int M, int chunks, int64_t C,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(C, kColumnTile)), M, out1 ? 2 : 1);
  add_column_partials_kernel<<<grid, dim3(kColumnTile, kChunkGroups), 0, stream>>>(out0, out1, partials, chunks, C);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
