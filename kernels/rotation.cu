// The rotation baseline on the GPU: Haar-random orthogonal matrices (Gaussian entries
// from cuRAND's Philox4_32_10, a blocked Householder QR per matrix in one thread
// block, or the sign fix around cuSOLVER's QR for wide ones, Q's columns times
// sign(diag R), Mezzadri 2007), the rotated variances diag(Q S Q^T), and correlation
// matrices normalised and matched row by row. The Gaussians use the counters of
// univ::PhiloxStream, so the host's rotation_matrices draws the same matrices.
#include <curand_kernel.h>

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

// A block per matrix. The QR goes by panels of kQrPanel columns: each panel factors in
// shared memory, then updates the rest of the matrix (in global memory, mostly L2) in
// one pass as a block reflector I - V T V^T, where a column-at-a-time QR passes over it
// once per column; the pass bounds the time (one SM's share of L2 bandwidth).
constexpr int kQrThreads = 512;  // registers for a panel's kQrPanel sums per thread
constexpr int kQrWarps = kQrThreads / kWarpSize;
constexpr int kQrPanel = 16;
constexpr int kQrPanelStride = kQrPanel + 1;  // rows of the shared panel: padded against bank conflicts

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

// The shared panel holds rows [k0, n) of kQrPanel columns, row i at i * kQrPanelStride;
// columns past the matrix's last are zero.
__device__ inline double& panel_at(double* panel, int i, int p) { return panel[i * kQrPanelStride + p]; }

// panel <- m[k0:n, k0:k0 + width] (zero beyond width).
__device__ void load_panel(double* panel, const double* m, int k0, int width, int n) {
  const int rows = n - k0;
  for (int e = threadIdx.x; e < rows * kQrPanel; e += kQrThreads) {
    const int p = e / rows, i = k0 + e % rows;
    panel_at(panel, i, p) = p < width ? m[int64_t(k0 + p) * n + i] : 0.0;
  }
  __syncthreads();
}

// Householder QR of the panel's width columns in shared memory, as LAPACK's dgeqr2:
// R on and above the diagonal, the reflectors v (v[k] = 1 implicit) below it, tau[k]
// and sign[k] = sign(R_kk) for the matrix's columns k = k0 + p.
__device__ void factor_panel(double* panel, double* tau, double* sign, int k0, int width, int n,
                             double* scratch /* [kQrWarps] */) {
  __shared__ double scale;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  for (int p = 0; p < width; ++p) {
    const int k = k0 + p;
    double below = 0;
    for (int i = k + 1 + tid; i < n; i += kQrThreads) below += panel_at(panel, i, p) * panel_at(panel, i, p);
    below = block_sum(below, scratch);
    if (tid == 0) {
      const double alpha = panel_at(panel, k, p);
      if (below == 0) {  // nothing to annihilate: H_k = I, R_kk = alpha
        tau[k] = 0;
        scale = 0;
        sign[k] = alpha < 0 ? -1 : 1;
      } else {
        const double norm = sqrt(alpha * alpha + below);
        const double beta = alpha >= 0 ? -norm : norm;
        tau[k] = (beta - alpha) / beta;
        scale = 1 / (alpha - beta);
        panel_at(panel, k, p) = beta;
        sign[k] = beta < 0 ? -1 : 1;
      }
    }
    __syncthreads();
    for (int i = k + 1 + tid; i < n; i += kQrThreads) panel_at(panel, i, p) *= scale;
    __syncthreads();
    // The panel's later columns x -= tau v (v^T x), one warp per column.
    const double t = tau[k];
    for (int q = p + 1 + warp; t != 0 && q < width; q += kQrWarps) {
      double w = lane == 0 ? panel_at(panel, k, q) : 0.0;
      for (int i = k + 1 + lane; i < n; i += kWarpSize) w += panel_at(panel, i, p) * panel_at(panel, i, q);
      w = warp_sum(w) * t;
      if (lane == 0) panel_at(panel, k, q) -= w;
      for (int i = k + 1 + lane; i < n; i += kWarpSize) panel_at(panel, i, q) -= panel_at(panel, i, p) * w;
    }
    __syncthreads();
  }
}

// The panel's reflectors as explicit columns V: zero above the diagonal, 1 on it.
__device__ void explicit_reflectors(double* panel, int k0, int width, int n) {
  for (int e = threadIdx.x; e < kQrPanel * kQrPanel; e += kQrThreads) {
    const int p = e / kQrPanel, i = k0 + e % kQrPanel;
    if (p < width && i < n && i <= k0 + p) panel_at(panel, i, p) = i == k0 + p ? 1.0 : 0.0;
  }
  __syncthreads();
}

// t: the upper triangular T with H_k0 ... H_k0+width-1 = I - V T V^T (LAPACK's dlarft,
// forward, columnwise); zero beyond width.
__device__ void block_reflector_t(double (*t)[kQrPanel], const double* panel, const double* tau, int k0, int width,
                                  int n) {
  __shared__ double dots[kQrPanel][kQrPanel];  // dots[r][p] = v_r . v_p, r < p
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int pair = warp; pair < kQrPanel * kQrPanel; pair += kQrWarps) {
    const int r = pair / kQrPanel, p = pair % kQrPanel;
    if (r >= p || p >= width) continue;
    double sum = 0;  // v_p is zero above row k0 + p
    for (int i = k0 + p + lane; i < n; i += kWarpSize)
      sum += panel[i * kQrPanelStride + r] * panel[i * kQrPanelStride + p];
    sum = warp_sum(sum);
    if (lane == 0) dots[r][p] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int p = 0; p < kQrPanel; ++p) {
      for (int q = 0; q < kQrPanel; ++q) t[q][p] = 0;
      if (p >= width) continue;
      t[p][p] = tau[p];
      for (int q = 0; q < p; ++q) {  // T[0:p, p] = -tau_p T[0:p, 0:p] (V[:, 0:p]^T v_p)
        double sum = 0;
        for (int r = q; r < p; ++r) sum += t[q][r] * dots[r][p];
        t[q][p] = -tau[p] * sum;
      }
    }
  __syncthreads();
}

// m[k0:n, j] for the columns j in [first, n), one warp per column: w = V^T m_j, then
// w = T^T w (applying H_k0+width-1 ... H_k0, the factorization) or w = T w (applying
// H_k0 ... H_k0+width-1, forming Q), then m_j -= V w.
template <bool kTransposed>
__device__ void apply_block_reflector(double* m, const double* panel, const double (*t)[kQrPanel], int k0, int first,
                                      int n) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int j = first + warp; j < n; j += kQrWarps) {
    double* x = m + int64_t(j) * n;
    double w[kQrPanel];
#pragma unroll
    for (int p = 0; p < kQrPanel; ++p) w[p] = 0;
    for (int i = k0 + lane; i < n; i += kWarpSize) {
      const double xi = x[i];
      const double* v = panel + i * kQrPanelStride;
#pragma unroll
      for (int p = 0; p < kQrPanel; ++p) w[p] += v[p] * xi;
    }
#pragma unroll
    for (int p = 0; p < kQrPanel; ++p) w[p] = warp_sum(w[p]);
    if (kTransposed) {
#pragma unroll
      for (int p = kQrPanel - 1; p >= 0; --p) {  // w[p] = sum_{q <= p} t[q][p] w[q]; w[q < p] still unchanged
        double sum = 0;
#pragma unroll
        for (int q = 0; q <= p; ++q) sum += t[q][p] * w[q];
        w[p] = sum;
      }
    } else {
#pragma unroll
      for (int p = 0; p < kQrPanel; ++p) {  // w[p] = sum_{q >= p} t[p][q] w[q]; w[q > p] still unchanged
        double sum = 0;
#pragma unroll
        for (int q = p; q < kQrPanel; ++q) sum += t[p][q] * w[q];
        w[p] = sum;
      }
    }
    for (int i = k0 + lane; i < n; i += kWarpSize) {
      const double* v = panel + i * kQrPanelStride;
      double sum = 0;
#pragma unroll
      for (int p = 0; p < kQrPanel; ++p) sum += v[p] * w[p];
      x[i] -= sum;
    }
  }
  __syncthreads();
}

// One block per n x n column-major matrix. a: on entry the Gaussian matrix, on return
// R above the diagonal and the Householder vectors below it (LAPACK's reflectors:
// beta = -sign(alpha) |x|). q: Q diag(sign(diag R)), formed backwards from the
// identity panel by panel, as dorgqr does.
__global__ void __launch_bounds__(kQrThreads) haar_q_kernel(double* __restrict__ a_all, double* __restrict__ q_all,
                                                            int n) {
  extern __shared__ double shared[];
  double* panel = shared;                   // [n, kQrPanelStride]
  double* tau = panel + n * kQrPanelStride;  // [n]
  double* sign = tau + n;                    // [n] sign of R's diagonal
  __shared__ double t[kQrPanel][kQrPanel];
  __shared__ double scratch[kQrWarps];
  const int64_t count = int64_t(n) * n;
  double* a = a_all + blockIdx.x * count;
  double* q = q_all + blockIdx.x * count;

  for (int k0 = 0; k0 < n; k0 += kQrPanel) {
    const int width = min(kQrPanel, n - k0);
    load_panel(panel, a, k0, width, n);
    factor_panel(panel, tau, sign, k0, width, n, scratch);
    for (int e = threadIdx.x; e < (n - k0) * width; e += kQrThreads) {  // R's rows and the reflectors back
      const int p = e / (n - k0), i = k0 + e % (n - k0);
      a[int64_t(k0 + p) * n + i] = panel_at(panel, i, p);
    }
    __syncthreads();
    explicit_reflectors(panel, k0, width, n);
    block_reflector_t(t, panel, tau + k0, k0, width, n);
    apply_block_reflector<true>(a, panel, t, k0, k0 + width, n);
  }

  for (int64_t e = threadIdx.x; e < count; e += kQrThreads) q[e] = e % (n + 1) == 0 ? 1.0 : 0.0;
  __syncthreads();
  // q = (I - V T V^T) q for the panels from the last to the first; columns j < k0 of q
  // are still e_j there, which the panel's reflectors keep.
  for (int k0 = (n - 1) / kQrPanel * kQrPanel; k0 >= 0; k0 -= kQrPanel) {
    const int width = min(kQrPanel, n - k0);
    load_panel(panel, a, k0, width, n);
    explicit_reflectors(panel, k0, width, n);
    block_reflector_t(t, panel, tau + k0, k0, width, n);
    apply_block_reflector<false>(q, panel, t, k0, k0, n);
  }
  for (int64_t e = threadIdx.x; e < count; e += kQrThreads) q[e] *= sign[e / n];
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
  // Static: t, the panel's dot products, scratch and scale; per row: the panel, tau, sign.
  const int reserved = (2 * kQrPanel * kQrPanel + kQrWarps + 1) * static_cast<int>(sizeof(double));
  return (optin - reserved) / static_cast<int>((kQrPanelStride + 2) * sizeof(double));
}

void gaussian_matrices(double* g, const uint64_t* streams, uint64_t seed, int n, int batch, cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  constexpr int kMaxGridY = 65535;  // matrices per launch
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(int64_t(n) * n, 256), 4096));
  for (int first = 0; first < batch; first += kMaxGridY) {
    const dim3 grid(blocks, std::min(kMaxGridY, batch - first));
    gaussian_matrices_kernel<<<grid, 256, 0, stream>>>(g + int64_t(first) * n * n, streams + first, seed, n);
    UNIV_CUDA_CHECK_LAUNCH();
  }
}

void haar_q_batched(double* q, double* g, int n, int batch, cudaStream_t stream) {
  if (n <= 0 || batch <= 0) return;
  const int max_width = batched_qr_max_width();
  if (n > max_width)
    throw std::invalid_argument("haar_q_batched: width " + std::to_string(n) + " exceeds " +
                                std::to_string(max_width));
  const size_t shared = (kQrPanelStride + 2) * sizeof(double) * n;
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
