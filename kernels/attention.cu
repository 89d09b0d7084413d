// Causal multi-head attention, fused: one block per (model, sequence, head) keeps the
// head's q, k, v and its T x T scores in shared memory. The forward first adds the
// QKV bias to its head's slices of qkv (written back for the backward) and writes the
// softmax probabilities for the backward, which owns its head's slices of dqkv. In
// float32 each thread computes tiles of the products; with TF32 (--precision tf32)
// each warp computes 16 x 16 tiles on the tensor cores.
#include <mma.h>

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

// TF32: wmma tiles of 16 x 16 outputs and 8 terms per step. Positions pad to Tp, a
// multiple of 16, and head channels to hp, a multiple of 16, with zeros (a NaN left in
// padding would spread through the tiles' sums); the softmax stays in float32, and
// only the products' operands round to TF32.
namespace wmma = nvcuda::wmma;
constexpr int kTile = 16, kStep = 8;
using TileAcc = wmma::fragment<wmma::accumulator, kTile, kTile, kStep, float>;
template <class Layout>
using TileA = wmma::fragment<wmma::matrix_a, kTile, kTile, kStep, wmma::precision::tf32, Layout>;
template <class Layout>
using TileB = wmma::fragment<wmma::matrix_b, kTile, kTile, kStep, wmma::precision::tf32, Layout>;

// Few warps keep the tensor cores busy; half the float32 kernels' threads leave each
// thread the registers its fragments need.
constexpr int kTf32MaxThreads = kMaxThreads / 2;
int tf32_threads_for(int T) { return min(threads_for(T), kTf32MaxThreads); }

struct Tf32Sizes {
  int Tp, hp, ldh, ldt;  // padded positions and channels; rows of [Tp, ldh] and [Tp, ldt] matrices
};
__host__ __device__ Tf32Sizes tf32_sizes(int T, int hd) {
  const int Tp = (T + kTile - 1) / kTile * kTile, hp = (hd + kTile - 1) / kTile * kTile;
  return {Tp, hp, hp + 4, Tp + 4};  // + 4: rows start 4 banks apart (wmma needs multiples of 4)
}
size_t forward_tf32_shared_floats(int T, int hd) {  // q (then out), k, v; s
  const Tf32Sizes z = tf32_sizes(T, hd);
  return 3 * size_t(z.Tp) * z.ldh + size_t(z.Tp) * z.ldt;
}
size_t backward_tf32_shared_floats(int T, int hd) {  // q, k, v (then dv), dy (then dq); p (then dk); d
  const Tf32Sizes z = tf32_sizes(T, hd);
  return 4 * size_t(z.Tp) * z.ldh + size_t(z.Tp) * max(z.ldt, z.ldh) + size_t(z.Tp) * z.ldt;
}

// For each 16 x 16 tile (i, j) of a product, i < row_tiles, j < col_tiles, a warp at a
// time: the sum over k in range(i, j) (multiples of 8; empty: the tile is skipped) of
// a(rows of tile i, k) b(k, columns of tile j), the operands' 16 x 8 and 8 x 16 tiles
// at a_at(i, k) and b_at(k, j) in shared memory (row strides lda, ldb); store(i, j,
// sums) takes each.
template <class LayoutA, class LayoutB, class AAt, class BAt, class Range, class Store>
__device__ void warp_tile_product(int row_tiles, int col_tiles, const AAt& a_at, int lda, const BAt& b_at, int ldb,
                                  const Range& range, const Store& store) {
  const int warps = blockDim.x / kWarpSize;
  for (int tile = threadIdx.x / kWarpSize; tile < row_tiles * col_tiles; tile += warps) {
    const int i = tile / col_tiles, j = tile % col_tiles;
    const int2 k_range = range(i, j);
    if (k_range.x >= k_range.y) continue;
    TileAcc acc;
    wmma::fill_fragment(acc, 0.0f);
    TileA<LayoutA> a;
    TileB<LayoutB> b;
    for (int k = k_range.x; k < k_range.y; k += kStep) {
      wmma::load_matrix_sync(a, a_at(i, k), lda);
      wmma::load_matrix_sync(b, b_at(k, j), ldb);
      for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
      for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
      wmma::mma_sync(acc, a, b, acc);
    }
    store(i, j, acc);
  }
}

// dst [Tp, ldh] = value(t, i) for positions t < T and channels i < hd, zeros around.
template <class Value>
__device__ void load_head(float* dst, const Tf32Sizes& z, int T, int hd, const Value& value) {
  for (int idx = threadIdx.x; idx < z.Tp * z.hp; idx += blockDim.x) {
    const int t = idx / z.hp, i = idx % z.hp;
    dst[t * z.ldh + i] = t < T && i < hd ? value(t, i) : 0.0f;
  }
}

// rows (stride row_stride) = the head's T x hd slice of src [Tp, ldh].
__device__ void store_head(float* __restrict__ rows, int64_t row_stride, const float* src, const Tf32Sizes& z, int T,
                           int hd) {
  for (int idx = threadIdx.x; idx < T * hd; idx += blockDim.x) {
    const int t = idx / hd, i = idx % hd;
    rows[t * row_stride + i] = src[t * z.ldh + i];
  }
}

__global__ void __launch_bounds__(kTf32MaxThreads) attention_forward_tf32_kernel(float* __restrict__ out,
                                                                             float* __restrict__ att, float* qkv,
                                                                             const float* __restrict__ qkv_bias,
                                                                             int B, int T, int C, int H, float scale) {
  extern __shared__ __align__(128) float shared_tiles[];  // wmma tiles start 32-byte aligned
  const int hd = C / H;
  const Tf32Sizes z = tf32_sizes(T, hd);
  const int64_t seq = blockIdx.x / H;
  const int h = blockIdx.x % H;
  float* q = shared_tiles;                        // [Tp, ldh], then the output
  float* k = q + z.Tp * z.ldh;                    // [Tp, ldh]
  float* v = k + z.Tp * z.ldh;                    // [Tp, ldh]
  float* s = v + z.Tp * z.ldh;                    // [Tp, ldt] scores, then probabilities
  float* base = qkv + seq * T * 3 * C + h * hd;
  const float* bias = qkv_bias ? qkv_bias + seq / B * 3 * C + h * hd : nullptr;  // model seq / B
  for (int part = 0; part < 3; ++part)  // q, k, v, each with its bias added and written back
    load_head(part == 0 ? q : part == 1 ? k : v, z, T, hd, [&](int t, int i) {
      float* x = base + int64_t(t) * 3 * C + part * C + i;
      if (bias) *x += bias[part * C + i];
      return *x;
    });
  __syncthreads();
  // scores = q k^T (k read as a column-major operand); tiles above the diagonal skipped
  const int tiles = z.Tp / kTile;
  warp_tile_product<wmma::row_major, wmma::col_major>(
      tiles, tiles, [&](int i, int kk) { return q + i * kTile * z.ldh + kk; }, z.ldh,
      [&](int kk, int j) { return k + j * kTile * z.ldh + kk; }, z.ldh,
      [&](int i, int j) { return j <= i ? make_int2(0, z.hp) : make_int2(0, 0); },
      [&](int i, int j, TileAcc& acc) {
        for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= scale;
        wmma::store_matrix_sync(s + i * kTile * z.ldt + j * kTile, acc, z.ldt, wmma::mem_row_major);
      });
  __syncthreads();
  // a warp per row: probabilities, zeros after the diagonal up to Tp (the padding)
  for (int t = threadIdx.x / kWarpSize; t < T; t += blockDim.x / kWarpSize)
    causal_softmax_lanes(s + t * z.ldt, 1, t, z.Tp);
  __syncthreads();
  float* a = att + int64_t(blockIdx.x) * T * T;  // [M,B,H,T,T]: block = seq * H + h
  for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) a[idx] = s[idx / T * z.ldt + idx % T];
  // out = p v into q's place: up to each row tile's last key (rows past T are not read)
  warp_tile_product<wmma::row_major, wmma::row_major>(
      tiles, z.hp / kTile, [&](int i, int kk) { return s + i * kTile * z.ldt + kk; }, z.ldt,
      [&](int kk, int j) { return v + kk * z.ldh + j * kTile; }, z.ldh,
      [&](int i, int) { return make_int2(0, (i + 1) * kTile); },
      [&](int i, int j, TileAcc& acc) {
        wmma::store_matrix_sync(q + i * kTile * z.ldh + j * kTile, acc, z.ldh, wmma::mem_row_major);
      });
  __syncthreads();
  store_head(out + seq * T * C + h * hd, C, q, z, T, hd);
}

__global__ void __launch_bounds__(kTf32MaxThreads) attention_backward_tf32_kernel(float* __restrict__ dqkv,
                                                                              const float* __restrict__ dout,
                                                                              const float* qkv,
                                                                              const float* __restrict__ att, int T,
                                                                              int C, int H, float scale) {
  extern __shared__ __align__(128) float shared_tiles[];  // wmma tiles start 32-byte aligned
  const int hd = C / H;
  const Tf32Sizes z = tf32_sizes(T, hd);
  const int64_t seq = blockIdx.x / H;
  const int h = blockIdx.x % H;
  float* q = shared_tiles;                        // [Tp, ldh]
  float* k = q + z.Tp * z.ldh;                    // [Tp, ldh]
  float* v = k + z.Tp * z.ldh;                    // [Tp, ldh], then dv
  float* dy = v + z.Tp * z.ldh;                   // [Tp, ldh], then dq
  float* p = dy + z.Tp * z.ldh;                   // [Tp, ldt] probabilities, then dk [Tp, ldh]
  float* d = p + z.Tp * max(z.ldt, z.ldh);        // [Tp, ldt] d(probabilities), then d(scores)
  const float* base = qkv + seq * T * 3 * C + h * hd;
  const float* dbase = dout + seq * T * C + h * hd;
  for (int part = 0; part < 3; ++part)
    load_head(part == 0 ? q : part == 1 ? k : v, z, T, hd,
              [&](int t, int i) { return base[int64_t(t) * 3 * C + part * C + i]; });
  load_head(dy, z, T, hd, [&](int t, int i) { return dbase[int64_t(t) * C + i]; });
  const float* probs = att + int64_t(blockIdx.x) * T * T;
  for (int idx = threadIdx.x; idx < z.Tp * z.Tp; idx += blockDim.x) {
    const int t = idx / z.Tp, t2 = idx % z.Tp;
    p[t * z.ldt + t2] = t < T && t2 < T ? probs[t * T + t2] : 0.0f;
  }
  __syncthreads();
  const int tiles = z.Tp / kTile, head_tiles = z.hp / kTile;
  // d(prob) = dy v^T on and below the diagonal's tiles
  warp_tile_product<wmma::row_major, wmma::col_major>(
      tiles, tiles, [&](int i, int kk) { return dy + i * kTile * z.ldh + kk; }, z.ldh,
      [&](int kk, int j) { return v + j * kTile * z.ldh + kk; }, z.ldh,
      [&](int i, int j) { return j <= i ? make_int2(0, z.hp) : make_int2(0, 0); },
      [&](int i, int j, TileAcc& acc) {
        wmma::store_matrix_sync(d + i * kTile * z.ldt + j * kTile, acc, z.ldt, wmma::mem_row_major);
      });
  __syncthreads();
  // dv = p^T dy into v's place: queries from the key tile's first on
  warp_tile_product<wmma::col_major, wmma::row_major>(
      tiles, head_tiles, [&](int i, int kk) { return p + kk * z.ldt + i * kTile; }, z.ldt,
      [&](int kk, int j) { return dy + kk * z.ldh + j * kTile; }, z.ldh,
      [&](int i, int) { return make_int2(i * kTile, z.Tp); },
      [&](int i, int j, TileAcc& acc) {
        wmma::store_matrix_sync(v + i * kTile * z.ldh + j * kTile, acc, z.ldh, wmma::mem_row_major);
      });
  // a warp per row: d(scores), zeros after the diagonal up to Tp and in the padded rows
  for (int t = threadIdx.x / kWarpSize; t < z.Tp; t += blockDim.x / kWarpSize) {
    if (t < T) {
      causal_softmax_backward_lanes(p + t * z.ldt, 1, d + t * z.ldt, 1, t, z.Tp, scale);
    } else {
      for (int t2 = threadIdx.x % kWarpSize; t2 < z.Tp; t2 += kWarpSize) d[t * z.ldt + t2] = 0.0f;
    }
  }
  __syncthreads();
  // dq = ds k into dy's place (keys up to the row tile's last); dk = ds^T q into p's
  // place (queries from the key tile's first)
  warp_tile_product<wmma::row_major, wmma::row_major>(
      tiles, head_tiles, [&](int i, int kk) { return d + i * kTile * z.ldt + kk; }, z.ldt,
      [&](int kk, int j) { return k + kk * z.ldh + j * kTile; }, z.ldh,
      [&](int i, int) { return make_int2(0, (i + 1) * kTile); },
      [&](int i, int j, TileAcc& acc) {
        wmma::store_matrix_sync(dy + i * kTile * z.ldh + j * kTile, acc, z.ldh, wmma::mem_row_major);
      });
  warp_tile_product<wmma::col_major, wmma::row_major>(
      tiles, head_tiles, [&](int i, int kk) { return d + kk * z.ldt + i * kTile; }, z.ldt,
      [&](int kk, int j) { return q + kk * z.ldh + j * kTile; }, z.ldh,
      [&](int i, int) { return make_int2(i * kTile, z.Tp); },
      [&](int i, int j, TileAcc& acc) {
        wmma::store_matrix_sync(p + i * kTile * z.ldh + j * kTile, acc, z.ldh, wmma::mem_row_major);
      });
  __syncthreads();
  float* out = dqkv + seq * T * 3 * C + h * hd;
  store_head(out, 3 * C, dy, z, T, hd);
  store_head(out + C, 3 * C, p, z, T, hd);
  store_head(out + 2 * C, 3 * C, v, z, T, hd);
}

}  // namespace

float attention_scale(int hd) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))); }

void prepare_attention_kernels() {
  const int bytes = static_cast<int>(shared_memory_optin_limit());
  for (const void* kernel : {reinterpret_cast<const void*>(attention_forward_kernel<1>),
                             reinterpret_cast<const void*>(attention_forward_kernel<4>),
                             reinterpret_cast<const void*>(attention_backward_kernel<1>),
                             reinterpret_cast<const void*>(attention_backward_kernel<4>),
                             reinterpret_cast<const void*>(attention_forward_tf32_kernel),
                             reinterpret_cast<const void*>(attention_backward_tf32_kernel)})
    UNIV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

int attention_max_seq_len(int head_dim) {
  const size_t limit = shared_memory_optin_limit();
  int T = 1;
  while (backward_shared_floats(T + 1, head_dim) * sizeof(float) <= limit) ++T;
  return T;
}

void attention_forward(float* out, float* att, float* qkv, const float* qkv_bias, int M, int B, int T, int C, int H,
                       bool tf32, cudaStream_t stream) {
  const int hd = C / H;
  const size_t tf32_shared = forward_tf32_shared_floats(T, hd) * sizeof(float);
  if (tf32 && tf32_shared <= shared_memory_optin_limit()) {
    attention_forward_tf32_kernel<<<M * B * H, tf32_threads_for(T), tf32_shared, stream>>>(
        out, att, qkv, qkv_bias, B, T, C, H, attention_scale(hd));
  } else {
    const size_t shared = forward_shared_floats(T, hd) * sizeof(float);
    auto kernel = tile_rows_for(T) == 4 ? attention_forward_kernel<4> : attention_forward_kernel<1>;
    kernel<<<M * B * H, threads_for(T), shared, stream>>>(out, att, qkv, qkv_bias, B, T, C, H, attention_scale(hd));
  }
  UNIV_CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, int M, int B, int T, int C,
                        int H, bool tf32, cudaStream_t stream) {
  const int hd = C / H;
  const size_t tf32_shared = backward_tf32_shared_floats(T, hd) * sizeof(float);
  if (tf32 && tf32_shared <= shared_memory_optin_limit()) {
    attention_backward_tf32_kernel<<<M * B * H, tf32_threads_for(T), tf32_shared, stream>>>(
        dqkv, dout, qkv, att, T, C, H, attention_scale(hd));
  } else {
    const size_t shared = backward_shared_floats(T, hd) * sizeof(float);
    auto kernel = tile_rows_for(T) == 4 ? attention_backward_kernel<4> : attention_backward_kernel<1>;
    kernel<<<M * B * H, threads_for(T), shared, stream>>>(dqkv, dout, qkv, att, T, C, H, attention_scale(hd));
  }
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
