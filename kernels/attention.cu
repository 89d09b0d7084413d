// Causal multi-head attention, fused: one block per (model, sequence, head) keeps the
// head's q, k, v and its T x T scores in shared memory. The forward first adds the
// QKV bias to its head's slices of qkv (written back for the backward) and writes the
// softmax probabilities for the backward, which owns its head's slices of dqkv.
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

// One block fills an SM once T reaches 64 (its shared memory holds no second block),
// so long sequences take the most threads a block may have.
constexpr int kMaxThreads = 1024;
int threads_for(int T) { return T >= 64 ? kMaxThreads : 256; }

// Shared-memory layouts: rows read four at a time padded to multiples of 4 (hdp
// channels; transposed k and v rows of T positions padded to pad4(T) + 4 floats, so
// that a warp storing 4 positions x 8 channels into them hits 32 banks); the [T, T]
// matrices padded by one (T + 1), so that threads reading different rows at one
// column hit different banks.
__host__ __device__ constexpr int pad4(int n) { return (n + 3) / 4 * 4; }
__host__ __device__ constexpr int transposed_ld(int T) { return pad4(T) + 4; }
size_t forward_shared_floats(int T, int hd) {  // kT, v, q, s
  return size_t(hd) * transposed_ld(T) + size_t(T) * pad4(hd) + size_t(T) * (hd + 1) + size_t(T) * (T + 1);
}
size_t backward_shared_floats(int T, int hd) {  // q, k, dy, vT, a, d
  return 3 * size_t(T) * pad4(hd) + size_t(hd) * transposed_ld(T) + 2 * size_t(T) * (T + 1);
}

// out(r, c) for r < rows, c < cols: the sum over k in range(r0, c0) of a(r, k) b[k, c],
// each thread a tile of kRows x 4 (rows r0.., columns c0..), its b values read four at
// a time (b row-major, ld a multiple of 4, padded columns readable). Every element
// adds its terms in k order; store(r, c, value) takes each. The tiles' column groups
// run fastest across threads. The products of attention are all of this form.
template <int kRows, class A, class Range, class Store>
__device__ void tile_product(int rows, int cols, const A& a, const float* b, int ldb, const Range& range,
                             const Store& store) {
  const int col_groups = (cols + 3) / 4, tiles = (rows + kRows - 1) / kRows * col_groups;
  for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
    const int r0 = tile / col_groups * kRows, c0 = tile % col_groups * 4;
    const int2 k_range = range(r0, c0);
    float acc[kRows][4] = {};
    for (int k = k_range.x; k < k_range.y; ++k) {
      const float4 bk = *reinterpret_cast<const float4*>(b + k * ldb + c0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float ar = a(min(r0 + r, rows - 1), k);
        acc[r][0] += ar * bk.x;
        acc[r][1] += ar * bk.y;
        acc[r][2] += ar * bk.z;
        acc[r][3] += ar * bk.w;
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (r0 + r < rows && c0 + c < cols) store(r0 + r, c0 + c, acc[r][c]);
  }
}

// Tiles of four rows where a block has 1024 threads for T x T products, of one
// row below that (more tiles than threads, and short k loops).
int tile_rows_for(int T) { return T >= 64 ? 4 : 1; }

template <int kRows>
__global__ void __launch_bounds__(kMaxThreads) attention_forward_kernel(float* __restrict__ out, float* __restrict__ att,
                                         float* __restrict__ qkv, const float* __restrict__ qkv_bias, int B, int T,
                                         int C, int H, float scale) {
  extern __shared__ float4 shared4[];
  const int hd = C / H, hdp = pad4(hd), ldT = transposed_ld(T), Ts = T + 1, lq = hd + 1;
  const int64_t seq = blockIdx.x / H;
  const int h = blockIdx.x % H;
  float* kT = reinterpret_cast<float*>(shared4);  // [hd, ldT]: k transposed
  float* v = kT + hd * ldT;                       // [T, hdp]
  float* q = v + T * hdp;                         // [T, hd + 1]
  float* s = q + T * lq;                          // [T, Ts] scores, then probabilities
  float* base = qkv + seq * T * 3 * C + h * hd;
  const float* bias = qkv_bias ? qkv_bias + seq / B * 3 * C + h * hd : nullptr;  // model seq / B
  // Position t, channel i: 4 positions (fastest) x 8 channels per warp; positions past T
  // are kT's zero padding.
  for (int idx = threadIdx.x; idx < pad4(T) * hd; idx += blockDim.x) {
    const int t = idx / (4 * hd) * 4 + idx % 4, i = idx / 4 % hd;
    if (t >= T) {
      kT[i * ldT + t] = 0.0f;
      continue;
    }
    float* row = base + int64_t(t) * 3 * C;
    float qv = row[i], kv = row[C + i], vv = row[2 * C + i];
    if (bias) {
      qv += bias[i], kv += bias[C + i], vv += bias[2 * C + i];
      row[i] = qv, row[C + i] = kv, row[2 * C + i] = vv;
    }
    q[t * lq + i] = qv;
    kT[i * ldT + t] = kv;
    v[t * hdp + i] = vv;
  }
  for (int idx = threadIdx.x; idx < T * (hdp - hd); idx += blockDim.x)
    v[idx / (hdp - hd) * hdp + hd + idx % (hdp - hd)] = 0.0f;
  __syncthreads();
  // scores: tiles wholly above the diagonal are skipped (their zeros are overwritten below)
  tile_product<kRows>(
      T, T, [&](int t, int i) { return q[t * lq + i]; }, kT, ldT,
      [&](int r0, int c0) { return c0 > r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int t, int t2, float dot) { s[t * Ts + t2] = dot * scale; });
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int t = threadIdx.x / kWarpSize; t < T; t += warps) {  // softmax, a warp per row
    float* row = s + t * Ts;
    float max_score = -FLT_MAX;
    for (int t2 = lane; t2 <= t; t2 += kWarpSize) max_score = fmaxf(max_score, row[t2]);
    max_score = warp_max(max_score);
    float sum = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += kWarpSize) {
      row[t2] = expf(row[t2] - max_score);
      sum += row[t2];
    }
    const float inv = 1.0f / warp_sum(sum);
    for (int t2 = lane; t2 < T; t2 += kWarpSize) row[t2] = t2 <= t ? row[t2] * inv : 0.0f;
  }
  __syncthreads();
  float* a = att + int64_t(blockIdx.x) * T * T;  // [M,B,H,T,T]: block = seq * H + h
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) a[idx] = s[idx / T * Ts + idx % T];
  // out[t] = sum over t2 of p[t, t2] v[t2]: up to the tile's last row (zeros past each row's own)
  tile_product<kRows>(
      T, hd, [&](int t, int t2) { return s[t * Ts + t2]; }, v, hdp,
      [&](int r0, int) { return make_int2(0, min(T, r0 + kRows)); },
      [&](int t, int i, float acc) { out[(seq * T + t) * C + h * hd + i] = acc; });
}

template <int kRows>
__global__ void __launch_bounds__(kMaxThreads) attention_backward_kernel(float* __restrict__ dqkv, const float* __restrict__ dout,
                                          const float* __restrict__ qkv, const float* __restrict__ att, int T, int C,
                                          int H, float scale) {
  extern __shared__ float4 shared4[];
  const int hd = C / H, hdp = pad4(hd), ldT = transposed_ld(T), Ts = T + 1;
  const int64_t seq = blockIdx.x / H;
  const int h = blockIdx.x % H;
  float* q = reinterpret_cast<float*>(shared4);  // [T, hdp]
  float* k = q + T * hdp;                        // [T, hdp]
  float* dy = k + T * hdp;                       // [T, hdp]
  float* vT = dy + T * hdp;                      // [hd, ldT]: v transposed
  float* a = vT + hd * ldT;                      // [T, Ts] probabilities
  float* d = a + T * Ts;                         // [T, Ts] d(probabilities), then d(scores)
  const float* base = qkv + seq * T * 3 * C + h * hd;
  const float* dbase = dout + seq * T * C + h * hd;
  // Position t, channel i as in the forward; channels past hd are q's, k's and dy's
  // zero padding, positions past T vT's.
  for (int idx = threadIdx.x; idx < pad4(T) * hdp; idx += blockDim.x) {
    const int t = idx / (4 * hdp) * 4 + idx % 4, i = idx / 4 % hdp;
    if (t >= T) {
      if (i < hd) vT[i * ldT + t] = 0.0f;
      continue;
    }
    const bool in = i < hd;
    const float* row = base + int64_t(t) * 3 * C;
    q[t * hdp + i] = in ? row[i] : 0.0f;
    k[t * hdp + i] = in ? row[C + i] : 0.0f;
    dy[t * hdp + i] = in ? dbase[int64_t(t) * C + i] : 0.0f;
    if (in) vT[i * ldT + t] = row[2 * C + i];
  }
  const float* probs = att + int64_t(blockIdx.x) * T * T;
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) a[idx / T * Ts + idx % T] = probs[idx];
  __syncthreads();
  float* out = dqkv + seq * T * 3 * C + h * hd;
  // d(prob)[t, t2] = dy[t] . v[t2] on and below the diagonal, 0 above
  tile_product<kRows>(
      T, T, [&](int t, int i) { return dy[t * hdp + i]; }, vT, ldT,
      [&](int r0, int c0) { return c0 > r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int t, int t2, float dot) { d[t * Ts + t2] = t2 <= t ? dot : 0.0f; });
  // dv[t2] = sum over t >= t2 of a[t, t2] dy[t]: from the tile's first row (zeros before each row's own)
  tile_product<kRows>(
      T, hd, [&](int t2, int t) { return a[t * Ts + t2]; }, dy, hdp, [&](int r0, int) { return make_int2(r0, T); },
      [&](int t2, int i, float acc) { out[int64_t(t2) * 3 * C + 2 * C + i] = acc; });
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int t = threadIdx.x / kWarpSize; t < T; t += warps) {  // softmax backward, a warp per row
    float weighted = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += kWarpSize) weighted += a[t * Ts + t2] * d[t * Ts + t2];
    weighted = warp_sum(weighted);
    for (int t2 = lane; t2 <= t; t2 += kWarpSize) d[t * Ts + t2] = a[t * Ts + t2] * (d[t * Ts + t2] - weighted) * scale;
  }
  __syncthreads();
  // dq[t] = sum over t2 <= t of d[t, t2] k[t2]; dk[t] = sum over t1 >= t of d[t1, t] q[t1]
  tile_product<kRows>(
      T, hd, [&](int t, int t2) { return d[t * Ts + t2]; }, k, hdp,
      [&](int r0, int) { return make_int2(0, min(T, r0 + kRows)); },
      [&](int t, int i, float acc) { out[int64_t(t) * 3 * C + i] = acc; });
  tile_product<kRows>(
      T, hd, [&](int t, int t1) { return d[t1 * Ts + t]; }, q, hdp, [&](int r0, int) { return make_int2(r0, T); },
      [&](int t, int i, float acc) { out[int64_t(t) * 3 * C + C + i] = acc; });
}

// The shared memory one block may opt in to on this device (227 KiB on sm_90).
size_t shared_limit() {
  int device = 0, bytes = 0;
  UNIV_CUDA_CHECK(cudaGetDevice(&device));
  UNIV_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

float attention_scale(int hd) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))); }

}  // namespace

void prepare_attention_kernels() {
  const int bytes = static_cast<int>(shared_limit());
  for (const void* kernel : {reinterpret_cast<const void*>(attention_forward_kernel<1>),
                             reinterpret_cast<const void*>(attention_forward_kernel<4>),
                             reinterpret_cast<const void*>(attention_backward_kernel<1>),
                             reinterpret_cast<const void*>(attention_backward_kernel<4>)})
    UNIV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

int attention_max_seq_len(int head_dim) {
  const size_t limit = shared_limit();
  int T = 1;
  while (backward_shared_floats(T + 1, head_dim) * sizeof(float) <= limit) ++T;
  return T;
}

void attention_forward(float* out, float* att, float* qkv, const float* qkv_bias, int M, int B, int T, int C, int H,
                       cudaStream_t stream) {
  const int hd = C / H;
  const size_t shared = forward_shared_floats(T, hd) * sizeof(float);
  auto kernel = tile_rows_for(T) == 4 ? attention_forward_kernel<4> : attention_forward_kernel<1>;
  kernel<<<M * B * H, threads_for(T), shared, stream>>>(out, att, qkv, qkv_bias, B, T, C, H, attention_scale(hd));
  UNIV_CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, int M, int B, int T, int C,
                        int H, cudaStream_t stream) {
  const int hd = C / H;
  const size_t shared = backward_shared_floats(T, hd) * sizeof(float);
  auto kernel = tile_rows_for(T) == 4 ? attention_backward_kernel<4> : attention_backward_kernel<1>;
  kernel<<<M * B * H, threads_for(T), shared, stream>>>(dqkv, dout, qkv, att, T, C, H, attention_scale(hd));
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
