// Helpers shared by the kernels: warp reductions, sizes, the deterministic column sums.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "univ/cuda/check.hpp"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ inline float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline double warp_sum(double v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// The MLP's activations (exact GELU, as PyTorch) and their derivatives.
__device__ inline float activate(float x, Act act) {
  if (act == Act::relu) return x < 0.0f ? 0.0f : x;  // NaN passes, as in PyTorch
  if (act == Act::gelu) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
  return x;
}

__device__ inline float activation_derivative(float x, Act act) {
  if (act == Act::relu) return x > 0.0f ? 1.0f : 0.0f;
  if (act == Act::gelu)
    return 0.5f * (1.0f + erff(x * 0.70710678118654752440f)) + x * 0.39894228040143267794f * expf(-0.5f * x * x);
  return 1.0f;
}

template <class T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Blocks for a grid-stride loop over n elements.
inline int blocks_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div<int64_t>(n, threads);
  return static_cast<int>(blocks < 65536 * 16 ? (blocks > 0 ? blocks : 1) : 65536 * 16);
}

// The column sums of parameter gradients (kernels.hpp's ColumnSums): stage 1, a
// block (column tile, row chunk, model) sums its chunk's rows, kColumnRowGroups
// interleaved row groups per column added in order, into partials [M, chunks,
// columns]; stage 2 adds the chunks in order into the gradient. The chunks spread a
// model's rows over the GPU, which one block per column tile would leave mostly idle.
constexpr int kColumnTile = 32;       // columns per block, one per lane
constexpr int kColumnRowGroups = 8;   // stage 1: row groups per block
constexpr int kChunkRows = 32;        // rows per chunk ...
constexpr int kMaxChunks = 256;       // ... until a model has this many chunks

// Row chunks of a model's N rows (at least one, so that N = 0 still adds zeros).
inline int column_chunks(int N) { return std::max(1, std::min(ceil_div(N, kChunkRows), kMaxChunks)); }

}  // namespace univ::cuda
