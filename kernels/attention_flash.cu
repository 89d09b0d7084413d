// Causal multi-head attention flash attention's way: a block per (model, sequence,
// head), a warp per 16 queries or keys, scores and their gradients in registers one
// tile of 16 x 8 at a time, never a head's T x T scores in shared memory but in the
// backward's d(scores). A tile's products run on the tensor cores (TF32 operands,
// float32 sums: --precision tf32; common.cuh's mma_tf32) or in float32, each lane
// forming the four elements mma_tf32's layout gives it. The contract of attention.cu's
// kernels: the QKV bias added on load (qkv stays as it is), the probabilities written
// for the backward (float32, zero above the diagonal), dqkv overwritten; or in TF32
// each query's log-sum-exp in their place, from which the backward forms them again.
// Heads of width a multiple of 8 up to 64 (float32: 32), whose tiles fit a block's
// shared memory (attention_flash_fits). Forward: a warp's first pass over its keys
// finds each query's largest score and sum of exponentials (online, as flash
// attention); the second forms the scores again, writes the probabilities and adds p
// v. Without the probabilities, one pass does both, rescaling its sums as the largest
// score grows. Backward: a warp per 16 queries forms d(scores) = p (dy v^T - dy . out)
// scale tile by tile (dy . out: flash attention's identity for the sum over keys of p
// d(p)), adds dq = d(scores) k and leaves d(scores) in shared memory; then a warp per
// 16 keys adds dv = p^T dy and dk = d(scores)^T q. A warp's queries and its keys in the
// two phases balance: 2w + 2 key tiles, then T / 8 - 2w query tiles.
#include <cmath>
#include <stdexcept>
#include <utility>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kRows = 16;        // queries or keys per warp: the mma's rows
constexpr int kMaxWarps = 16;    // T up to 256
constexpr int kMaxSteps = 8;     // head width up to 8 x 8 ...
constexpr int kMaxFloatSteps = 4;  // ... in float32 up to 8 x 4 (a lane holds two query rows whole)
// The backward forms the probabilities again up to this head width: beyond it the
// scores' operands, held beside the products', would leave too few registers.
constexpr int kMaxRecomputeWidth = 32;
__host__ __device__ constexpr int padded(int T) { return (T + kRows - 1) / kRows * kRows; }

// Row strides of shared-memory matrices [rows, n] for the two ways a warp's fragment
// load reads them, each in 32 distinct banks: 8 rows at 4 consecutive columns
// (ld_eight_rows, 4 mod 8 floats: a b operand whose columns are the matrix's rows) or 4
// rows at 8 consecutive columns (ld_four_rows, 8 mod 16).
__host__ __device__ constexpr int ld_eight_rows(int n) { return (n + 3) / 8 * 8 + 4; }
__host__ __device__ constexpr int ld_four_rows(int n) { return (n + 7) / 16 * 16 + 8; }

// Shared memory in floats. Forward: k [Tp, ld_eight_rows(hd)], v [Tp,
// ld_four_rows(hd)]. Backward: dy [Tp, ld_four_rows(hd)], v [Tp, ld_eight_rows(hd)],
// d(scores) [Tp, ld_four_rows(Tp)], and in float32 k and q [Tp, ld_four_rows(hd)] each
// (TF32 reads them from memory as b fragments).
size_t forward_floats(int T, int hd) { return size_t(padded(T)) * (ld_eight_rows(hd) + ld_four_rows(hd)); }
size_t backward_floats(int T, int hd, bool tf32) {
  return size_t(padded(T)) *
         ((tf32 ? 1 : 3) * ld_four_rows(hd) + ld_eight_rows(hd) + ld_four_rows(padded(T)));
}

// What both kernels read: qkv [M,B,T,3C], the QKV bias [M,3C] or null, the shape.
struct Args {
  const float *qkv, *qkv_bias;
  int B, T, C, H;
  float scale;
};

// A product's operand: rounded to TF32 for the tensor cores, else as it is.
template <bool kTf32>
__device__ inline float operand(float x) {
  return kTf32 ? round_tf32(x) : x;
}

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

// The warp's 16 rows of a score product's first operand (queries, or dy for d(p)):
// TF32 a fragments (mma_tf32's a, kSteps of them), or in float32 the lane's two rows (g
// and g + 8) whole.
template <int kSteps, bool kTf32>
using WarpRows = float[kTf32 ? kSteps : 2][kTf32 ? 4 : 8 * kSteps];
template <int kSteps, bool kTf32, class Value>
__device__ void load_warp_rows(WarpRows<kSteps, kTf32>& q, int row0, const Value& value) {
  if constexpr (kTf32) {
    load_a(q, row0, [&](int t, int i) { return round_tf32(value(t, i)); });
  } else {
    const int g = threadIdx.x % kWarpSize / 4;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < 8 * kSteps; ++i) q[r][i] = value(row0 + g + 8 * r, i);
  }
}

// s = the scores of the warp's queries q against keys [8 nt, 8 nt + 8) of k [Tp, ldk],
// unscaled, in mma_tf32's d layout: on the tensor cores, or in float32 each lane's four
// dot products (its rows against keys 8 nt + 2c and 2c + 1, read four floats at a time).
template <int kSteps, bool kTf32>
__device__ void score_tile(float (&s)[4], const WarpRows<kSteps, kTf32>& q, const float* k, int ldk, int nt) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  s[0] = s[1] = s[2] = s[3] = 0.0f;
  if constexpr (kTf32) {
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const float* row = k + (8 * nt + g) * ldk + 8 * step + c;
      const float b[2] = {row[0], row[4]};
      mma_tf32(s, q[step], b);
    }
  } else {
    const float* key0 = k + (8 * nt + 2 * c) * ldk;
#pragma unroll
    for (int i = 0; i < 8 * kSteps; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(key0 + i), b = *reinterpret_cast<const float4*>(key0 + ldk + i);
      const float ka[4] = {a.x, a.y, a.z, a.w}, kb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[0] = fmaf(q[0][i + j], ka[j], s[0]);
        s[1] = fmaf(q[0][i + j], kb[j], s[1]);
        s[2] = fmaf(q[1][i + j], ka[j], s[2]);
        s[3] = fmaf(q[1][i + j], kb[j], s[3]);
      }
    }
  }
}

// Float32: acc[n] (channels 8n.., mma_tf32's d layout) += a b for a 16 x 8 given as the
// lane's rows, a[r][j] row g + 8r at column j, and b rows [k0, k0 + 8) of [., ld], each
// lane's two columns of a tile read at once.
template <int kSteps>
__device__ void add_rows_times(float (&acc)[kSteps][4], const float (&a)[2][8], const float* b, int ld, int k0) {
  const int c = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      const float2 w = *reinterpret_cast<const float2*>(b + (k0 + j) * ld + 8 * n + 2 * c);
      acc[n][0] = fmaf(a[0][j], w.x, acc[n][0]);
      acc[n][1] = fmaf(a[0][j], w.y, acc[n][1]);
      acc[n][2] = fmaf(a[1][j], w.x, acc[n][2]);
      acc[n][3] = fmaf(a[1][j], w.y, acc[n][3]);
    }
}

// o[n] (channels 8n.., mma_tf32's d layout) += p v for the probabilities p of keys [8 nt,
// 8 nt + 8) (d layout) and v [Tp, ldv]: on the tensor cores, or in float32 with each
// lane's two rows of p gathered from the four lanes of its group.
template <int kSteps, bool kTf32>
__device__ void add_pv(float (&o)[kSteps][4], const float (&p)[4], const float* v, int ldv, int nt) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  if constexpr (kTf32) {
    float a[4];
    accumulator_as_a(a, p);
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      const float b[2] = {v[(8 * nt + c) * ldv + 8 * n + g], v[(8 * nt + c + 4) * ldv + 8 * n + g]};
      mma_tf32(o[n], a, b);
    }
  } else {
    float rows[2][8];  // p of rows g and g + 8 at the tile's keys: key j is lane 4g + j / 2's
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      rows[0][j] = __shfl_sync(kFullMask, p[j % 2], 4 * g + j / 2);
      rows[1][j] = __shfl_sync(kFullMask, p[2 + j % 2], 4 * g + j / 2);
    }
    add_rows_times(o, rows, v, ldv, 8 * nt);
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

// The backward's kRecompute: a 16 x 8 tile of scores s, unscaled (mma_tf32's d layout,
// rows from row0, columns from col0; rows queries and columns keys, or the other way),
// made its probabilities exp(s scale - lse), lse[e] the log-sum-exp of element e's
// query; 0 where the key is past the query or the query at T or past it.
__device__ inline void probabilities_again(float (&s)[4], const float (&lse)[4], int row0, int col0,
                                           bool rows_are_queries, int T, float scale) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int row = row0 + acc_row(e), col = col0 + acc_col(e);
    const int query = rows_are_queries ? row : col, key = rows_are_queries ? col : row;
    s[e] = key <= query && query < T ? expf(s[e] * scale - lse[e]) : 0.0f;
  }
}

// The forward's one pass over the warp's key tiles: each row's running max m and this
// lane's share of its sum of exponentials l; when m grows, l and the row's out scale by
// exp(old m - new m). Then out = o / l (rows below T) and lse = m + log l.
template <int kSteps, bool kTf32>
__device__ void one_pass(float* out, float* lse, const WarpRows<kSteps, kTf32>& q, const float* k, int ldk,
                         const float* v, int ldv, int q0, int tiles, int T, int C, float scale) {
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[kSteps][4] = {};
  for (int nt = 0; nt < tiles; ++nt) {
    float s[4];
    score_tile<kSteps, kTf32>(s, q, k, ldk, nt);
    float top[2] = {m[0], m[1]};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[e] = 8 * nt + acc_col(e) <= q0 + acc_row(e) ? s[e] * scale : -INFINITY;
      top[e / 2] = fmaxf(top[e / 2], s[e]);
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // over the 4 lanes of the row; finite from the first tile (key 0) on
      top[r] = fmaxf(top[r], __shfl_xor_sync(kFullMask, top[r], 1));
      top[r] = fmaxf(top[r], __shfl_xor_sync(kFullMask, top[r], 2));
      rescale[r] = expf(m[r] - top[r]);
      m[r] = top[r];
      l[r] *= rescale[r];
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[e] = expf(s[e] - m[e / 2]);
      l[e / 2] += s[e];
#pragma unroll
      for (int n = 0; n < kSteps; ++n) o[n][e] *= rescale[e / 2];
    }
    add_pv<kSteps, kTf32>(o, s, v, ldv, nt);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
  }
#pragma unroll
  for (int n = 0; n < kSteps; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] /= l[e / 2];
    store_rows(out, C, q0, T, 8 * n, o[n]);
  }
  if (lse && threadIdx.x % 4 == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (q0 + acc_row(2 * r) < T) lse[q0 + acc_row(2 * r)] = m[r] + logf(l[r]);
}

// With att: two passes over the keys, the probabilities written. Without: one, out
// rescaled as each row's running max grows (flash attention's), and with lse each
// query's log-sum-exp of its scaled scores, from which the backward forms them again.
template <int kSteps, bool kTf32>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    attention_forward_flash_kernel(const __grid_constant__ Args p, float* __restrict__ out, float* __restrict__ att,
                                   float* __restrict__ lse) {
  chain_after_prior_grids();
  extern __shared__ float4 shared4[];
  const int T = p.T, C = p.C, hd = C / p.H, Tp = padded(T), ldk = ld_eight_rows(hd), ldv = ld_four_rows(hd);
  const int64_t head = blockIdx.x, seq = head / p.H;
  const HeadQkv x(p.qkv, p.qkv_bias, p.B, p.T, p.C, p.H, head);
  float* k = reinterpret_cast<float*>(shared4);  // [Tp, ldk]
  float* v = k + Tp * ldk;                       // [Tp, ldv]
  stage<8 * kSteps>(k, ldk, Tp, [&](int t, int i) { return operand<kTf32>(x.value(1, t, i)); });
  stage<8 * kSteps>(v, ldv, Tp, [&](int t, int i) { return operand<kTf32>(x.value(2, t, i)); });
  const int q0 = threadIdx.x / kWarpSize * kRows;
  WarpRows<kSteps, kTf32> q;
  load_warp_rows<kSteps, kTf32>(q, q0, [&](int t, int i) { return x.value(0, t, i); });
  __syncthreads();
  const int tiles = ceil_div(min(q0 + kRows, T), 8);  // key tiles up to the warp's last query
  out += seq * T * C + head % p.H * hd;
  if (!att) {
    one_pass<kSteps, kTf32>(out, lse ? lse + head * T : nullptr, q, k, ldk, v, ldv, q0, tiles, T, C, p.scale);
    return;
  }

  // Pass 1: each row's max and sum of exponentials, then over the 4 lanes of its group.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int nt = 0; nt < tiles; ++nt) {
    float s[4];
    score_tile<kSteps, kTf32>(s, q, k, ldk, nt);
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
      score_tile<kSteps, kTf32>(s, q, k, ldk, nt);
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
    if (nt < tiles) add_pv<kSteps, kTf32>(o, s, v, ldv, nt);  // (the same for the whole warp)
  }
#pragma unroll
  for (int n = 0; n < kSteps; ++n) store_rows(out, C, q0, T, 8 * n, o[n]);
}

// kRecompute (TF32 only, head width up to 32): the probabilities formed again, tile by
// tile, from q, k (b fragments from memory, loaded a tile ahead as the others) and the
// forward's lse, where the kernel reads them from att otherwise. The shared memory is
// the same either way.
template <int kSteps, bool kTf32, bool kRecompute>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    attention_backward_flash_kernel(const __grid_constant__ Args p, float* __restrict__ dqkv,
                                    const float* __restrict__ dout, const float* __restrict__ out,
                                    const float* __restrict__ att, const float* __restrict__ lse) {
  chain_after_prior_grids();
  static_assert(kTf32 || !kRecompute, "the probabilities are formed again on the tensor cores only");
  extern __shared__ float4 shared4[];
  const int T = p.T, C = p.C, hd = C / p.H, Tp = padded(T);
  const int ldr = ld_four_rows(hd), ldv = ld_eight_rows(hd), ldd = ld_four_rows(Tp);
  const int64_t head = blockIdx.x, seq = head / p.H;
  const int channel = static_cast<int>(head % p.H) * hd;  // the head's first
  const HeadQkv x(p.qkv, p.qkv_bias, p.B, p.T, p.C, p.H, head);
  dout += seq * T * C + channel;
  out += seq * T * C + channel;
  if constexpr (kRecompute) lse += head * T;
  else att += head * T * T;
  dqkv += seq * T * 3 * C + channel;
  float* dy = reinterpret_cast<float*>(shared4);  // [Tp, ldr]
  float* v = dy + Tp * ldr;                       // [Tp, ldv]
  float* ds = v + Tp * ldv;                       // [Tp (query), ldd (key)]: d(scores)
  float* k = ds + Tp * ldd;                       // float32: [Tp, ldr] ...
  float* q = k + Tp * ldr;                        // ... and [Tp, ldr]
  auto dy_value = [&](int t, int i) { return t < T ? __ldg(dout + int64_t(t) * C + i) : 0.0f; };
  stage<8 * kSteps>(dy, ldr, Tp, [&](int t, int i) { return operand<kTf32>(dy_value(t, i)); });
  stage<8 * kSteps>(v, ldv, Tp, [&](int t, int i) { return operand<kTf32>(x.value(2, t, i)); });
  if constexpr (!kTf32) {
    stage<8 * kSteps>(k, ldr, Tp, [&](int t, int i) { return x.value(1, t, i); });
    stage<8 * kSteps>(q, ldr, Tp, [&](int t, int i) { return x.value(0, t, i); });
  }
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4, w0 = threadIdx.x / kWarpSize * kRows;
  // dy . out of the lane's two queries (float32, from memory), over the 4 lanes of its group
  float dot[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = w0 + g + 8 * r;
    float sum = 0.0f;
    if (t < T) {
#pragma unroll
      for (int i = c; i < 8 * kSteps; i += 4) sum += __ldg(dout + int64_t(t) * C + i) * __ldg(out + int64_t(t) * C + i);
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    dot[r] = sum + __shfl_xor_sync(kFullMask, sum, 2);
  }
  // the warp's rows of dy as its d(p) products read them (loaded before the barrier:
  // from memory, not from dy)
  WarpRows<kSteps, kTf32> dy_rows;
  load_warp_rows<kSteps, kTf32>(dy_rows, w0, dy_value);
  // kRecompute: the scores' first operands (the warp's queries, then its keys) and the
  // log-sum-exp of the lane's two queries in phase 1
  WarpRows<kRecompute ? kSteps : 1, true> score_rows;
  float query_lse[4] = {};
  if constexpr (kRecompute) {
    load_warp_rows<kSteps, true>(score_rows, w0, x.part(0));
#pragma unroll
    for (int e = 0; e < 4; ++e) query_lse[e] = w0 + acc_row(e) < T ? __ldg(lse + w0 + acc_row(e)) : 0.0f;
  }
  // the scores' b fragments of tile `tile` of q or k (part): rows 8 tile + g, channels 8 n + c and + 4
  auto load_score_columns = [&](float (&b)[kSteps][2], int part, int tile) {
#pragma unroll
    for (int n = 0; n < kSteps; ++n) {
      b[n][0] = round_tf32(x.value(part, 8 * tile + g, 8 * n + c));
      b[n][1] = round_tf32(x.value(part, 8 * tile + g, 8 * n + c + 4));
    }
  };
  __syncthreads();

  // Phase 1, queries [w0, w0 + 16): d(scores) tile by tile into ds, dq = d(scores) k.
  // Each tile's operands from memory (its probabilities, or with kRecompute k's rows for
  // the scores; in TF32 k's rows as b fragments) are loaded while the tile before is
  // used: a tile's loads wait on memory once.
  constexpr int kScoreSteps = kRecompute ? kSteps : 1;
  struct QueryTile {
    float prob[4], k[kTf32 ? kSteps : 1][2], k_scores[kScoreSteps][2];
  };
  auto load_query_tile = [&](QueryTile& tile, int nt) {
    if constexpr (kRecompute) {
      load_score_columns(tile.k_scores, 1, nt);
    } else {
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
    }
    if constexpr (kTf32) {
#pragma unroll
      for (int n = 0; n < kSteps; ++n) {
        tile.k[n][0] = round_tf32(x.value(1, 8 * nt + c, 8 * n + g));
        tile.k[n][1] = round_tf32(x.value(1, 8 * nt + c + 4, 8 * n + g));
      }
    }
  };
  const int tiles = ceil_div(min(w0 + kRows, T), 8);
  float dq[kSteps][4] = {};
  QueryTile tile{}, next{};
  load_query_tile(tile, 0);
  for (int nt = 0; nt < Tp / 8; ++nt) {
    if (nt + 1 < tiles) load_query_tile(next, nt + 1);
    float d[4] = {};
    if (nt < tiles) {
      if constexpr (kRecompute) {
        tile.prob[0] = tile.prob[1] = tile.prob[2] = tile.prob[3] = 0.0f;
#pragma unroll
        for (int n = 0; n < kSteps; ++n) mma_tf32(tile.prob, score_rows[n], tile.k_scores[n]);
        probabilities_again(tile.prob, query_lse, w0, 8 * nt, true, T, p.scale);
      }
      score_tile<kSteps, kTf32>(d, dy_rows, v, ldv, nt);  // d(p) = dy v^T
#pragma unroll
      for (int e = 0; e < 4; ++e) d[e] = tile.prob[e] * (d[e] - dot[e / 2]) * p.scale;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)  // zeros past the warp's keys: phase 2 reads them
      *reinterpret_cast<float2*>(ds + (w0 + g + 8 * r) * ldd + 8 * nt + 2 * c) = make_float2(d[2 * r], d[2 * r + 1]);
    if (nt >= tiles) continue;  // (the same for the whole warp)
    if constexpr (kTf32) {
      float a[4];
      accumulator_as_a(a, d);
#pragma unroll
      for (int n = 0; n < kSteps; ++n) mma_tf32(dq[n], a, tile.k[n]);
    } else {
      add_pv<kSteps, false>(dq, d, k, ldr, nt);
    }
    tile = next;
  }
  auto store = [&](int part, const float (&acc)[kSteps][4]) {  // rows w0.. of dq, dk or dv
#pragma unroll
    for (int n = 0; n < kSteps; ++n) store_rows(dqkv, 3 * C, w0, T, part * C + 8 * n, acc[n]);
  };
  store(0, dq);
  if constexpr (kRecompute) load_warp_rows<kSteps, true>(score_rows, w0, x.part(1));
  __syncthreads();

  // Phase 2, keys [w0, w0 + 16): dv = p^T dy and dk = d(scores)^T q over the queries
  // from w0 on (p and d(scores) are zero above the diagonal). Each query tile's
  // probabilities, p(query, key) at (key row, query column) (TF32: an a fragment; float32:
  // the lane's two key rows at the tile's 8 queries), and in TF32 q's rows (b
  // fragments), loaded while the tile before is used; with kRecompute, in place of the
  // probabilities, q's rows for the scores and the lse of the lane's two queries.
  struct KeyTile {
    float p[kTf32 ? 1 : 2][kTf32 ? 4 : 8], q[kTf32 ? kSteps : 1][2], q_scores[kScoreSteps][2], lse[4];
  };
  auto probability = [&](int t, int t2) { return t < T && t2 < T ? __ldg(att + int64_t(t) * T + t2) : 0.0f; };
  auto load_key_tile = [&](KeyTile& tile, int qt) {
    if constexpr (kRecompute) {
      load_score_columns(tile.q_scores, 0, qt);
#pragma unroll
      for (int e = 0; e < 4; ++e) tile.lse[e] = 8 * qt + acc_col(e) < T ? __ldg(lse + 8 * qt + acc_col(e)) : 0.0f;
    } else if constexpr (kTf32) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        tile.p[0][e] = round_tf32(probability(8 * qt + c + 4 * (e / 2), w0 + g + 8 * (e % 2)));
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) tile.p[r][j] = probability(8 * qt + j, w0 + g + 8 * r);
    }
    if constexpr (kTf32) {
#pragma unroll
      for (int n = 0; n < kSteps; ++n) {
        tile.q[n][0] = round_tf32(x.value(0, 8 * qt + c, 8 * n + g));
        tile.q[n][1] = round_tf32(x.value(0, 8 * qt + c + 4, 8 * n + g));
      }
    }
  };
  float dv[kSteps][4] = {}, dk[kSteps][4] = {};
  KeyTile key_tile{}, key_next{};
  load_key_tile(key_tile, w0 / 8);
  for (int qt = w0 / 8; qt < Tp / 8; ++qt) {
    if (qt + 1 < Tp / 8) load_key_tile(key_next, qt + 1);
    if constexpr (kRecompute) {  // the scores with the warp's keys as rows: p^T, then an a fragment
      float scores[4] = {};
#pragma unroll
      for (int n = 0; n < kSteps; ++n) mma_tf32(scores, score_rows[n], key_tile.q_scores[n]);
      probabilities_again(scores, key_tile.lse, w0, 8 * qt, false, T, p.scale);
      accumulator_as_a(key_tile.p[0], scores);
    }
    if constexpr (kTf32) {
      float a_ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        a_ds[e] = round_tf32(ds[(8 * qt + c + 4 * (e / 2)) * ldd + w0 + g + 8 * (e % 2)]);
#pragma unroll
      for (int n = 0; n < kSteps; ++n) {
        const float b_dy[2] = {dy[(8 * qt + c) * ldr + 8 * n + g], dy[(8 * qt + c + 4) * ldr + 8 * n + g]};
        mma_tf32(dv[n], key_tile.p[0], b_dy);
        mma_tf32(dk[n], a_ds, key_tile.q[n]);
      }
    } else {
      float ds_rows[2][8];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) ds_rows[r][j] = ds[(8 * qt + j) * ldd + w0 + g + 8 * r];
      add_rows_times(dv, key_tile.p, dy, ldr, 8 * qt);
      add_rows_times(dk, ds_rows, q, ldr, 8 * qt);
    }
    key_tile = key_next;
  }
  store(1, dk);
  store(2, dv);
}

// The kernels for head widths 8, 16, ..., 8 kMaxSteps (float32: up to 8 kMaxFloatSteps):
// instances kSteps = 1, 2, ... of each, indexed by the head width.
using ForwardKernel = void (*)(Args, float*, float*, float*);
using BackwardKernel = void (*)(Args, float*, const float*, const float*, const float*, const float*);
template <bool kTf32, int... kStep>
ForwardKernel forward_kernel(int hd, std::integer_sequence<int, kStep...>) {
  static const ForwardKernel kernels[] = {attention_forward_flash_kernel<kStep + 1, kTf32>...};
  return kernels[hd / 8 - 1];
}
template <bool kTf32, bool kRecompute, int... kStep>
BackwardKernel backward_kernel(int hd, std::integer_sequence<int, kStep...>) {
  static const BackwardKernel kernels[] = {attention_backward_flash_kernel<kStep + 1, kTf32, kRecompute>...};
  return kernels[hd / 8 - 1];
}
ForwardKernel forward_kernel(int hd, bool tf32) {
  return tf32 ? forward_kernel<true>(hd, std::make_integer_sequence<int, kMaxSteps>())
              : forward_kernel<false>(hd, std::make_integer_sequence<int, kMaxFloatSteps>());
}
BackwardKernel backward_kernel(int hd, bool tf32, bool recompute) {
  if (recompute) return backward_kernel<true, true>(hd, std::make_integer_sequence<int, kMaxRecomputeWidth / 8>());
  return tf32 ? backward_kernel<true, false>(hd, std::make_integer_sequence<int, kMaxSteps>())
              : backward_kernel<false, false>(hd, std::make_integer_sequence<int, kMaxFloatSteps>());
}

}  // namespace

bool attention_flash_fits(int T, int C, int H, bool backward, bool tf32) {
  if (T < 1 || C % H != 0 || padded(T) / kRows > kMaxWarps) return false;
  const int hd = C / H;
  if (hd % 8 != 0 || hd / 8 > (tf32 ? kMaxSteps : kMaxFloatSteps)) return false;
  const size_t floats = backward ? backward_floats(T, hd, tf32) : forward_floats(T, hd);
  return floats * sizeof(float) <= shared_memory_optin_limit();
}

bool attention_flash_recomputes(int T, int C, int H, bool tf32) {
  return tf32 && C % H == 0 && C / H <= kMaxRecomputeWidth && attention_flash_fits(T, C, H, true, true);
}

void prepare_attention_flash_kernels() {
  const int bytes = static_cast<int>(shared_memory_optin_limit());
  for (int hd = 8; hd <= 8 * kMaxSteps; hd += 8)
    for (const bool tf32 : {true, false}) {
      if (!tf32 && hd > 8 * kMaxFloatSteps) continue;
      UNIV_CUDA_CHECK(
          cudaFuncSetAttribute(forward_kernel(hd, tf32), cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      for (const bool recompute : {false, true})
        if (!recompute || (tf32 && hd <= kMaxRecomputeWidth))
          UNIV_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel(hd, tf32, recompute),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    }
}

void attention_forward_flash(float* out, float* att, float* lse, const float* qkv, const float* qkv_bias, int M,
                             int B, int T, int C, int H, bool tf32, cudaStream_t stream) {
  if (att && lse) throw std::invalid_argument("attention_forward_flash: att or lse, not both");
  const Args p{qkv, qkv_bias, B, T, C, H, attention_scale(C / H)};
  const ForwardKernel forward_flash = forward_kernel(C / H, tf32);
  launch_chained(forward_flash, M * B * H, padded(T) / kRows * kWarpSize, forward_floats(T, C / H) * sizeof(float),
                 stream, p, out, att, lse);
}

void attention_backward_flash(float* dqkv, const float* dout, const float* out, const float* qkv,
                              const float* qkv_bias, const float* att, const float* lse, int M, int B, int T, int C,
                              int H, bool tf32, cudaStream_t stream) {
  if (!att == !lse) throw std::invalid_argument("attention_backward_flash: att or lse, one of them");
  if (lse && !attention_flash_recomputes(T, C, H, tf32))
    throw std::invalid_argument("attention_backward_flash: lse where the probabilities are not formed again");
  const Args p{qkv, qkv_bias, B, T, C, H, attention_scale(C / H)};
  const bool recompute = lse != nullptr;
  const BackwardKernel backward_flash = backward_kernel(C / H, tf32, recompute);
  launch_chained(backward_flash, M * B * H, padded(T) / kRows * kWarpSize,
                 backward_floats(T, C / H, tf32) * sizeof(float), stream, p, dqkv, dout, out, att, lse);
}

}  // namespace univ::cuda
