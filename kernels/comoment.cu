// Correlation statistics on the GPU: shifted column sums and co-moment blocks
// sum_t (a_t - shift_a)(b_t - shift_b)^T of token-major activation chunks, added into
// float64 masters. The products run on tensor cores in split TF32: each shifted value
// y = hi + lo with hi and lo TF32 numbers, and y_a y_b ~ hi_a hi_b + hi_a lo_b + lo_a hi_b
// (the dropped lo lo is 2^-22 relative), three cuBLAS TF32 GEMMs with float32
// accumulation over at most kComomentSpan tokens, whose result joins the float64
// master. No atomics; cuBLAS is bitwise reproducible for fixed shapes on one GPU.
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

// hi, lo [n, cols] = the TF32 parts of x[t, c] - shift[c] (x row stride ldx).
__global__ void split_tf32_kernel(float* __restrict__ hi, float* __restrict__ lo, const float* __restrict__ x,
                                  int64_t ldx, const float* __restrict__ shift, int cols, int64_t n) {
  const int64_t total = n * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / cols;
    const int c = static_cast<int>(i - t * cols);
    const float y = x[t * ldx + c] - shift[c];
    const float h = round_tf32(y);
    hi[i] = h;
    lo[i] = round_tf32(y - h);
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

void split_tf32(float* hi, float* lo, const float* x, int64_t ldx, const float* shift, int cols, int64_t n,
                cudaStream_t stream) {
  if (cols <= 0 || n <= 0) return;
  split_tf32_kernel<<<blocks_for(n * cols, 256), 256, 0, stream>>>(hi, lo, x, ldx, shift, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void comoment_accumulate(cublasHandle_t handle, double* master, int64_t ld_master, const float* a_hi,
                         const float* a_lo, int64_t lda, int rows, const float* b_hi, const float* b_lo, int64_t ldb,
                         int cols, int64_t n, float* product, cudaStream_t stream, int batch, int64_t column_stride) {
  if (rows <= 0 || cols <= 0 || n <= 0 || batch <= 0) return;
  if (n > kComomentSpan) throw std::invalid_argument("comoment_accumulate: more tokens than one span");
  // Column-major view: product^T [cols, rows] = b [cols, n] x a^T [n, rows], one per
  // batch entry; the small terms first.
  const float one = 1.0f, zero = 0.0f;
  const float* terms[3][2] = {{b_hi, a_lo}, {b_lo, a_hi}, {b_hi, a_hi}};
  for (int k = 0; k < 3; ++k)
    UNIV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, CUBLAS_OP_N, CUBLAS_OP_T, cols, rows, static_cast<int>(n), &one, terms[k][0], CUDA_R_32F,
        static_cast<int>(ldb), column_stride, terms[k][1], CUDA_R_32F, static_cast<int>(lda), column_stride,
        k == 0 ? &zero : &one, product, CUDA_R_32F, cols, int64_t(rows) * cols, batch, CUBLAS_COMPUTE_32F_FAST_TF32,
        CUBLAS_GEMM_DEFAULT));
  // The batch's masters follow one another (rows * ld_master apart): one pass over all.
  const int all_rows = batch * rows;
  add_to_float64_kernel<<<blocks_for(int64_t(all_rows) * cols, 256), 256, 0, stream>>>(master, ld_master, product,
                                                                                        all_rows, cols);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
