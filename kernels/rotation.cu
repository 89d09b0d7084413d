// The rotation baseline on the GPU: Haar-random orthogonal matrices (Gaussian entries
// from cuRAND's Philox4_32_10, a Householder QR per matrix in one thread block, or
// the sign fix around cuSOLVER's QR for wide ones, Q's columns times sign(diag R),
// Mezzadri 2007), the rotated variances diag(Q S Q^T), and correlation matrices
// normalised and matched row by row. The Gaussians use the counters of
// univ::PhiloxStream, so the host's rotation_matrices draws the same matrices.
#include <curand_kernel.h>

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kQrThreads = 1024;  // a block per matrix: as many warps as a block may have share its columns
constexpr int kQrWarps = kQrThreads / kWarpSize;

// (0, 1] from 53 bits of two Philox words, as PhiloxStream::next_uniform.
__device__ inline double unit_interval(uint32_t lo, uint32_t hi) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<double>((bits >> 11) + 1) * 0x1.0p-53;
}

// g [batch, n, n] column-major. Entry (r, c) of matrix b is PhiloxStream(seed,
// streams[b])'s (r n + c)-th next_normal(): Box-Muller (cosine branch) of Philox block
// r n + c, which cuRAND's Philox4_32_10 yields at offset 4 (r n + c) of subsequence
// streams[b].
__global__ void gaussian_matrices_kernel(double* __restrict__ g, const uint64_t* __restrict__ streams, uint64_t seed,
                                         int n) {
  const int64_t count = int64_t(n) * n;
  const uint64_t stream = streams[blockIdx.y];
  double* out = g + blockIdx.y * count;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    curandStatePhilox4_32_10_t state;
    curand_init(seed, stream, 4 * static_cast<uint64_t>(e), &state);
    const uint4 w = curand4(&state);
    const double radius = sqrt(-2.0 * log(unit_interval(w.x, w.y)));
    const int64_t r = e / n, c = e - r * n;
    out[r + c * n] = radius * cos(6.283185307179586476925 * unit_interval(w.z, w.w));
  }
}

// The sum of v over the block, in a fixed order, returned to every thread.
__device__ double block_sum(double v, double* scratch /* [kQrWarps] */) {
  v = warp_sum(v);
  __syncthreads();  // every thread has read the previous sum
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kQrWarps; ++w) total += scratch[w];
  return total;
}

// x[k:n] -= tau v (v^T x[k:n]) for the columns x = m[:, j], j in [first, n), one warp
// per column; v[k] = 1.
__device__ void apply_reflector(double* m, const double* v, double tau, int k, int first, int n) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int j = first + warp; j < n; j += kQrWarps) {
    double* x = m + int64_t(j) * n;
    double w = 0;
    for (int i = k + lane; i < n; i += kWarpSize) w += v[i] * x[i];
    w = warp_sum(w) * tau;
    for (int i = k + lane; i < n; i += kWarpSize) x[i] -= v[i] * w;
  }
}

// One block per n x n column-major matrix. a: on entry the Gaussian matrix, on return
// R above the diagonal and the Householder vectors below it (LAPACK's dgeqr2
// reflectors: beta = -sign(alpha) |x|). q: Q diag(sign(diag R)), accumulated
// backwards from the identity as dorg2r does.
__global__ void __launch_bounds__(kQrThreads) haar_q_kernel(double* __restrict__ a_all, double* __restrict__ q_all,
                                                            int n) {
  extern __shared__ double shared[];
  double* v = shared;        // [n] the current Householder vector
  double* tau = v + n;       // [n]
  double* sign = tau + n;    // [n] sign of R's diagonal
  __shared__ double scratch[kQrWarps];
  __shared__ double scale;
  const int64_t count = int64_t(n) * n;
  double* a = a_all + blockIdx.x * count;
  double* q = q_all + blockIdx.x * count;
  const int tid = threadIdx.x;

  for (int k = 0; k < n; ++k) {
    double* col = a + int64_t(k) * n;
    double below = 0;
    for (int i = k + 1 + tid; i < n; i += kQrThreads) below += col[i] * col[i];
    below = block_sum(below, scratch);
    if (tid == 0) {
      const double alpha = col[k];
      if (below == 0) {  // nothing to annihilate: H_k = I, R_kk = alpha
        tau[k] = 0;
        scale = 0;
        sign[k] = alpha < 0 ? -1 : 1;
      } else {
        const double norm = sqrt(alpha * alpha + below);
        const double beta = alpha >= 0 ? -norm : norm;
        tau[k] = (beta - alpha) / beta;
        scale = 1 / (alpha - beta);
        col[k] = beta;
        sign[k] = beta < 0 ? -1 : 1;
      }
      v[k] = 1;
    }
    __syncthreads();
    for (int i = k + 1 + tid; i < n; i += kQrThreads) {
      v[i] = col[i] * scale;
      col[i] = v[i];
    }
    __syncthreads();
    if (tau[k] != 0) apply_reflector(a, v, tau[k], k, k + 1, n);
    __syncthreads();
  }

  for (int64_t e = tid; e < count; e += kQrThreads) q[e] = e % (n + 1) == 0 ? 1.0 : 0.0;
  __syncthreads();
  // q = H_k q for k = n-1 .. 0; columns j < k of q are still e_j, which H_k keeps.
  for (int k = n - 1; k >= 0; --k) {
    const double* col = a + int64_t(k) * n;
    for (int i = k + 1 + tid; i < n; i += kQrThreads) v[i] = col[i];
    if (tid == 0) v[k] = 1;
    __syncthreads();
    if (tau[k] != 0) apply_reflector(q, v, tau[k], k, k, n);
    __syncthreads();
  }
  for (int64_t e = tid; e < count; e += kQrThreads) q[e] *= sign[e / n];
}

// sign[k] = the sign of a(k, k) (+1 for 0), a column-major n x n.
__global__ void diagonal_signs_kernel(double* __restrict__ sign, const double* __restrict__ a, int n) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < n) sign[k] = a[int64_t(k) * n + k] < 0 ? -1.0 : 1.0;
}

// q = a diag(sign), column-major n x n.
__global__ void columns_times_signs_kernel(double* __restrict__ q, const double* __restrict__ a,
                                           const double* __restrict__ sign, int n) {
  const int64_t count = int64_t(n) * n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x)
    q[e] = a[e] * sign[e / n];
}

// var[b, k] = sum_c qs[b](k, c) q[b](k, c): the diagonal of (Q S) Q^T, column-major.
__global__ void rotated_variances_kernel(double* __restrict__ var, const double* __restrict__ qs,
                                         const double* __restrict__ q, int n, int batch) {
  const int64_t total = int64_t(batch) * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / n, k = i - b * n;
    const double* qs_b = qs + b * n * n;
    const double* q_b = q + b * n * n;
    double sum = 0;
    for (int c = 0; c < n; ++c) sum += qs_b[k + int64_t(c) * n] * q_b[k + int64_t(c) * n];
    var[i] = sum;
  }
}

// r[d, a, b] /= sqrt(var_rows[a] var_cols[d, b]); 0 where that product is not positive.
__global__ void normalize_correlations_kernel(double* __restrict__ r, const double* __restrict__ var_rows,
                                              const double* __restrict__ var_cols, int64_t rows, int64_t cols,
                                              int batch) {
  const int64_t total = int64_t(batch) * rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i / (rows * cols), rest = i - d * rows * cols, a = rest / cols, b = rest - a * cols;
    const double denom = sqrt(var_rows[a] * var_cols[d * cols + b]);
    r[i] = denom > 0 ? r[i] / denom : 0.0;
  }
}

// out[d, a] = r[d, a, a mod cols] (index matching) or the largest r[d, a, c]; one warp
// per row.
__global__ void match_rows_kernel(double* __restrict__ out, const double* __restrict__ r, int64_t rows, int64_t cols,
                                  bool index, int batch) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t w = blockIdx.x * int64_t(blockDim.x / kWarpSize) + threadIdx.x / kWarpSize; w < batch * rows;
       w += warps) {
    const double* row = r + w * cols;
    if (index) {
      if (lane == 0) out[w] = row[w % rows % cols];
      continue;
    }
    double best = -INFINITY;
    for (int64_t c = lane; c < cols; c += kWarpSize) best = fmax(best, row[c]);
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
      best = fmax(best, __shfl_xor_sync(kFullMask, best, offset));
    if (lane == 0) out[w] = best;
  }
}

}  // namespace

int batched_qr_max_width() {
  int device = 0, optin = 0;
  UNIV_CUDA_CHECK(cudaGetDevice(&device));
  UNIV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int reserved = (kQrWarps + 1) * static_cast<int>(sizeof(double));  // scratch and scale
  return (optin - reserved) / static_cast<int>(3 * sizeof(double));
}

void gaussian_matrices(double* g, const uint64_t* streams, uint64_t seed, int n, int batch, cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(int64_t(n) * n, 256), 4096)), batch);
  gaussian_matrices_kernel<<<grid, 256, 0, stream>>>(g, streams, seed, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void haar_q_batched(double* q, double* g, int n, int batch, cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  const int max_width = batched_qr_max_width();
  if (n > max_width)
    throw std::invalid_argument("haar_q_batched: width " + std::to_string(n) + " exceeds " +
                                std::to_string(max_width));
  const size_t shared = 3 * sizeof(double) * n;
  if (shared > 48 * 1024)
    UNIV_CUDA_CHECK(
        cudaFuncSetAttribute(haar_q_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  haar_q_kernel<<<batch, kQrThreads, shared, stream>>>(g, q, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void diagonal_signs(double* sign, const double* a, int n, cudaStream_t stream) {
  if (n <= 0) return;
  diagonal_signs_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(sign, a, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void columns_times_signs(double* q, const double* a, const double* sign, int n, cudaStream_t stream) {
  if (n <= 0) return;
  columns_times_signs_kernel<<<blocks_for(int64_t(n) * n, 256), 256, 0, stream>>>(q, a, sign, n);
  UNIV_CUDA_CHECK_LAUNCH();
}

void rotated_variances(double* var, const double* qs, const double* q, int n, int batch, cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  rotated_variances_kernel<<<blocks_for(int64_t(batch) * n, 256), 256, 0, stream>>>(var, qs, q, n, batch);
  UNIV_CUDA_CHECK_LAUNCH();
}

void normalize_correlations(double* r, const double* var_rows, const double* var_cols, int64_t rows, int64_t cols,
                            int batch, cudaStream_t stream) {
  const int64_t total = int64_t(batch) * rows * cols;
  if (total <= 0) return;
  normalize_correlations_kernel<<<blocks_for(total, 256), 256, 0, stream>>>(r, var_rows, var_cols, rows, cols, batch);
  UNIV_CUDA_CHECK_LAUNCH();
}

void match_rows(double* out, const double* r, int64_t rows, int64_t cols, bool index, int batch,
                cudaStream_t stream) {
  const int64_t total = int64_t(batch) * rows;
  if (total <= 0) return;
  constexpr int threads = 256;
  match_rows_kernel<<<blocks_for(total * kWarpSize, threads), threads, 0, stream>>>(out, r, rows, cols, index, batch);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
