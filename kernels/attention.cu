// Causal multi-head attention, fused: one block per (model, sequence, head) keeps the
// head's q, k, v and its T x T scores in shared memory. The forward first adds the
// QKV bias to its head's slices of qkv (written back for the backward) and writes the
// softmax probabilities for the backward, which owns its head's slices of dqkv.
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

// One block fills an SM once T reaches 64 (its shared memory holds no second block),
// so long sequences take the most threads a block may have.
constexpr int kMaxThreads = 1024;
int threads_for(int T) { return T >= 64 ? kMaxThreads : 256; }

// Shared-memory layouts: rows padded as common.cuh's pad4 and transposed_ld say; the
// [T, T] matrices padded by one (T + 1), so that threads reading different rows at one
// column hit different banks.
size_t forward_shared_floats(int T, int hd) {  // kT, v, q, s
  return size_t(hd) * transposed_ld(T) + size_t(T) * pad4(hd) + size_t(T) * (hd + 1) + size_t(T) * (T + 1);
}
size_t backward_shared_floats(int T, int hd) {  // q, k, dy, vT, a, d
  return 3 * size_t(T) * pad4(hd) + size_t(hd) * transposed_ld(T) + 2 * size_t(T) * (T + 1);
}

// Tiles of four rows where a block has 1024 threads for T x T products, of one
// row below that (more tiles than threads, and short k loops).
int tile_rows_for(int T) { return T >= 64 ? 4 : 1; }

// Lanes per tile of the T x head-width products (sums over up to T keys or queries):
// they have few tiles for the block's threads.
template <int kRows>
__device__ int head_product_lanes(int T, int hd) {
  return lanes_per_tile(ceil_div(T, kRows) * ceil_div(hd, 4), blockDim.x, T);
}

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
      1, T, T, [&](int, int t, int i) { return q[t * lq + i]; }, [&](int) { return kT; }, ldT,
      [&](int, int r0, int c0) { return c0 > r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int, int t, int t2, float dot) { s[t * Ts + t2] = dot * scale; });
  __syncthreads();
  for (int t = threadIdx.x / kWarpSize; t < T; t += blockDim.x / kWarpSize)  // a warp per row
    causal_softmax_lanes(s + t * Ts, 1, t, T);
  __syncthreads();
  float* a = att + int64_t(blockIdx.x) * T * T;  // [M,B,H,T,T]: block = seq * H + h
  const int lanes = head_product_lanes<kRows>(T, hd);
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) a[idx] = s[idx / T * Ts + idx % T];
  // out[t] = sum over t2 of p[t, t2] v[t2]: up to the tile's last row (zeros past each row's own)
  tile_product<kRows>(
      1, T, hd, [&](int, int t, int t2) { return s[t * Ts + t2]; }, [&](int) { return v; }, hdp,
      [&](int, int r0, int) { return make_int2(0, min(T, r0 + kRows)); },
      [&](int, int t, int i, float acc) { out[(seq * T + t) * C + h * hd + i] = acc; }, lanes);
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
  const int lanes = head_product_lanes<kRows>(T, hd);
  // d(prob)[t, t2] = dy[t] . v[t2] on and below the diagonal, 0 above
  tile_product<kRows>(
      1, T, T, [&](int, int t, int i) { return dy[t * hdp + i]; }, [&](int) { return vT; }, ldT,
      [&](int, int r0, int c0) { return c0 > r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int, int t, int t2, float dot) { d[t * Ts + t2] = t2 <= t ? dot : 0.0f; });
  // dv[t2] = sum over t >= t2 of a[t, t2] dy[t]: from the tile's first row (zeros before each row's own)
  tile_product<kRows>(
      1, T, hd, [&](int, int t2, int t) { return a[t * Ts + t2]; }, [&](int) { return dy; }, hdp,
      [&](int, int r0, int) { return make_int2(r0, T); },
      [&](int, int t2, int i, float acc) { out[int64_t(t2) * 3 * C + 2 * C + i] = acc; }, lanes);
  __syncthreads();
  for (int t = threadIdx.x / kWarpSize; t < T; t += blockDim.x / kWarpSize)  // a warp per row
    causal_softmax_backward_lanes(a + t * Ts, 1, d + t * Ts, 1, t, T, scale);
  __syncthreads();
  // dq[t] = sum over t2 <= t of d[t, t2] k[t2]; dk[t] = sum over t1 >= t of d[t1, t] q[t1]
  tile_product<kRows>(
      1, T, hd, [&](int, int t, int t2) { return d[t * Ts + t2]; }, [&](int) { return k; }, hdp,
      [&](int, int r0, int) { return make_int2(0, min(T, r0 + kRows)); },
      [&](int, int t, int i, float acc) { out[int64_t(t) * 3 * C + i] = acc; }, lanes);
  tile_product<kRows>(
      1, T, hd, [&](int, int t, int t1) { return d[t1 * Ts + t]; }, [&](int) { return q; }, hdp,
      [&](int, int r0, int) { return make_int2(r0, T); },
      [&](int, int t, int i, float acc) { out[int64_t(t) * 3 * C + C + i] = acc; }, lanes);
}

}  // namespace

float attention_scale(int hd) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))); }

void prepare_attention_kernels() {
  const int bytes = static_cast<int>(shared_memory_optin_limit());
  for (const void* kernel : {reinterpret_cast<const void*>(attention_forward_kernel<1>),
                             reinterpret_cast<const void*>(attention_forward_kernel<4>),
                             reinterpret_cast<const void*>(attention_backward_kernel<1>),
                             reinterpret_cast<const void*>(attention_backward_kernel<4>)})
    UNIV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

int attention_max_seq_len(int head_dim) {
  const size_t limit = shared_memory_optin_limit();
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
