// Layer norm over the channel axis, forward and backward: a warp per row, forward
// fused with what writes its input, the bias and residual of the linear layer before
// it, or for the first layer's norm the embedding (token plus position); backward the
// input's gradient, and the weight's and bias's as two-stage column sums over rows in
// a fixed order (ColumnSums), which may run apart from it.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kRowsPerBlock = 8;  // warps per block, one row each

// Row `row` of model m: out = (x - mean) * rstd * weight[m] + bias[m], x the row this
// lane has written (or reads) at channels lane, lane + 32, ...; its sum already taken.
__device__ inline void normalize_row(float* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                     const float* x, float sum, const float* __restrict__ weight,
                                     const float* __restrict__ bias, int64_t row, int64_t m, int C) {
  const float2 stats = normalize_lanes(out + row * C, 1, x, 1, sum, weight + m * C, bias + m * C, C);
  if (threadIdx.x == 0) {
    mean[row] = stats.x;
    rstd[row] = stats.y;
  }
}

// inp = (inp + inp_bias[m]) + residual first, written back (the bias and residual of
// the linear layer before).
__global__ void add_layernorm_forward_kernel(float* __restrict__ out, float* __restrict__ mean,
                                             float* __restrict__ rstd, float* __restrict__ inp,
                                             const float* __restrict__ inp_bias, const float* __restrict__ residual,
                                             const float* __restrict__ weight, const float* __restrict__ bias,
                                             int64_t rows, int N, int C) {
  chain_after_prior_grids();
  const int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int64_t m = row / N;
  float* x = inp + row * C;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < C; c += kWarpSize) {
    float v = x[c] + inp_bias[m * C + c];
    v += residual[row * C + c];
    x[c] = v;  // read back below by this lane only
    sum += v;
  }
  normalize_row(out, mean, rstd, x, sum, weight, bias, row, m, C);
}

// encoded = wte[m, token] + pos[m, t] first, as the CPU op embedding_forward adds them.
__global__ void embedding_layernorm_forward_kernel(float* __restrict__ out, float* __restrict__ mean,
                                                   float* __restrict__ rstd, float* __restrict__ encoded,
                                                   const int32_t* __restrict__ tokens, const float* __restrict__ wte,
                                                   const float* __restrict__ pos, int64_t pos_model_stride,
                                                   const float* __restrict__ weight, const float* __restrict__ bias,
                                                   int64_t rows, int N, int T, int C, int V) {
  chain_after_prior_grids();
  const int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int64_t m = row / N;
  const float* token_row = wte + (m * V + tokens[row]) * C;
  const float* pos_row = pos + m * pos_model_stride + int64_t(row % T) * C;
  float* x = encoded + row * C;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < C; c += kWarpSize) {
    const float v = token_row[c] + pos_row[c];
    x[c] = v;  // read back below by this lane only
    sum += v;
  }
  normalize_row(out, mean, rstd, x, sum, weight, bias, row, m, C);
}

// dinp_in may alias dinp: each element is read, then written, by one thread.
__global__ void layernorm_backward_input_kernel(float* dinp, const float* dinp_in, const float* __restrict__ dout,
                                                const float* __restrict__ inp, const float* __restrict__ weight,
                                                const float* __restrict__ mean, const float* __restrict__ rstd,
                                                int64_t rows, int N, int C) {
  chain_after_prior_grids();
  const int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  layernorm_backward_lanes(dinp + row * C, dinp_in ? dinp_in + row * C : nullptr, 1, dout + row * C, 1, inp + row * C,
                           1, weight + row / N * C, mean[row], rstd[row], C);
}

// Stage 1 of the parameter gradients. Block (column tile, row chunk, model): thread
// (x, y) sums rows y, y + kColumnRowGroups, ... of the chunk in column x; the groups
// then add up in order into partials [2, M, chunks, C], dweight's before dbias's.
__global__ void layernorm_backward_params_kernel(float* __restrict__ partials, const float* __restrict__ dout,
                                                 const float* __restrict__ inp, const float* __restrict__ mean,
                                                 const float* __restrict__ rstd, int N, int C, int chunk_rows) {
  chain_after_prior_grids();
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

void add_layernorm_forward(float* out, float* mean, float* rstd, float* inp, const float* inp_bias,
                           const float* residual, const float* weight, const float* bias, int M, int N, int C,
                           cudaStream_t stream) {
  const int64_t rows = int64_t(M) * N;
  launch_chained(add_layernorm_forward_kernel, static_cast<unsigned>(ceil_div<int64_t>(rows, kRowsPerBlock)),
                 dim3(kWarpSize, kRowsPerBlock), 0, stream, out, mean, rstd, inp, inp_bias, residual, weight, bias,
                 rows, N, C);
}

void embedding_layernorm_forward(float* out, float* mean, float* rstd, float* encoded, const int32_t* tokens,
                                 const float* wte, const float* pos, int64_t pos_model_stride, const float* weight,
                                 const float* bias, int M, int B, int T, int C, int V, cudaStream_t stream) {
  const int64_t rows = int64_t(M) * B * T;
  launch_chained(embedding_layernorm_forward_kernel, static_cast<unsigned>(ceil_div<int64_t>(rows, kRowsPerBlock)),
                 dim3(kWarpSize, kRowsPerBlock), 0, stream, out, mean, rstd, encoded, tokens, wte, pos,
                 pos_model_stride, weight, bias, rows, B * T, T, C, V);
}

void layernorm_backward_input(float* dinp, const float* dinp_in, const float* dout, const float* inp,
                              const float* weight, const float* mean, const float* rstd, int M, int N, int C,
                              cudaStream_t stream) {
  const int64_t rows = int64_t(M) * N;
  launch_chained(layernorm_backward_input_kernel, static_cast<unsigned>(ceil_div<int64_t>(rows, kRowsPerBlock)),
                 dim3(kWarpSize, kRowsPerBlock), 0, stream, dinp, dinp_in, dout, inp, weight, mean, rstd, rows, N, C);
}

void layernorm_backward_params(float* dweight, float* dbias, ColumnSums& sums, const float* dout, const float* inp,
                               const float* mean, const float* rstd, int M, int N, int C, cudaStream_t stream) {
  const int chunks = column_chunks(N);
  float* partials = sums.add(dweight, dbias, M, chunks, C);
  launch_chained(layernorm_backward_params_kernel, dim3(ceil_div(C, kColumnTile), chunks, M),
                 dim3(kColumnTile, kColumnRowGroups), 0, stream, partials, dout, inp, mean, rstd, N, C,
                 ceil_div(N, chunks));
}

}  // namespace univ::cuda
