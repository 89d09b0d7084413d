// Layer norm over the channel axis, forward and backward: a warp per row; the
// weight and bias gradients are two-stage column sums over rows in a fixed order
// (common.cuh).
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr float kEps = 1e-5f;
constexpr int kRowsPerBlock = 8;  // warps per block, one row each

__global__ void layernorm_forward_kernel(float* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                         const float* __restrict__ inp, const float* __restrict__ weight,
                                         const float* __restrict__ bias, int64_t rows, int N, int C) {
  const int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const float* x = inp + row * C;
  float sum = 0.0f;
  for (int c = lane; c < C; c += kWarpSize) sum += x[c];
  const float mu = warp_sum(sum) / C;
  float sq = 0.0f;
  for (int c = lane; c < C; c += kWarpSize) sq += (x[c] - mu) * (x[c] - mu);
  const float rs = rsqrtf(warp_sum(sq) / C + kEps);
  const int64_t m = row / N;
  const float* w = weight + m * C;
  const float* b = bias + m * C;
  float* o = out + row * C;
  for (int c = lane; c < C; c += kWarpSize) o[c] = (x[c] - mu) * rs * w[c] + b[c];
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

__global__ void layernorm_backward_input_kernel(float* __restrict__ dinp, const float* __restrict__ dout,
                                                const float* __restrict__ inp, const float* __restrict__ weight,
                                                const float* __restrict__ mean, const float* __restrict__ rstd,
                                                int64_t rows, int N, int C) {
  const int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const float* x = inp + row * C;
  const float* dy = dout + row * C;
  const float* w = weight + row / N * C;
  const float mu = mean[row], rs = rstd[row];
  float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
  for (int c = lane; c < C; c += kWarpSize) {
    const float dnorm = w[c] * dy[c];
    dnorm_mean += dnorm;
    dnorm_norm_mean += dnorm * (x[c] - mu) * rs;
  }
  dnorm_mean = warp_sum(dnorm_mean) / C;
  dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
  float* dx = dinp + row * C;
  for (int c = lane; c < C; c += kWarpSize)
    dx[c] += (w[c] * dy[c] - dnorm_mean - (x[c] - mu) * rs * dnorm_norm_mean) * rs;
}

// Stage 1 of the parameter gradients. Block (column tile, row chunk, model): thread
// (x, y) sums rows y, y + kColumnRowGroups, ... of the chunk in column x; the groups
// then add up in order into partials [2, M, chunks, C], dweight's before dbias's.
__global__ void layernorm_backward_params_kernel(float* __restrict__ partials, const float* __restrict__ dout,
                                                 const float* __restrict__ inp, const float* __restrict__ mean,
                                                 const float* __restrict__ rstd, int N, int C, int chunk_rows) {
  __shared__ float group_w[kColumnRowGroups][kColumnTile], group_b[kColumnRowGroups][kColumnTile];
  const int c = blockIdx.x * kColumnTile + threadIdx.x;
  const int chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t m = blockIdx.z, M = gridDim.z;
  const int end = min(N, (chunk + 1) * chunk_rows);
  float dw = 0.0f, db = 0.0f;
  if (c < C)
    for (int n = chunk * chunk_rows + threadIdx.y; n < end; n += kColumnRowGroups) {
      const int64_t row = m * N + n;
      const float dy = dout[row * C + c];
      db += dy;
      dw += (inp[row * C + c] - mean[row]) * rstd[row] * dy;
    }
  group_w[threadIdx.y][threadIdx.x] = dw;
  group_b[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int g = 1; g < kColumnRowGroups; ++g) {
      dw += group_w[g][threadIdx.x];
      db += group_b[g][threadIdx.x];
    }
    const int64_t at = (m * chunks + chunk) * C + c;
    partials[at] = dw;
    partials[M * chunks * C + at] = db;
  }
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int M, int N, int C, cudaStream_t stream) {
  const int64_t rows = int64_t(M) * N;
  layernorm_forward_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(rows, kRowsPerBlock)),
                             dim3(kWarpSize, kRowsPerBlock), 0, stream>>>(out, mean, rstd, inp, weight, bias, rows, N,
                                                                          C);
  UNIV_CUDA_CHECK_LAUNCH();
}

int64_t layernorm_backward_scratch(int M, int N, int C) { return 2 * int64_t(M) * column_chunks(N) * C; }

void layernorm_backward(float* dinp, float* dweight, float* dbias, float* scratch, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int M, int N, int C,
                        cudaStream_t stream) {
  const int64_t rows = int64_t(M) * N;
  layernorm_backward_input_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(rows, kRowsPerBlock)),
                                    dim3(kWarpSize, kRowsPerBlock), 0, stream>>>(dinp, dout, inp, weight, mean, rstd,
                                                                                 rows, N, C);
  UNIV_CUDA_CHECK_LAUNCH();
  const int chunks = column_chunks(N);
  layernorm_backward_params_kernel<<<dim3(ceil_div(C, kColumnTile), chunks, M), dim3(kColumnTile, kColumnRowGroups), 0,
                                     stream>>>(scratch, dout, inp, mean, rstd, N, C, ceil_div(N, chunks));
  UNIV_CUDA_CHECK_LAUNCH();
  add_column_partials(dweight, dbias, scratch, M, chunks, C, stream);
}

}  // namespace univ::cuda
