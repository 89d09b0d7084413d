// Correlation statistics on the GPU: shifted column sums and co-moment blocks
// sum_t (a_t - shift_a)(b_t - shift_b)^T of token-major activation chunks, added into
// float64 masters. The products run on tensor cores on split values: each shifted
// value y = hi + lo with hi and lo of 11 significant bits, and y_a y_b ~ lo_a hi_b +
// hi_a hi_b + hi_a lo_b (the dropped lo lo is 2^-22 relative). The parts are TF32
// numbers, or FP16 numbers after scaling each neuron by a power of two (exact) that
// maps the first chunk's largest |y| to 2^6, FP16 reaching 2^16; FP16 products run at
// about twice TF32's rate. The three terms are one cuBLAS GEMM of depth 3n with float32
// accumulation over a stacked copy [lo; hi; hi; lo] of each span: rows [0, 3n) of a's
// stack against rows [n, 4n) of b's pair exactly those terms. The float32 sums grow
// less accurate with the span's length, so spans stay short, and the float64 pass
// that adds them into the masters takes a group of spans at once (one batched GEMM
// writes their products side by side): the master is read and written once per group.
// No atomics; cuBLAS is bitwise reproducible for fixed shapes on one GPU.
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kF16TopExponent = 6;  // FP16 split: the first chunk's largest |y| maps to <= 2^6

// Where token t's part 0 (lo) of column c goes in a group of stacks [spans, 4, n, cols]:
// the stack of span t / n, row t % n; parts follow n * cols apart.
__device__ inline int64_t stacked_index(int64_t t, int c, int cols, int64_t n) {
  const int64_t span = t / n;
  return span * 4 * n * cols + (t - span * n) * cols + c;
}

// y = hi + lo in TF32 parts.
struct Tf32Parts {
  __device__ void operator()(float y, int, float& hi, float& lo) const {
    hi = round_tf32(y);
    lo = round_tf32(y - hi);
  }
};

// y * inv_scale[c] = hi + lo in FP16 parts; *overflow = 1 where a finite value leaves
// FP16's range (non-finite inputs pass, as in the TF32 split).
struct F16Parts {
  const float* inv_scale;
  int* overflow;
  __device__ void operator()(float y, int c, __half& hi, __half& lo) const {
    y *= inv_scale[c];
    hi = __float2half_rn(y);
    const float hi_value = __half2float(hi);
    lo = __float2half_rn(y - hi_value);
    if (isfinite(y) && !isfinite(hi_value)) *overflow = 1;
  }
};

// stacked [spans, 4, n, cols] = lo | hi | hi | lo per span of n tokens, the parts
// (Parts) of x[t, c] - shift[c] for t < spans * n (x row stride ldx).
template <class Part, class Parts>
__global__ void split_kernel(Part* __restrict__ stacked, const float* __restrict__ x, int64_t ldx,
                             const float* __restrict__ shift, int cols, int64_t n, int spans, Parts parts) {
  const int64_t total = spans * n * cols, part = n * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / cols;
    const int c = static_cast<int>(i - t * cols);
    Part hi, lo;
    parts(x[t * ldx + c] - shift[c], c, hi, lo);
    Part* out = stacked + stacked_index(t, c, cols, n);
    out[0] = lo;
    out[part] = hi;
    out[2 * part] = hi;
    out[3 * part] = lo;
  }
}

// inv_scale[c] = 2^(kF16TopExponent - e) where the column's largest |x - shift| over n
// rows is at most 2^e (for a column constant there, |shift| stands in; 1 when that is
// 0 too). Block: kColumnTile columns x kColumnRowGroups token lanes (common.cuh).
__global__ void column_scales_kernel(float* __restrict__ inv_scale, const float* __restrict__ x, int64_t ld,
                                     const float* __restrict__ shift, int cols, int64_t n) {
  __shared__ float partial[kColumnRowGroups][kColumnTile];
  const int c = blockIdx.x * kColumnTile + threadIdx.x;
  float largest = 0.0f;
  if (c < cols)
    for (int64_t t = threadIdx.y; t < n; t += kColumnRowGroups)
      largest = fmaxf(largest, fabsf(x[t * ld + c] - shift[c]));
  partial[threadIdx.y][threadIdx.x] = largest;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int lane = 1; lane < kColumnRowGroups; ++lane) largest = fmaxf(largest, partial[lane][threadIdx.x]);
    if (largest == 0.0f) largest = fabsf(shift[c]);
    int e = 0;
    if (largest > 0.0f && isfinite(largest)) frexpf(largest, &e);  // largest <= 2^e
    inv_scale[c] = largest > 0.0f ? ldexpf(1.0f, max(-100, min(100, kF16TopExponent - e))) : 1.0f;
  }
}

// master[r, c] (row stride ld_master) += sum over g < count of products[g, r, c]
// ([count, rows, cols] packed), added in g order.
__global__ void add_to_float64_kernel(double* __restrict__ master, int64_t ld_master,
                                      const float* __restrict__ products, int rows, int cols, int count) {
  const int64_t total = int64_t(rows) * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    double sum = 0.0;
    for (int g = 0; g < count; ++g) sum += double(products[g * total + i]);
    const int64_t r = i / cols;
    master[r * ld_master + (i - r * cols)] += sum;
  }
}

// One raw shifted co-moment with its FP16 scales undone, less n mu_a mu_b.
__device__ inline double centered_comoment(double raw, const double* sums_a, const float* inv_scale_a,
                                           const double* sums_b, const float* inv_scale_b, int a, int b, double n) {
  const double scale_a = inv_scale_a ? 1.0 / double(inv_scale_a[a]) : 1.0;
  const double scale_b = inv_scale_b ? 1.0 / double(inv_scale_b[b]) : 1.0;
  const double mu_a = sums_a[a] / n, mu_b = sums_b[b] / n;
  return __dsub_rn(__dmul_rn(__dmul_rn(raw, scale_a), scale_b), __dmul_rn(__dmul_rn(n, mu_a), mu_b));
}

// Grid: x over one block's elements, y the batch. Where symmetric, the thread of (r, c)
// with r < c writes both (r, c) and (c, r), and r > c writes nothing.
__global__ void center_comoments_kernel(double* __restrict__ centered, const double* __restrict__ raw,
                                        const double* __restrict__ sums_a, const float* __restrict__ inv_scale_a,
                                        const double* __restrict__ sums_b, const float* __restrict__ inv_scale_b,
                                        int rows, int cols, double n, bool symmetric) {
  const int64_t per_block = int64_t(rows) * cols, e = blockIdx.y;
  raw += e * per_block;
  centered += e * per_block;
  sums_a += e * rows;
  sums_b += e * cols;
  if (inv_scale_a) inv_scale_a += e * rows;
  if (inv_scale_b) inv_scale_b += e * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < per_block;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / cols), c = static_cast<int>(i - int64_t(r) * cols);
    if (symmetric && r > c) continue;
    const double v = centered_comoment(raw[i], sums_a, inv_scale_a, sums_b, inv_scale_b, r, c, n);
    if (!symmetric || r == c) {
      centered[i] = v;
      continue;
    }
    const int64_t mirror = int64_t(c) * cols + r;
    const double w = centered_comoment(raw[mirror], sums_a, inv_scale_a, sums_b, inv_scale_b, c, r, n);
    centered[i] = centered[mirror] = 0.5 * (v + w);
  }
}

// Block: kColumnTile columns x kColumnRowGroups token lanes (common.cuh); lanes are added in a fixed order.
__global__ void column_sums_kernel(double* __restrict__ sums, const float* __restrict__ x, int64_t ld,
                                   const float* __restrict__ shift, int cols, int64_t n) {
  __shared__ double partial[kColumnRowGroups][kColumnTile];
  const int c = blockIdx.x * kColumnTile + threadIdx.x;
  double s = 0.0;
  if (c < cols) {
    const float sh = shift ? shift[c] : 0.0f;
    for (int64_t t = threadIdx.y; t < n; t += kColumnRowGroups) s += double(x[t * ld + c] - sh);
  }
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int lane = 1; lane < kColumnRowGroups; ++lane) s += partial[lane][threadIdx.x];
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
  const dim3 block(kColumnTile, kColumnRowGroups);
  column_sums_kernel<<<ceil_div(cols, kColumnTile), block, 0, stream>>>(sums, x, ld, shift, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void shift_from_sums(float* shift, const double* sums, int cols, int64_t n, cudaStream_t stream) {
  if (cols <= 0) return;
  shift_from_sums_kernel<<<ceil_div(cols, 256), 256, 0, stream>>>(shift, sums, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void split_tf32(float* stacked, const float* x, int64_t ldx, const float* shift, int cols, int64_t n, int spans,
                cudaStream_t stream) {
  if (cols <= 0 || n <= 0 || spans <= 0) return;
  split_kernel<<<blocks_for(spans * n * cols, 256), 256, 0, stream>>>(stacked, x, ldx, shift, cols, n, spans,
                                                                      Tf32Parts{});
  UNIV_CUDA_CHECK_LAUNCH();
}

void column_scales(float* inv_scale, const float* x, int64_t ld, const float* shift, int cols, int64_t n,
                   cudaStream_t stream) {
  if (cols <= 0 || n <= 0) return;
  const dim3 block(kColumnTile, kColumnRowGroups);
  column_scales_kernel<<<ceil_div(cols, kColumnTile), block, 0, stream>>>(inv_scale, x, ld, shift, cols, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void split_f16(void* stacked, const float* x, int64_t ldx, const float* shift, const float* inv_scale, int cols,
               int64_t n, int spans, int* overflow, cudaStream_t stream) {
  if (cols <= 0 || n <= 0 || spans <= 0) return;
  split_kernel<<<blocks_for(spans * n * cols, 256), 256, 0, stream>>>(static_cast<__half*>(stacked), x, ldx, shift,
                                                                      cols, n, spans, F16Parts{inv_scale, overflow});
  UNIV_CUDA_CHECK_LAUNCH();
}

void comoment_products(cublasHandle_t handle, float* products, const void* a_stacked, int64_t lda, int rows,
                       const void* b_stacked, int64_t ldb, int cols, int64_t n, SplitPrecision split, int batch,
                       int64_t stride_a, int64_t stride_b) {
  if (rows <= 0 || cols <= 0 || n <= 0 || batch <= 0) return;
  if (3 * n > INT32_MAX) throw std::invalid_argument("comoment_products: span too long for one GEMM");
  // Column-major view: product^T [cols, rows] = b' [cols, 3n] x a'^T [3n, rows] with
  // a' = a's stack rows [0, 3n) (lo, hi, hi) and b' = b's rows [n, 4n) (hi, hi, lo).
  const bool f16 = split == SplitPrecision::f16;
  const cudaDataType_t type = f16 ? CUDA_R_16F : CUDA_R_32F;
  const int64_t part_bytes = f16 ? 2 : 4;
  const void* b_rows = static_cast<const char*>(b_stacked) + n * ldb * part_bytes;
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_N, CUBLAS_OP_T, cols, rows, static_cast<int>(3 * n), &one, b_rows, type, static_cast<int>(ldb),
      stride_b, a_stacked, type, static_cast<int>(lda), stride_a, &zero, products, CUDA_R_32F, cols,
      int64_t(rows) * cols, batch, f16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

void center_comoments(double* centered, const double* raw, const double* sums_a, const float* inv_scale_a,
                      const double* sums_b, const float* inv_scale_b, int rows, int cols, int batch, int64_t n,
                      bool symmetric, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || batch <= 0) return;
  if (symmetric && rows != cols) throw std::invalid_argument("center_comoments: a symmetric block must be square");
  const dim3 grid(blocks_for(int64_t(rows) * cols, 256), batch);
  center_comoments_kernel<<<grid, 256, 0, stream>>>(centered, raw, sums_a, inv_scale_a, sums_b, inv_scale_b, rows,
                                                    cols, static_cast<double>(n), symmetric);
  UNIV_CUDA_CHECK_LAUNCH();
}

void add_products_to_float64(double* master, int64_t ld_master, const float* products, int rows, int cols, int count,
                             cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || count <= 0) return;
  add_to_float64_kernel<<<blocks_for(int64_t(rows) * cols, 256), 256, 0, stream>>>(master, ld_master, products, rows,
                                                                                   cols, count);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
