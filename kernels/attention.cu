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
// so long sequences take the most threads a block may have: the score and output
// loops are latency-bound chains over shared memory, and more warps hide more of it.
constexpr int kMaxThreads = 1024;
int threads_for(int T) { return T >= 64 ? kMaxThreads : 256; }

// k and v rows are padded by one float: threads reading different rows at the same
// column then hit different banks.
size_t forward_shared_floats(int T, int hd) { return size_t(T) * hd * 2 + size_t(T) * (hd + 1) + size_t(T) * T; }
size_t backward_shared_floats(int T, int hd) { return size_t(T) * hd * 2 + size_t(T) * (hd + 1) * 2 + size_t(T) * T * 2; }

__global__ void __launch_bounds__(kMaxThreads) attention_forward_kernel(float* __restrict__ out, float* __restrict__ att,
                                         float* __restrict__ qkv, const float* __restrict__ qkv_bias, int B, int T,
                                         int C, int H, float scale) {
  extern __shared__ float shared[];
  const int hd = C / H;
  const int64_t seq = blockIdx.x / H;
  const int h = blockIdx.x % H;
  float* q = shared;               // [T, hd]
  float* k = q + T * hd;           // [T, hd + 1]
  float* v = k + T * (hd + 1);     // [T, hd]
  float* s = v + T * hd;           // [T, T]
  float* base = qkv + seq * T * 3 * C + h * hd;
  const float* bias = qkv_bias ? qkv_bias + seq / B * 3 * C + h * hd : nullptr;  // model seq / B
  for (int idx = threadIdx.x; idx < T * hd; idx += blockDim.x) {
    const int t = idx / hd, i = idx % hd;
    float* row = base + int64_t(t) * 3 * C;
    float qv = row[i], kv = row[C + i], vv = row[2 * C + i];
    if (bias) {
      qv += bias[i], kv += bias[C + i], vv += bias[2 * C + i];
      row[i] = qv, row[C + i] = kv, row[2 * C + i] = vv;
    }
    q[t * hd + i] = qv;
    k[t * (hd + 1) + i] = kv;
    v[t * hd + i] = vv;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) {
    const int t = idx / T, t2 = idx % T;
    if (t2 > t) continue;
    float dot = 0.0f;
    for (int i = 0; i < hd; ++i) dot += q[t * hd + i] * k[t2 * (hd + 1) + i];
    s[idx] = dot * scale;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int t = threadIdx.x / kWarpSize; t < T; t += warps) {  // softmax, a warp per row
    float* row = s + t * T;
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
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) a[idx] = s[idx];
  for (int idx = threadIdx.x; idx < T * hd; idx += blockDim.x) {
    const int t = idx / hd, i = idx % hd;
    float acc = 0.0f;
    for (int t2 = 0; t2 <= t; ++t2) acc += s[t * T + t2] * v[t2 * hd + i];
    out[(seq * T + t) * C + h * hd + i] = acc;
  }
}

__global__ void __launch_bounds__(kMaxThreads) attention_backward_kernel(float* __restrict__ dqkv, const float* __restrict__ dout,
                                          const float* __restrict__ qkv, const float* __restrict__ att, int T, int C,
                                          int H, float scale) {
  extern __shared__ float shared[];
  const int hd = C / H;
  const int64_t seq = blockIdx.x / H;
  const int h = blockIdx.x % H;
  float* q = shared;               // [T, hd]
  float* dy = q + T * hd;          // [T, hd]
  float* k = dy + T * hd;          // [T, hd + 1]
  float* v = k + T * (hd + 1);     // [T, hd + 1]
  float* a = v + T * (hd + 1);     // [T, T] probabilities
  float* d = a + T * T;            // [T, T] d(probabilities), then d(scores)
  const float* base = qkv + seq * T * 3 * C + h * hd;
  const float* dbase = dout + seq * T * C + h * hd;
  for (int idx = threadIdx.x; idx < T * hd; idx += blockDim.x) {
    const int t = idx / hd, i = idx % hd;
    q[t * hd + i] = base[int64_t(t) * 3 * C + i];
    k[t * (hd + 1) + i] = base[int64_t(t) * 3 * C + C + i];
    v[t * (hd + 1) + i] = base[int64_t(t) * 3 * C + 2 * C + i];
    dy[t * hd + i] = dbase[int64_t(t) * C + i];
  }
  const float* probs = att + int64_t(blockIdx.x) * T * T;
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) a[idx] = probs[idx];
  __syncthreads();
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) {  // d(prob)[t, t2] = dy[t] . v[t2]
    const int t = idx / T, t2 = idx % T;
    float dot = 0.0f;
    if (t2 <= t)
      for (int i = 0; i < hd; ++i) dot += dy[t * hd + i] * v[t2 * (hd + 1) + i];
    d[idx] = dot;
  }
  __syncthreads();
  float* out = dqkv + seq * T * 3 * C + h * hd;
  for (int idx = threadIdx.x; idx < T * hd; idx += blockDim.x) {  // dv[t2] = sum over t >= t2 of a[t, t2] dy[t]
    const int t2 = idx / hd, i = idx % hd;
    float acc = 0.0f;
    for (int t = t2; t < T; ++t) acc += a[t * T + t2] * dy[t * hd + i];
    out[int64_t(t2) * 3 * C + 2 * C + i] = acc;
  }
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int t = threadIdx.x / kWarpSize; t < T; t += warps) {  // softmax backward, a warp per row
    float weighted = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += kWarpSize) weighted += a[t * T + t2] * d[t * T + t2];
    weighted = warp_sum(weighted);
    for (int t2 = lane; t2 <= t; t2 += kWarpSize) d[t * T + t2] = a[t * T + t2] * (d[t * T + t2] - weighted) * scale;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < T * hd; idx += blockDim.x) {
    const int t = idx / hd, i = idx % hd;
    float dq = 0.0f, dk = 0.0f;
    for (int t2 = 0; t2 <= t; ++t2) dq += d[t * T + t2] * k[t2 * (hd + 1) + i];  // dq[t] = sum over t2 <= t
    for (int t1 = t; t1 < T; ++t1) dk += d[t1 * T + t] * q[t1 * hd + i];          // dk[t] = sum over t1 >= t
    out[int64_t(t) * 3 * C + i] = dq;
    out[int64_t(t) * 3 * C + C + i] = dk;
  }
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
  UNIV_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  UNIV_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
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
  attention_forward_kernel<<<M * B * H, threads_for(T), shared, stream>>>(out, att, qkv, qkv_bias, B, T, C, H,
                                                                          attention_scale(hd));
  UNIV_CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, int M, int B, int T, int C,
                        int H, cudaStream_t stream) {
  const int hd = C / H;
  const size_t shared = backward_shared_floats(T, hd) * sizeof(float);
  attention_backward_kernel<<<M * B * H, threads_for(T), shared, stream>>>(dqkv, dout, qkv, att, T, C, H,
                                                                    attention_scale(hd));
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
