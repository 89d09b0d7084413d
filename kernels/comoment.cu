// Correlation statistics on the GPU: shifted column sums and co-moment blocks
// sum_t (a_t - shift_a)(b_t - shift_b)^T of token-major activation chunks, added into
// float64 masters. The products run on tensor cores in split TF32: each shifted value
// y = hi + lo with hi and lo TF32 numbers, and y_a y_b ~ lo_a hi_b + hi_a hi_b + hi_a lo_b
// (the dropped lo lo is 2^-22 relative). The three terms are one cuBLAS TF32 GEMM of
// depth 3n over a stacked copy [lo; hi; hi; lo] of each span: rows [0, 3n) of a's
// stack against rows [n, 4n) of b's pair exactly those terms, so the float32 product
// is written once per span (not read and written by three GEMMs) before it joins the
// float64 master. No atomics; cuBLAS is bitwise reproducible for fixed shapes on one GPU.
#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kSumColumns = 32, kSumLanes = 8;  // column sums: block of 32 columns x 8 token lanes

__device__ inline float round_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits);
}

// stacked [4, n, cols] = lo | hi | hi | lo, the TF32 parts of x[t, c] - shift[c] (x row
// stride ldx).
__global__ void split_tf32_kernel(float* __restrict__ stacked, const float* __restrict__ x, int64_t ldx,
                                  const float* __restrict__ shift, int cols, int64_t n) {
  const int64_t total = n * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / cols;
    const int c = static_cast<int>(i - t * cols);
    const float y = x[t * ldx + c] - shift[c];
    const float hi = round_tf32(y), lo = round_tf32(y - hi);
    stacked[i] = lo;
    stacked[total + i] = hi;
    stacked[2 * total + i] = hi;
    stacked[3 * total + i] = lo;
  }
}

// master[r, c] (row stride ld_master) += part[r, c] ([rows, cols] packed).
__global__ void add_to_float64_kernel(double* __restrict__ master, int64_t ld_master, const float* __restrict__ part,
                                      int rows, int cols) {
  const int64_t total = int64_t(rows) * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols;
    master[r * ld_master + (i - r * cols)] += double(part[i]);
  }
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

void split_tf32(float* stacked, const float* x, int64_t ldx, const float* shift, int cols, int64_t n,
                cudaStream_t stream) {
  if (cols <= 0 || n <= 0) return;
  split_tf32_kernel<<<blocks_for(n * cols, 256), 256, 0, stream>>>(stacked, x, ldx, shift, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void comoment_accumulate(cublasHandle_t handle, double* master, int64_t ld_master, const float* a_stacked,
                         int64_t lda, int rows, const float* b_stacked, int64_t ldb, int cols, int64_t n,
                         float* product, cudaStream_t stream, int batch, int64_t column_stride) {
  if (rows <= 0 || cols <= 0 || n <= 0 || batch <= 0) return;
  if (3 * n > INT32_MAX) throw std::invalid_argument("comoment_accumulate: span too long for one GEMM");
  // Column-major view: product^T [cols, rows] = b' [cols, 3n] x a'^T [3n, rows] with
  // a' = a's stack rows [0, 3n) (lo, hi, hi) and b' = b's rows [n, 4n) (hi, hi, lo).
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_N, CUBLAS_OP_T, cols, rows, static_cast<int>(3 * n), &one, b_stacked + n * ldb, CUDA_R_32F,
      static_cast<int>(ldb), column_stride, a_stacked, CUDA_R_32F, static_cast<int>(lda), column_stride, &zero,
      product, CUDA_R_32F, cols, int64_t(rows) * cols, batch, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
  // The batch's masters follow one another (rows * ld_master apart): one pass over all.
  const int all_rows = batch * rows;
  add_to_float64_kernel<<<blocks_for(int64_t(all_rows) * cols, 256), 256, 0, stream>>>(master, ld_master, product,
                                                                                        all_rows, cols);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
