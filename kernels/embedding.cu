// The backward of the token embedding plus positional encoding (the forward is fused
// into the first layer norm, layernorm.cu). Each token's gradient rows, found by a
// counting sort of the batch on the host, add up in a fixed order without float
// atomics; the positional gradient is a column sum over sequences in a fixed order.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

// Channel tile `tile` of token v's gradient row of model m: the gradient rows of the
// positions holding v (token_rows[starts[v]], ... in position order), thread (x, y)
// adding rows y, y + kColumnRowGroups, ... of channel x; the groups then add up in order.
__device__ void token_gradient(float (&group)[kColumnRowGroups][kColumnTile], float* __restrict__ dwte,
                               const float* __restrict__ dout, const int32_t* __restrict__ token_rows,
                               const int32_t* __restrict__ token_starts, int N, int C, int V, int tile, int v, int m) {
  const int c = tile * kColumnTile + threadIdx.x;
  const int32_t* rows = token_rows + int64_t(m) * N;
  const int begin = token_starts[int64_t(m) * (V + 1) + v], end = token_starts[int64_t(m) * (V + 1) + v + 1];
  const float* grad = dout + int64_t(m) * N * C;
  float sum = 0.0f;
  if (c < C) {
#pragma unroll 4
    for (int j = begin + threadIdx.y; j < end; j += kColumnRowGroups) sum += grad[int64_t(rows[j]) * C + c];
  }
  group[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int g = 1; g < kColumnRowGroups; ++g) sum += group[g][threadIdx.x];
    dwte[(int64_t(m) * V + v) * C + c] = sum;
  }
}

// Column tile `tile` of dwpe[m] [T*C] = the sum over sequences b of dout[m, b] [T*C]:
// thread (x, y) sums sequences y, y + kColumnRowGroups, ... of column x; the groups
// then add up in order. T*C columns give enough blocks for one stage.
__device__ void position_gradient(float (&group)[kColumnRowGroups][kColumnTile], float* __restrict__ dwpe,
                                  const float* __restrict__ dout, int B, int64_t TC, int64_t tile, int64_t m) {
  const int64_t i = tile * kColumnTile + threadIdx.x;
  float sum = 0.0f;
  if (i < TC)
    for (int b = threadIdx.y; b < B; b += kColumnRowGroups) sum += dout[(m * B + b) * TC + i];
  group[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && i < TC) {
    for (int g = 1; g < kColumnRowGroups; ++g) sum += group[g][threadIdx.x];
    dwpe[m * TC + i] = sum;
  }
}

// Both gradients in one launch, so that the step's chain has one node for them: blocks
// [0, channel_tiles V M) the token rows (tile, v, m), the rest (with dwpe) the positions'
// column tiles (tile, m).
__global__ void embedding_backward_kernel(float* __restrict__ dwte, float* __restrict__ dwpe,
                                          const float* __restrict__ dout, const int32_t* __restrict__ token_rows,
                                          const int32_t* __restrict__ token_starts, int B, int T, int C, int V,
                                          int token_blocks, int position_tiles) {
  chain_after_prior_grids();
  __shared__ float group[kColumnRowGroups][kColumnTile];
  const int channel_tiles = ceil_div(C, kColumnTile);
  const int block = blockIdx.x;
  if (block < token_blocks) {
    token_gradient(group, dwte, dout, token_rows, token_starts, B * T, C, V, block % channel_tiles,
                   block / channel_tiles % V, block / (channel_tiles * V));
  } else {
    const int position_block = block - token_blocks;
    position_gradient(group, dwpe, dout, B, int64_t(T) * C, position_block % position_tiles,
                      position_block / position_tiles);
  }
}

}  // namespace

void check_tokens(const int32_t* tokens, int64_t n, int V) {
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= V)
      throw std::out_of_range("token " + std::to_string(tokens[i]) + " outside a vocabulary of " + std::to_string(V));
}

void sort_positions_by_token(int32_t* token_rows, int32_t* token_starts, const int32_t* tokens, int M, int N, int V) {
  check_tokens(tokens, int64_t(M) * N, V);
  for (int m = 0; m < M; ++m) {
    const int32_t* tok = tokens + int64_t(m) * N;
    int32_t* starts = token_starts + int64_t(m) * (V + 1);
    std::fill(starts, starts + V + 1, 0);
    for (int n = 0; n < N; ++n) ++starts[tok[n] + 1];
    for (int v = 0; v < V; ++v) starts[v + 1] += starts[v];
    // starts[v] is token v's cursor and ends where token v + 1 starts: shifted back after.
    for (int n = 0; n < N; ++n) token_rows[int64_t(m) * N + starts[tok[n]]++] = n;
    for (int v = V; v > 0; --v) starts[v] = starts[v - 1];
    starts[0] = 0;
  }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* token_rows,
                        const int32_t* token_starts, int M, int B, int T, int C, int V, cudaStream_t stream) {
  const int token_blocks = ceil_div(C, kColumnTile) * V * M;
  const int position_tiles = static_cast<int>(ceil_div<int64_t>(int64_t(T) * C, kColumnTile));
  const int blocks = token_blocks + (dwpe ? position_tiles * M : 0);
  launch_chained(embedding_backward_kernel, blocks, dim3(kColumnTile, kColumnRowGroups), 0, stream, dwte, dwpe, dout,
                 token_rows, token_starts, B, T, C, V, token_blocks, position_tiles);
}

}  // namespace univ::cuda
