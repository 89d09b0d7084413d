// Causal multi-head attention with its products on the tensor cores (TF32 operands,
// float32 sums: --precision tf32), flash attention's way: a block per (model, sequence,
// head), a warp per 16 queries or keys, scores and their gradients in registers one
// tile of 16 x 8 at a time (common.cuh's mma_tf32), never a head's T x T scores in
// shared memory but in the backward's d(scores). The contract of attention.cu's kernels:
// the QKV bias added on load (qkv stays as it is), the probabilities written for the
// backward (float32, zero above the diagonal), dqkv overwritten. Heads of width a
// multiple of 8 up to 64, whose tiles fit a block's shared memory (attention_tf32_fits).
// Forward: a warp's first pass over its keys finds each query's largest score and sum
// of exponentials (online, as flash attention); the second forms the scores again,
// writes the probabilities and adds p v. Backward: a warp per 16 queries forms
// d(scores) = p (dy v^T - dy . out) scale tile by tile (dy . out: flash attention's
// identity for the sum over keys of p d(p)), adds dq = d(scores) k and leaves d(scores)
// in shared memory; then a warp per 16 keys adds dv = p^T dy and dk = d(scores)^T q.
// A warp's queries and its keys in the two phases balance: 2w + 2 key tiles, then T / 8
// - 2w query tiles.
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kRows = 16;        // queries or keys per warp: the mma's rows
constexpr int kMaxWarps = 16;    // T up to 256
constexpr int kMaxSteps = 8;     // head width up to 8 x 8
__host__ __device__ constexpr int padded(int T) { return (T + kRows - 1) / kRows * kRows; }

// Row strides of shared-memory matrices [rows, n] for the two ways a warp's fragment
// load reads them, each in 32 distinct banks: 8 rows at 4 consecutive columns
// (ld_eight_rows, 4 mod 8 floats: a b operand whose columns are the matrix's rows) or 4
// rows at 8 consecutive columns (ld_four_rows, 8 mod 16).
__host__ __device__ constexpr int ld_eight_rows(int n) { return (n + 3) / 8 * 8 + 4; }
__host__ __device__ constexpr int ld_four_rows(int n) { return (n + 7) / 16 * 16 + 8; }

// Shared memory in floats. Forward: k [Tp, ld_eight_rows(hd)], v [Tp,
// ld_four_rows(hd)]. Backward: dy [Tp, ld_four_rows(hd)], v [Tp, ld_eight_rows(hd)],
// d(scores) [Tp, ld_four_rows(Tp)].
size_t forward_floats(int T, int hd) { return size_t(padded(T)) * (ld_eight_rows(hd) + ld_four_rows(hd)); }
size_t backward_floats(int T, int hd) {
  return size_t(padded(T)) * (ld_four_rows(hd) + ld_eight_rows(hd) + ld_four_rows(padded(T)));
}

// What both kernels read: qkv [M,B,T,3C], the QKV bias [M,3C] or null, the shape.
struct Args {
  const float *qkv, *qkv_bias;
  int B, T, C, H;
  float scale;
};

// Head `head` (= seq * H + h) of qkv [M,B,T,3C]: value(part, t, i), channel i of row t
// of q, k or v (part 0, 1, 2) with the QKV bias, rounded to TF32; zero past T.
struct HeadView {
  const float *rows, *bias;
  int T, C;
  __device__ HeadView(const Args& p, int64_t head) : T(p.T), C(p.C) {
    const int64_t seq = head / p.H;
    const int offset = static_cast<int>(head % p.H) * (p.C / p.H);
    rows = p.qkv + seq * p.T * 3 * p.C + offset;
    bias = p.qkv_bias ? p.qkv_bias + seq / p.B * 3 * p.C + offset : nullptr;
  }
  __device__ float value(int part, int t, int i) const {
    if (t >= T) return 0.0f;
    const float x = __ldg(rows + int64_t(t) * 3 * C + part * C + i);
    return round_tf32(bias ? x + __ldg(bias + part * C + i) : x);
  }
};

// dst [Tp, ld] = value(t, i) for i < kHd (the block's threads; the width a constant, so
// that the indices take no division).
template <int kHd, class Value>
__device__ void stage(float* dst, int ld, int Tp, const Value& value) {
  copy_batched(
      Tp * kHd, [&](int idx) { return value(idx / kHd, idx % kHd); },
      [&](int idx, float v) { dst[idx / kHd * ld + idx % kHd] = v; });
}

// The fragment of a 16 x 8 * kSteps a operand whose row r (of the warp's 16, from
// row0) and column k is value(row0 + r, k): kSteps fragments of mma_tf32's a.
template <int kSteps, class Value>
__device__ void load_a(float (&a)[kSteps][4], int row0, const Value& value) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int s = 0; s < kSteps; ++s)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[s][e] = value(row0 + g + 8 * (e % 2), 8 * s + c + 4 * (e / 2));
}

// The row and column of accumulator element e (mma_tf32's d) within the warp's 16 x 8
// tile.
__device__ inline int acc_row(int e) { return threadIdx.x % kWarpSize / 4 + 8 * (e / 2); }
__device__ inline int acc_col(int e) { return 2 * (threadIdx.x % 4) + e % 2; }

// Rows row0 + acc_row(2 r) (r = 0, 1) of an accumulator d, each lane's two adjacent
// columns at once, into dst [., ld] from column col0, for rows below `rows` (ld and
// col0 even, dst 8-byte aligned: a float2 per row).
__device__ inline void store_rows(float* dst, int64_t ld, int row0, int rows, int col0, const float (&d)[4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (row0 + acc_row(2 * r) < rows)
      *reinterpret_cast<float2*>(dst + (row0 + acc_row(2 * r)) * ld + col0 + acc_col(2 * r)) =
          make_float2(d[2 * r], d[2 * r + 1]);
}

// s = the scores of the warp's queries q (a fragments) against keys [8 nt, 8 nt + 8)
// of k [Tp, ldk], unscaled.
template <int kSteps>
__device__ void score_tile(float (&s)[4], const float (&q)[kSteps][4], const float* k, int ldk, int nt) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  s[0] = s[1] = s[2] = s[3] = 0.0f;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const float* row = k + (8 * nt + g) * ldk + 8 * step + c;
    const float b[2] = {row[0], row[4]};
    mma_tf32(s, q[step], b);
  }
}

// (m, l) = the running max and sum of exponentials of a row's scores with x added.
__device__ inline void add_score(float& m, float& l, float x) {
  if (x > m) {
    l = l * expf(m - x) + 1.0f;  // m = -inf at first: l = 0
    m = x;
  } else {
    l += expf(x - m);
  }
}

template <int kSteps>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    attention_forward_tf32_kernel(const __grid_constant__ Args p, float* __restrict__ out, float* __restrict__ att) {
  extern __shared__ float4 shared4[];
  const int T = p.T, C = p.C, hd = C / p.H, Tp = padded(T), ldk = ld_eight_rows(hd), ldv = ld_four_rows(hd);
  const int64_t head = blockIdx.x, seq = head / p.H;
  const HeadView x(p, head);
  float* k = reinterpret_cast<float*>(shared4);  // [Tp, ldk]
  float* v = k + Tp * ldk;                       // [Tp, ldv]
  stage<8 * kSteps>(k, ldk, Tp, [&](int t, int i) { return x.value(1, t, i); });
  stage<8 * kSteps>(v, ldv, Tp, [&](int t, int i) { return x.value(2, t, i); });
  const int q0 = threadIdx.x / kWarpSize * kRows;
  float q[kSteps][4];
  load_a(q, q0, [&](int t, int i) { return x.value(0, t, i); });
  __syncthreads();
  const int tiles = ceil_div(min(q0 + kRows, T), 8);  // key tiles up to the warp's last query

  // Pass 1: each row's max and sum of exponentials, then over the 4 lanes of its group.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int nt = 0; nt < tiles; ++nt) {
    float s[4];
    score_tile(s, q, k, ldk, nt);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (8 * nt + acc_col(e) <= q0 + acc_row(e)) add_score(m[e / 2], l[e / 2], s[e] * p.scale);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
    for (int offset = 1; offset < 4; offset <<= 1) {
      const float m_other = __shfl_xor_sync(kFullMask, m[r], offset);
      const float l_other = __shfl_xor_sync(kFullMask, l[r], offset);
      const float top = fmaxf(m[r], m_other);
      l[r] = (m[r] == -INFINITY ? 0.0f : l[r] * expf(m[r] - top)) +
             (m_other == -INFINITY ? 0.0f : l_other * expf(m_other - top));
      m[r] = top;
    }
  const float inv[2] = {1.0f / l[0], 1.0f / l[1]};

  // Pass 2: the probabilities (zeros past each query, to the end of the row), out += p v.
  float o[kSteps][4] = {};
  att += head * T * T;
  for (int nt = 0; nt < ceil_div(T, 8); ++nt) {
    float s[4] = {};
    if (nt < tiles) {
      score_tile(s, q, k, ldk, nt);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = q0 + acc_row(e);
        s[e] = 8 * nt + acc_col(e) <= t ? expf(s[e] * p.scale - m[e / 2]) * inv[e / 2] : 0.0f;
      }
    }
    if (T % 2 == 0 && 8 * nt + acc_col(0) < T) {  // two keys at once (T even: aligned, both within T)
      store_rows(att, T, q0, T, 8 * nt, s);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = q0 + acc_row(e), t2 = 8 * nt + acc_col(e);
        if (t < T && t2 < T) att[int64_t(t) * T + t2] = s[e];
      }
    }
    if (nt >= tiles) continue;  // (the same for the whole warp)
    float a[4];
    accumulator_as_a(a, s);
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      const float b[2] = {v[(8 * nt + c) * ldv + 8 * n + g], v[(8 * nt + c + 4) * ldv + 8 * n + g]};
      mma_tf32(o[n], a, b);
    }
  }
  out += seq * T * C + head % p.H * hd;
#pragma unroll
  for (int n = 0; n < kSteps; ++n) store_rows(out, C, q0, T, 8 * n, o[n]);
}

template <int kSteps>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    attention_backward_tf32_kernel(const __grid_constant__ Args p, float* __restrict__ dqkv,
                                   const float* __restrict__ dout, const float* __restrict__ out,
                                   const float* __restrict__ att) {
  extern __shared__ float4 shared4[];
  const int T = p.T, C = p.C, hd = C / p.H, Tp = padded(T);
  const int lddy = ld_four_rows(hd), ldv = ld_eight_rows(hd), ldd = ld_four_rows(Tp);
  const int64_t head = blockIdx.x, seq = head / p.H;
  const int channel = static_cast<int>(head % p.H) * hd;  // the head's first
  const HeadView x(p, head);
  dout += seq * T * C + channel;
  out += seq * T * C + channel;
  att += head * T * T;
  dqkv += seq * T * 3 * C + channel;
  float* dy = reinterpret_cast<float*>(shared4);  // [Tp, lddy]
  float* v = dy + Tp * lddy;                      // [Tp, ldv]
  float* ds = v + Tp * ldv;                       // [Tp (query), ldd (key)]: d(scores)
  stage<8 * kSteps>(dy, lddy, Tp,
                    [&](int t, int i) { return t < T ? round_tf32(__ldg(dout + int64_t(t) * C + i)) : 0.0f; });
  stage<8 * kSteps>(v, ldv, Tp, [&](int t, int i) { return x.value(2, t, i); });
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4, w0 = threadIdx.x / kWarpSize * kRows;
  // dy . out of the lane's two queries (float32, from memory), over the 4 lanes of its group
  float dot[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = w0 + g + 8 * r;
    float sum = 0.0f;
    if (t < T)
#pragma unroll
      for (int i = c; i < 8 * kSteps; i += 4) sum += __ldg(dout + int64_t(t) * C + i) * __ldg(out + int64_t(t) * C + i);
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    dot[r] = sum + __shfl_xor_sync(kFullMask, sum, 2);
  }
  __syncthreads();

  // Phase 1, queries [w0, w0 + 16): d(scores) tile by tile into ds, dq = d(scores) k.
  // Each tile's operands from memory (its probabilities, k's rows as b fragments) are
  // loaded while the tile before is used: a tile's loads wait on memory once.
  struct QueryTile {
    float prob[4], k[kSteps][2];
  };
  auto load_query_tile = [&](QueryTile& tile, int nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // two keys at once where T is even (aligned, both within T)
      const int t = w0 + acc_row(2 * r), t2 = 8 * nt + acc_col(2 * r);
      const float* at = att + int64_t(t) * T + t2;
      const float2 pair = t >= T || t2 > t ? make_float2(0.0f, 0.0f)
                          : T % 2 == 0     ? __ldg(reinterpret_cast<const float2*>(at))
                                           : make_float2(__ldg(at), t2 + 1 <= t ? __ldg(at + 1) : 0.0f);
      tile.prob[2 * r] = pair.x;
      tile.prob[2 * r + 1] = t2 + 1 <= t ? pair.y : 0.0f;
    }
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      tile.k[n][0] = x.value(1, 8 * nt + c, 8 * n + g);
      tile.k[n][1] = x.value(1, 8 * nt + c + 4, 8 * n + g);
    }
  };
  float dya[kSteps][4];
  load_a(dya, w0, [&](int t, int i) { return dy[t * lddy + i]; });
  const int tiles = ceil_div(min(w0 + kRows, T), 8);
  float dq[kSteps][4] = {};
  QueryTile tile{}, next{};
  load_query_tile(tile, 0);
  for (int nt = 0; nt < Tp / 8; ++nt) {
    if (nt + 1 < tiles) load_query_tile(next, nt + 1);
    float d[4] = {};
    if (nt < tiles) {
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {  // d(p) = dy v^T
        const float* row = v + (8 * nt + g) * ldv + 8 * step + c;
        const float b[2] = {row[0], row[4]};
        mma_tf32(d, dya[step], b);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) d[e] = tile.prob[e] * (d[e] - dot[e / 2]) * p.scale;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)  // zeros past the warp's keys: phase 2 reads them
      *reinterpret_cast<float2*>(ds + (w0 + g + 8 * r) * ldd + 8 * nt + 2 * c) = make_float2(d[2 * r], d[2 * r + 1]);
    if (nt >= tiles) continue;  // (the same for the whole warp)
    float a[4];
    accumulator_as_a(a, d);
#pragma unroll
    for (int n = 0; n < kSteps; ++n) mma_tf32(dq[n], a, tile.k[n]);
    tile = next;
  }
  auto store = [&](int part, const float (&acc)[kSteps][4]) {  // rows w0.. of dq, dk or dv
#pragma unroll
    for (int n = 0; n < kSteps; ++n) store_rows(dqkv, 3 * C, w0, T, part * C + 8 * n, acc[n]);
  };
  store(0, dq);
  __syncthreads();

  // Phase 2, keys [w0, w0 + 16): dv = p^T dy and dk = d(scores)^T q over the queries
  // from w0 on (p and d(scores) are zero above the diagonal); each query tile's
  // probabilities (as an a fragment, a(key row, query column) = p(query, key)) and q's
  // rows (b fragments) loaded while the tile before is used.
  struct KeyTile {
    float p[4], q[kSteps][2];
  };
  auto load_key_tile = [&](KeyTile& tile, int qt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t2 = w0 + g + 8 * (e % 2), t = 8 * qt + c + 4 * (e / 2);
      tile.p[e] = t < T && t2 < T ? round_tf32(__ldg(att + int64_t(t) * T + t2)) : 0.0f;
    }
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      tile.q[n][0] = x.value(0, 8 * qt + c, 8 * n + g);
      tile.q[n][1] = x.value(0, 8 * qt + c + 4, 8 * n + g);
    }
  };
  float dv[kSteps][4] = {}, dk[kSteps][4] = {};
  KeyTile key_tile{}, key_next{};
  load_key_tile(key_tile, w0 / 8);
  for (int qt = w0 / 8; qt < Tp / 8; ++qt) {
    if (qt + 1 < Tp / 8) load_key_tile(key_next, qt + 1);
    float a_ds[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      a_ds[e] = round_tf32(ds[(8 * qt + c + 4 * (e / 2)) * ldd + w0 + g + 8 * (e % 2)]);
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      const float b_dy[2] = {dy[(8 * qt + c) * lddy + 8 * n + g], dy[(8 * qt + c + 4) * lddy + 8 * n + g]};
      mma_tf32(dv[n], key_tile.p, b_dy);
      mma_tf32(dk[n], a_ds, key_tile.q[n]);
    }
    key_tile = key_next;
  }
  store(1, dk);
  store(2, dv);
}

// The kernels for head widths 8, 16, ..., 8 kMaxSteps.
using ForwardKernel = void (*)(Args, float*, float*);
using BackwardKernel = void (*)(Args, float*, const float*, const float*, const float*);
ForwardKernel forward_kernel(int hd) {
  static const ForwardKernel kernels[kMaxSteps] = {
      attention_forward_tf32_kernel<1>, attention_forward_tf32_kernel<2>, attention_forward_tf32_kernel<3>,
      attention_forward_tf32_kernel<4>, attention_forward_tf32_kernel<5>, attention_forward_tf32_kernel<6>,
      attention_forward_tf32_kernel<7>, attention_forward_tf32_kernel<8>};
  return kernels[hd / 8 - 1];
}
BackwardKernel backward_kernel(int hd) {
  static const BackwardKernel kernels[kMaxSteps] = {
      attention_backward_tf32_kernel<1>, attention_backward_tf32_kernel<2>, attention_backward_tf32_kernel<3>,
      attention_backward_tf32_kernel<4>, attention_backward_tf32_kernel<5>, attention_backward_tf32_kernel<6>,
      attention_backward_tf32_kernel<7>, attention_backward_tf32_kernel<8>};
  return kernels[hd / 8 - 1];
}

}  // namespace

bool attention_tf32_fits(int T, int C, int H, bool backward) {
  if (T < 1 || C % H != 0 || padded(T) / kRows > kMaxWarps) return false;
  const int hd = C / H;
  if (hd % 8 != 0 || hd / 8 > kMaxSteps) return false;
  const size_t floats = backward ? backward_floats(T, hd) : forward_floats(T, hd);
  return floats * sizeof(float) <= shared_memory_optin_limit();
}

void prepare_attention_tf32_kernels() {
  const int bytes = static_cast<int>(shared_memory_optin_limit());
  for (int hd = 8; hd <= 8 * kMaxSteps; hd += 8) {
    UNIV_CUDA_CHECK(cudaFuncSetAttribute(forward_kernel(hd), cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    UNIV_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel(hd), cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

void attention_forward_tf32(float* out, float* att, const float* qkv, const float* qkv_bias, int M, int B, int T,
                            int C, int H, cudaStream_t stream) {
  const Args p{qkv, qkv_bias, B, T, C, H, attention_scale(C / H)};
  const ForwardKernel forward_tf32 = forward_kernel(C / H);
  forward_tf32<<<M * B * H, padded(T) / kRows * kWarpSize, forward_floats(T, C / H) * sizeof(float), stream>>>(
      p, out, att);
  UNIV_CUDA_CHECK_LAUNCH();
}

void attention_backward_tf32(float* dqkv, const float* dout, const float* out, const float* qkv,
                             const float* qkv_bias, const float* att, int M, int B, int T, int C, int H,
                             cudaStream_t stream) {
  const Args p{qkv, qkv_bias, B, T, C, H, attention_scale(C / H)};
  const BackwardKernel backward_tf32 = backward_kernel(C / H);
  backward_tf32<<<M * B * H, padded(T) / kRows * kWarpSize, backward_floats(T, C / H) * sizeof(float), stream>>>(
      p, dqkv, dout, out, att);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
