// The epilogue of the MLP's first matrix product, bias + activation, where the product
// itself does not fuse it (matmul.cu; the other layers' biases are added by the
// kernels that read their outputs); backward, the activation derivative, alone or
// fused with the bias gradient, a two-stage column sum over rows in a fixed order
// (common.cuh), and the second stage of every such sum (ColumnSums).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;

// Block (column tile, row group, model): thread (x, y) takes column x of the tile, its
// bias in a register, in rows y, y + kColumnRowGroups, ... of the group's
// kColumnRowGroups * kBiasRowsPerThread rows (then of every gridDim.y-th group after),
// all of its loads issued before its stores; a warp's loads are one row's 32 adjacent
// columns. No division per element.
constexpr int kBiasRowsPerThread = 8;
constexpr int kBiasGroupRows = kColumnRowGroups * kBiasRowsPerThread;
// pre null: post holds the product and is overwritten.
__global__ void bias_activation_forward_kernel(float* __restrict__ pre, float* post, const float* __restrict__ bias,
                                               int N, int D, Act act) {
  chain_after_prior_grids();
  const int c = blockIdx.x * kColumnTile + threadIdx.x;
  const int64_t m = blockIdx.z;
  if (c >= D) return;
  const float b = bias[m * D + c];
  const float* product = pre ? pre : post;
  for (int first = blockIdx.y * kBiasGroupRows + threadIdx.y; first < N; first += gridDim.y * kBiasGroupRows) {
    float x[kBiasRowsPerThread];
#pragma unroll
    for (int k = 0; k < kBiasRowsPerThread; ++k) {
      const int r = first + k * kColumnRowGroups;
      x[k] = r < N ? product[(m * N + r) * D + c] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kBiasRowsPerThread; ++k) {
      const int r = first + k * kColumnRowGroups;
      if (r >= N) break;
      const int64_t i = (m * N + r) * D + c;
      const float v = x[k] + b;
      if (pre) pre[i] = v;
      post[i] = activate(v, act);
    }
  }
}

__global__ void activation_backward_kernel(float* __restrict__ dpre, const float* __restrict__ pre, Act act,
                                           int64_t total) {
  chain_after_prior_grids();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    dpre[i] *= activation_derivative(pre[i], act);
}

// Stage 1 of the bias gradient. Block (column tile, row chunk, model): dpre for its
// rows and columns; thread (x, y) sums rows y, y + kColumnRowGroups, ... of the chunk
// in column x, and the groups add up in order into partials [M, chunks, D].
__global__ void bias_activation_backward_kernel(float* __restrict__ dpre, float* __restrict__ partials,
                                                const float* __restrict__ dpost, const float* __restrict__ pre,
                                                int N, int D, int chunk_rows, Act act) {
  chain_after_prior_grids();
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
constexpr int kSumThreads = 256;   // stage 2: threads per block ...
constexpr int kChunksPerGroup = 8;  // ... in chunk groups of about this many chunks each
struct ColumnSumLaunch {
  ColumnSumJob job[kJobsPerLaunch];
  int first_block[kJobsPerLaunch + 1];  // job j owns blocks [first_block[j], first_block[j + 1])
  int count;
};

// A job's chunk groups, of about kChunksPerGroup chunks each (a split weight
// gradient's 16 chunks take 2 groups, a bias's 256 take 32): a thread's loads stay
// few, and the rest of the block's threads take distinct columns.
__host__ __device__ int chunk_groups(const ColumnSumJob& j) {
  int groups = 1;
  while (groups < kWarpSize && groups * kChunksPerGroup < j.chunks) groups *= 2;
  return groups;
}

// A job's blocks: (column tile of kSumThreads / groups columns, model, output), the
// tile fastest.
int job_blocks(const ColumnSumJob& j) {
  return static_cast<int>(ceil_div<int64_t>(j.columns, kSumThreads / chunk_groups(j))) * j.models * (j.out1 ? 2 : 1);
}

// Stage 2. A block adds one (column tile, model, output) of its job: thread (x, g)
// sums chunks g, g + groups, ... of column x; the groups then add up in order.
__global__ void add_column_partials_kernel(const __grid_constant__ ColumnSumLaunch launch) {
  chain_after_prior_grids();
  __shared__ float group_sum[kSumThreads];
  int lo = 0, hi = launch.count - 1;  // the job whose blocks hold this one
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (launch.first_block[mid] <= static_cast<int>(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  const ColumnSumJob& job = launch.job[lo];
  const int groups = chunk_groups(job), width = kSumThreads / groups;
  const int x = threadIdx.x % width, g = threadIdx.x / width;
  const int tiles = static_cast<int>(ceil_div<int64_t>(job.columns, width));
  const int local = static_cast<int>(blockIdx.x) - launch.first_block[lo];
  const int64_t c = int64_t(local % tiles) * width + x;
  const int64_t m = local / tiles % job.models;
  const int output = local / tiles / job.models;
  const float* p = job.partials + (output * job.models + m) * job.chunks * job.columns;
  float sum = 0.0f;
  if (c < job.columns) {
#pragma unroll 4
    for (int k = g; k < job.chunks; k += groups) sum += p[k * job.columns + c];
  }
  group_sum[threadIdx.x] = sum;
  __syncthreads();
  if (g == 0 && c < job.columns) {
    for (int k = 1; k < groups; ++k) sum += group_sum[k * width + x];
    (output == 0 ? job.out0 : job.out1)[m * job.columns + c] = sum;
  }
}

}  // namespace

void bias_activation_forward(float* pre, float* post, const float* bias, int M, int N, int D, Act act,
                             cudaStream_t stream) {
  if (int64_t(M) * N * D == 0) return;
  const int row_groups = std::min(ceil_div(N, kBiasGroupRows), 65535);
  launch_chained(bias_activation_forward_kernel, dim3(ceil_div(D, kColumnTile), row_groups, M),
                 dim3(kColumnTile, kColumnRowGroups), 0, stream, pre, post, bias, N, D, act);
}

void activation_backward(float* dpre, const float* pre, int64_t n, Act act, cudaStream_t stream) {
  launch_chained(activation_backward_kernel, blocks_for(n, kThreads), kThreads, 0, stream, dpre, pre, act, n);
}

void bias_activation_backward(float* dpre, float* dbias, ColumnSums& sums, const float* dpost, const float* pre,
                              int M, int N, int D, Act act, cudaStream_t stream) {
  const int chunks = column_chunks(N);
  float* partials = sums.add(dbias, nullptr, M, chunks, D);
  launch_chained(bias_activation_backward_kernel, dim3(ceil_div(D, kColumnTile), chunks, M),
                 dim3(kColumnTile, kColumnRowGroups), 0, stream, dpre, partials, dpost, pre, N, D, ceil_div(N, chunks),
                 act);
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

void ColumnSums::sum_added(cudaStream_t stream) {
  for (size_t first = 0; first < jobs_.size(); first += kJobsPerLaunch) {
    ColumnSumLaunch launch{};
    launch.count = static_cast<int>(std::min<size_t>(kJobsPerLaunch, jobs_.size() - first));
    for (int j = 0; j < launch.count; ++j) {
      launch.job[j] = jobs_[first + j];
      launch.first_block[j + 1] = launch.first_block[j] + job_blocks(launch.job[j]);
    }
    if (launch.first_block[launch.count] == 0) continue;  // no columns at all
    launch_chained(add_column_partials_kernel, launch.first_block[launch.count], kSumThreads, 0, stream, launch);
  }
  jobs_.clear();
}

void ColumnSums::finish(cudaStream_t stream) {
  sum_added(stream);
  used_ = 0;
}

}  // namespace univ::cuda
