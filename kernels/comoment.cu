// Correlation statistics on the GPU: shifted column sums and co-moment blocks
// sum_t (a_t - shift_a)(b_t - shift_b)^T of token-major activation chunks, added into
// float64 masters. The products run on tensor cores in split TF32 (y = hi + lo, three
// TF32 products hi*hi + hi*lo + lo*hi, float32 accumulation), which keeps float32
// accuracy; float32 partial sums span at most kFlushTokens tokens before they join the
// float64 master. Every block owns its output tile: no atomics, bitwise reproducible.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kTile = 128;     // output tile per block: kTile x kTile
constexpr int kStage = 16;     // tokens per shared-memory stage (two k8 steps)
constexpr int kLd = kTile + 8; // padded rows: fragment reads hit 32 distinct banks (136 mod 32 = 8)
constexpr int kThreads = 256;  // 8 warps as 2 x 4, each a 64 x 32 piece of the tile
constexpr int kLoads = kStage * kTile / kThreads;  // elements of a and of b each thread stages
constexpr int kFlushTokens = 1024;
constexpr int kSumColumns = 32, kSumLanes = 8;  // column sums: block of 32 columns x 8 token lanes

__device__ inline uint32_t to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return bits;
}

// c += a b for one m16n8k8 TF32 fragment triple.
__device__ inline void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Block (column tile, row tile). A stage holds kStage tokens of the tile's a and b
// columns, shifted and split into TF32 hi and lo parts; tokens beyond n are zeros.
// The next stage's values are loaded into registers while the current one computes.
__global__ void __launch_bounds__(kThreads, 1)
    comoment_kernel(double* __restrict__ master, int64_t ld_master, const float* __restrict__ a, int64_t lda,
                    const float* __restrict__ shift_a, int rows, const float* __restrict__ b, int64_t ldb,
                    const float* __restrict__ shift_b, int cols, int64_t n) {
  __shared__ uint32_t a_hi[kStage][kLd], a_lo[kStage][kLd], b_hi[kStage][kLd], b_lo[kStage][kLd];
  const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane / 4, t4 = lane % 4;           // fragment coordinates
  const int warp_row = (warp / 4) * 64, warp_col = (warp % 4) * 32;

  // Staging: thread tid covers column tid % kTile of tokens tid / kTile + 2r.
  const int stage_col = tid % kTile, stage_token = tid / kTile;
  const bool a_in = row0 + stage_col < rows, b_in = col0 + stage_col < cols;
  const float a_shift = a_in ? shift_a[row0 + stage_col] : 0.0f;
  const float b_shift = b_in ? shift_b[col0 + stage_col] : 0.0f;
  const float* a_col = a + row0 + stage_col;
  const float* b_col = b + col0 + stage_col;
  float a_next[kLoads], b_next[kLoads];
  auto load = [&](int64_t t0) {
#pragma unroll
    for (int r = 0; r < kLoads; ++r) {
      const int64_t t = t0 + stage_token + 2 * r;
      a_next[r] = a_in && t < n ? a_col[t * lda] - a_shift : 0.0f;
      b_next[r] = b_in && t < n ? b_col[t * ldb] - b_shift : 0.0f;
    }
  };

  float acc[4][4][4] = {};  // [row fragment][column fragment][element]
  auto flush = [&] {
#pragma unroll
    for (int mf = 0; mf < 4; ++mf)
#pragma unroll
      for (int nf = 0; nf < 4; ++nf)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + warp_row + mf * 16 + g + (e >= 2 ? 8 : 0);
          const int j = col0 + warp_col + nf * 8 + 2 * t4 + (e & 1);
          if (i < rows && j < cols) master[i * ld_master + j] += double(acc[mf][nf][e]);
          acc[mf][nf][e] = 0.0f;
        }
  };

  load(0);
  for (int64_t t0 = 0; t0 < n; t0 += kStage) {
    __syncthreads();  // the previous stage is consumed
#pragma unroll
    for (int r = 0; r < kLoads; ++r) {
      const int k = stage_token + 2 * r;
      const uint32_t ah = to_tf32(a_next[r]), bh = to_tf32(b_next[r]);
      a_hi[k][stage_col] = ah;
      a_lo[k][stage_col] = to_tf32(a_next[r] - __uint_as_float(ah));
      b_hi[k][stage_col] = bh;
      b_lo[k][stage_col] = to_tf32(b_next[r] - __uint_as_float(bh));
    }
    __syncthreads();
    if (t0 + kStage < n) load(t0 + kStage);
#pragma unroll
    for (int kk = 0; kk < kStage; kk += 8) {
      uint32_t bh[4][2], bl[4][2];
#pragma unroll
      for (int nf = 0; nf < 4; ++nf) {
        const int j = warp_col + nf * 8 + g;
        bh[nf][0] = b_hi[kk + t4][j], bh[nf][1] = b_hi[kk + t4 + 4][j];
        bl[nf][0] = b_lo[kk + t4][j], bl[nf][1] = b_lo[kk + t4 + 4][j];
      }
#pragma unroll
      for (int mf = 0; mf < 4; ++mf) {
        const int i = warp_row + mf * 16 + g;
        const uint32_t ah[4] = {a_hi[kk + t4][i], a_hi[kk + t4][i + 8], a_hi[kk + t4 + 4][i], a_hi[kk + t4 + 4][i + 8]};
        const uint32_t al[4] = {a_lo[kk + t4][i], a_lo[kk + t4][i + 8], a_lo[kk + t4 + 4][i], a_lo[kk + t4 + 4][i + 8]};
#pragma unroll
        for (int nf = 0; nf < 4; ++nf) {
          mma_tf32(acc[mf][nf], al, bh[nf]);  // the small terms first
          mma_tf32(acc[mf][nf], ah, bl[nf]);
          mma_tf32(acc[mf][nf], ah, bh[nf]);
        }
      }
    }
    if ((t0 + kStage) % kFlushTokens == 0) flush();
  }
  if (n % kFlushTokens != 0) flush();
}

// Block: kSumColumns columns x kSumLanes token lanes; lanes are added in a fixed order.
__global__ void column_sums_kernel(double* __restrict__ sums, const float* __restrict__ x, int64_t ld,
                                   const float* __restrict__ shift, int cols, int64_t n) {
  __shared__ double partial[kSumLanes][kSumColumns];
  const int c = blockIdx.x * kSumColumns + threadIdx.x;
  double s = 0.0;
  if (c < cols) {
    const float sh = shift ? shift[c] : 0.0f;
    for (int64_t t = threadIdx.y; t < n; t += kSumLanes) s += double(x[t * ld + c] - sh);
  }
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int lane = 1; lane < kSumLanes; ++lane) s += partial[lane][threadIdx.x];
    sums[c] += s;
  }
}

__global__ void shift_from_sums_kernel(float* __restrict__ shift, const double* __restrict__ sums, int cols,
                                       int64_t n) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < cols) shift[c] = static_cast<float>(sums[c] / static_cast<double>(n));
}

}  // namespace

void column_sums(double* sums, const float* x, int64_t ld, const float* shift, int cols, int64_t n,
                 cudaStream_t stream) {
  if (cols <= 0 || n <= 0) return;
  column_sums_kernel<<<ceil_div(cols, kSumColumns), dim3(kSumColumns, kSumLanes), 0, stream>>>(sums, x, ld, shift,
                                                                                                cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void shift_from_sums(float* shift, const double* sums, int cols, int64_t n, cudaStream_t stream) {
  if (cols <= 0) return;
  shift_from_sums_kernel<<<ceil_div(cols, 256), 256, 0, stream>>>(shift, sums, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void comoment_accumulate(double* master, int64_t ld_master, const float* a, int64_t lda, const float* shift_a,
                         int rows, const float* b, int64_t ldb, const float* shift_b, int cols, int64_t n,
                         cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || n <= 0) return;
  comoment_kernel<<<dim3(ceil_div(cols, kTile), ceil_div(rows, kTile)), kThreads, 0, stream>>>(
      master, ld_master, a, lda, shift_a, rows, b, ldb, shift_b, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
