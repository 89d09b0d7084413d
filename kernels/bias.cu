// The epilogue of the MLP's first matrix product, bias + activation (the other
// layers' biases are added by the kernels that read their outputs); backward, the
// activation derivative fused with the bias gradient, a two-stage column sum over rows
// in a fixed order (common.cuh), and the second stage of every such sum (ColumnSums).
#include <stdexcept>
#include <string>

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

// The jobs of one stage-2 launch, passed as kernel parameters (4 KB at most): the
// graph that captures the launch keeps them, and nothing is uploaded.
constexpr int kJobsPerLaunch = 64;
struct ColumnSumLaunch {
  ColumnSumJob job[kJobsPerLaunch];
  int first_block[kJobsPerLaunch + 1];  // job j owns blocks [first_block[j], first_block[j + 1])
  int count;
};

// A job's blocks: (column tile, model, output), the tile fastest.
int job_blocks(const ColumnSumJob& j) {
  return static_cast<int>(ceil_div<int64_t>(j.columns, kColumnTile)) * j.models * (j.out1 ? 2 : 1);
}

// Stage 2. A block adds one (column tile, model, output) of its job: thread (x, y) sums
// chunks y, y + kChunkGroups, ... of column x; the groups then add up in order.
__global__ void add_column_partials_kernel(const __grid_constant__ ColumnSumLaunch launch) {
  __shared__ float group[kChunkGroups][kColumnTile];
  int j = 0;
  while (j + 1 < launch.count && launch.first_block[j + 1] <= static_cast<int>(blockIdx.x)) ++j;
  const ColumnSumJob& job = launch.job[j];
  const int tiles = static_cast<int>(ceil_div<int64_t>(job.columns, kColumnTile));
  const int local = static_cast<int>(blockIdx.x) - launch.first_block[j];
  const int64_t c = int64_t(local % tiles) * kColumnTile + threadIdx.x;
  const int64_t m = local / tiles % job.models;
  const int output = local / tiles / job.models;
  const float* p = job.partials + (output * job.models + m) * job.chunks * job.columns;
  float sum = 0.0f;
  if (c < job.columns)
    for (int k = threadIdx.y; k < job.chunks; k += kChunkGroups) sum += p[k * job.columns + c];
  group[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < job.columns) {
    for (int g = 1; g < kChunkGroups; ++g) sum += group[g][threadIdx.x];
    (output == 0 ? job.out0 : job.out1)[m * job.columns + c] = sum;
  }
}

}  // namespace

void bias_activation_forward(float* pre, float* post, const float* bias, int M, int N, int D, Act act,
                             cudaStream_t stream) {
  const int64_t total = int64_t(M) * N * D;
  bias_activation_forward_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(pre, post, bias, N, D, act,
                                                                                       total);
  UNIV_CUDA_CHECK_LAUNCH();
}

void bias_activation_backward(float* dpre, float* dbias, ColumnSums& sums, const float* dpost, const float* pre,
                              int M, int N, int D, Act act, cudaStream_t stream) {
  const int chunks = column_chunks(N);
  float* partials = sums.add(dbias, nullptr, M, chunks, D);
  bias_activation_backward_kernel<<<dim3(ceil_div(D, kColumnTile), chunks, M), dim3(kColumnTile, kColumnRowGroups), 0,
                                    stream>>>(dpre, partials, dpost, pre, N, D, ceil_div(N, chunks), act);
  UNIV_CUDA_CHECK_LAUNCH();
}

int64_t column_sum_partials(int M, int N, int64_t columns) {
  return ColumnSums::room(int64_t(M) * column_chunks(N) * columns);
}

float* ColumnSums::add(float* out0, float* out1, int M, int chunks, int64_t C) {
  const int64_t n = room((out1 ? 2 : 1) * int64_t(M) * chunks * C);
  if (used_ + n > capacity_)
    throw std::logic_error("ColumnSums: " + std::to_string(used_ + n) + " floats of partial sums, room for " +
                           std::to_string(capacity_));
  float* partials = scratch_ + used_;
  used_ += n;
  jobs_.push_back({out0, out1, partials, C, M, chunks});
  return partials;
}

void ColumnSums::finish(cudaStream_t stream) {
  for (size_t first = 0; first < jobs_.size(); first += kJobsPerLaunch) {
    ColumnSumLaunch launch{};
    launch.count = static_cast<int>(std::min<size_t>(kJobsPerLaunch, jobs_.size() - first));
    for (int j = 0; j < launch.count; ++j) {
      launch.job[j] = jobs_[first + j];
      launch.first_block[j + 1] = launch.first_block[j] + job_blocks(launch.job[j]);
    }
    if (launch.first_block[launch.count] == 0) continue;  // no columns at all
    add_column_partials_kernel<<<launch.first_block[launch.count], dim3(kColumnTile, kChunkGroups), 0, stream>>>(
        launch);
    UNIV_CUDA_CHECK_LAUNCH();
  }
  jobs_.clear();
  used_ = 0;
}

}  // namespace univ::cuda
