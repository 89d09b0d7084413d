// Causal multi-head attention, fused, scores in shared memory, in blocks per chunk of
// 32 queries or keys, so that several blocks share an SM at long sequences. The
// forward's block (model, sequence, head, chunk of queries) holds the keys and values up
// to its chunk's last query and the chunk's scores, adds the QKV bias as it loads (qkv
// stays as it is) and writes the softmax probabilities for the backward. The backward
// takes each query's sum over keys of p d(p) as dy . out (flash-attention's identity),
// so a block can form d(scores) from its own chunk's probabilities: a block per chunk
// of keys adds their dk and dv over the later queries, and a block per chunk of
// queries their dq over the earlier keys, each from its own d(scores) (the dy . v
// product twice, but no sums across blocks). A head of one chunk (T <= 32) is one
// block that does both.
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

// Four blocks per SM where their shared memory allows it (53 KiB each at T = 128 and
// head width 32), so at most 64 registers per thread.
constexpr int kChunk = 32;  // queries or keys per block
constexpr int kThreads = 256, kBlocksPerSM = 4;

__host__ __device__ constexpr int chunks_of(int T) { return (T + kChunk - 1) / kChunk; }

// Shared-memory layouts: rows padded as common.cuh's pad4 and transposed_ld say; score
// rows of n keys padded by one (n + 1), so that threads reading different rows at one
// column hit different banks. The largest a launch's blocks need:
size_t forward_shared_floats(int T, int hd) {  // kT, v up to T keys; q, s of a chunk
  const size_t rows = std::min(T, kChunk);
  return size_t(hd) * transposed_ld(T) + size_t(T) * pad4(hd) + rows * (hd + 1) + rows * (T + 1);
}
size_t key_block_floats(int n, int keys, int hd, bool whole) {  // q, dy, vT, s, pd (, k)
  return 2 * size_t(n) * pad4(hd) + size_t(hd) * transposed_ld(keys) + size_t(n) * (keys + 1) + n +
         (whole ? size_t(keys) * pad4(hd) : 0);
}
size_t query_block_floats(int rows, int keys, int hd) {  // dy, vT, k, s, pd
  return size_t(rows) * pad4(hd) + size_t(hd) * transposed_ld(keys) + size_t(keys) * pad4(hd) +
         size_t(rows) * (keys + 1) + rows;
}
size_t backward_shared_floats(int T, int hd) {  // the first key chunk's, the last query chunk's
  if (chunks_of(T) == 1) return key_block_floats(T, T, hd, true);
  return std::max(key_block_floats(T, kChunk, hd, false), query_block_floats(kChunk, T, hd));
}

// Tiles of four rows from T = 64 (blocks with many tiles per thread), of one row below
// that (short k loops).
int tile_rows_for(int T) { return T >= 64 ? 4 : 1; }

// Lanes per tile of the products of `rows` queries or keys and the head's channels, sums
// over up to `depth` keys or queries: they have few tiles for the block's threads.
template <int kRows>
__device__ int head_product_lanes(int rows, int hd, int depth) {
  return lanes_per_tile(ceil_div(rows, kRows) * ceil_div(hd, 4), blockDim.x, depth);
}

// Head (seq, h) = head of qkv [M,B,T,3C]: part(p)(t, i) is channel i of row t of q, k
// or v (p = 0, 1, 2) with the QKV bias added.
struct HeadQkv {
  const float *qkv, *bias;
  int C;
  __device__ HeadQkv(const float* all, const float* qkv_bias, int B, int T, int C_, int H, int64_t head) : C(C_) {
    const int64_t seq = head / H;
    const int offset = static_cast<int>(head % H) * (C / H);
    qkv = all + seq * T * 3 * C + offset;
    bias = qkv_bias ? qkv_bias + seq / B * 3 * C + offset : nullptr;  // model seq / B
  }
  __device__ auto part(int p) const {
    return [this, p](int t, int i) {
      const float value = qkv[int64_t(t) * 3 * C + p * C + i];
      return bias ? value + bias[p * C + i] : value;
    };
  }
};

// Rows [t0, t0 + n) of value(t, i) into dst [n, ld], channels from hd on zero.
template <class Value>
__device__ void load_rows(float* dst, int ld, int hd, int t0, int n, const Value& value) {
  for (int idx = threadIdx.x; idx < n * ld; idx += blockDim.x) {
    const int u = idx / ld, i = idx % ld;
    dst[idx] = i < hd ? value(t0 + u, i) : 0.0f;
  }
}

// Rows [t0, t0 + n) of value(t, i) transposed into dst [hd, transposed_ld(n)], rows
// past n zero: 4 rows (fastest) x 8 channels per warp.
template <class Value>
__device__ void load_transposed(float* dst, int hd, int t0, int n, const Value& value) {
  const int ld = transposed_ld(n);
  for (int idx = threadIdx.x; idx < pad4(n) * hd; idx += blockDim.x) {
    const int j = idx / (4 * hd) * 4 + idx % 4, i = idx / 4 % hd;
    dst[i * ld + j] = j < n ? value(t0 + j, i) : 0.0f;
  }
}

template <int kRows>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    attention_forward_kernel(float* __restrict__ out, float* __restrict__ att, const float* __restrict__ qkv,
                             const float* __restrict__ qkv_bias, int B, int T, int C, int H, float scale) {
  extern __shared__ float4 shared4[];
  // The chunks with the most keys first (blocks start about in index order, so the
  // grid's tail has the short ones), each over all heads (head = seq * H + h).
  const int64_t heads = gridDim.x / chunks_of(T), head = blockIdx.x % heads, seq = head / H;
  const int h = static_cast<int>(head % H), chunk = chunks_of(T) - 1 - static_cast<int>(blockIdx.x / heads);
  const int t0 = chunk * kChunk, rows = min(T - t0, kChunk), keys = t0 + rows;
  const int hd = C / H, hdp = pad4(hd), ldT = transposed_ld(keys), Ts = keys + 1, lq = hd + 1;
  float* kT = reinterpret_cast<float*>(shared4);  // [hd, ldT]: k transposed
  float* v = kT + hd * ldT;                       // [keys, hdp]
  float* q = v + keys * hdp;                      // [rows, hd + 1]: queries t0, t0 + 1, ...
  float* s = q + rows * lq;                       // [rows, Ts] scores, then probabilities
  const HeadQkv g(qkv, qkv_bias, B, T, C, H, head);
  load_transposed(kT, hd, 0, keys, g.part(1));
  load_rows(v, hdp, hd, 0, keys, g.part(2));
  load_rows(q, lq, hd, t0, rows, g.part(0));
  __syncthreads();
  // scores of queries t0 + r: tiles wholly above the diagonal are skipped (the softmax
  // writes their zeros)
  tile_product<kRows>(
      1, rows, keys, [&](int, int r, int i) { return q[r * lq + i]; }, [&](int) { return kT; }, ldT,
      [&](int, int r0, int c0) { return c0 > t0 + r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int, int r, int t2, float dot) { s[r * Ts + t2] = dot * scale; });
  __syncthreads();
  for (int r = threadIdx.x / kWarpSize; r < rows; r += blockDim.x / kWarpSize)  // a warp per query
    causal_softmax_lanes(s + r * Ts, 1, t0 + r, keys);
  __syncthreads();
  float* a = att + (head * T + t0) * T;  // [M,B,H,T,T]: the chunk's queries, zeros past its keys
  for (int idx = threadIdx.x; idx < rows * T; idx += blockDim.x) {
    const int r = idx / T, t2 = idx % T;
    a[idx] = t2 < keys ? s[r * Ts + t2] : 0.0f;
  }
  // out[t0 + r] = sum over t2 of p[r, t2] v[t2]: up to the tile's last query (zeros past each row's own)
  tile_product<kRows>(
      1, rows, hd, [&](int, int r, int t2) { return s[r * Ts + t2]; }, [&](int) { return v; }, hdp,
      [&](int, int r0, int) { return make_int2(0, min(keys, t0 + r0 + kRows)); },
      [&](int, int r, int i, float acc) { out[(seq * T + t0 + r) * C + h * hd + i] = acc; },
      head_product_lanes<kRows>(rows, hd, keys));
}

struct BackwardArgs {
  float* dqkv;
  const float *dout, *out, *qkv, *qkv_bias, *att;
  int B, T, C, H;
  float scale;
};

// The backward's view of head (seq, h) = head: its q, k and v, rows of dy (dout) and
// out, its probabilities, its slices of dqkv.
struct Head {
  HeadQkv x;
  const float *dout, *out, *probs;
  float* grad;
  int T, C, hd;
  __device__ Head(const BackwardArgs& p, int64_t head)
      : x(p.qkv, p.qkv_bias, p.B, p.T, p.C, p.H, head), T(p.T), C(p.C), hd(p.C / p.H) {
    const int64_t seq = head / p.H, channel = head % p.H * hd;  // the head's first channel
    dout = p.dout + seq * T * C + channel;
    out = p.out + seq * T * C + channel;
    probs = p.att + head * T * T;
    grad = p.dqkv + seq * T * 3 * C + channel;
  }
  __device__ auto dy() const {
    return [this](int t, int i) { return dout[int64_t(t) * C + i]; };
  }
  __device__ float* dx(int part, int t) const { return grad + int64_t(t) * 3 * C + part * C; }
};

// The probabilities of queries [t0, t0 + rows) and keys [k0, k0 + keys) into s [rows,
// keys + 1], and pd[u] = dy . out of query t0 + u, its sum over keys of p d(p) (a warp
// per query).
__device__ void load_probabilities(float* s, float* pd, const Head& g, int t0, int rows, int k0, int keys) {
  for (int idx = threadIdx.x; idx < rows * keys; idx += blockDim.x) {
    const int u = idx / keys, j = idx % keys;
    s[u * (keys + 1) + j] = g.probs[int64_t(t0 + u) * g.T + k0 + j];
  }
  const int lane = threadIdx.x % kWarpSize;
  for (int u = threadIdx.x / kWarpSize; u < rows; u += blockDim.x / kWarpSize) {
    const int64_t at = int64_t(t0 + u) * g.C;
    float dot = 0.0f;
    for (int i = lane; i < g.hd; i += kWarpSize) dot += g.dout[at + i] * g.out[at + i];
    dot = warp_sum(dot);
    if (lane == 0) pd[u] = dot;
  }
}

// The score gradients of queries t0 + u (u < rows) and keys k0 + j (j < keys), over
// the probabilities in s [rows, keys + 1]: p (dy . v - pd) scale for keys up to the
// query, 0 after (tiles wholly after the diagonal are skipped: their probabilities are
// the zeros). dy [rows, pad4(hd)], vT [hd, transposed_ld(keys)].
template <int kRows>
__device__ void score_gradients(float* s, const float* dy, const float* vT, const float* pd, int t0, int rows,
                                int k0, int keys, int hd, float scale) {
  const int hdp = pad4(hd), Ts = keys + 1;
  tile_product<kRows>(
      1, rows, keys, [&](int, int u, int i) { return dy[u * hdp + i]; }, [&](int) { return vT; },
      transposed_ld(keys),
      [&](int, int r0, int c0) { return k0 + c0 > t0 + r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int, int u, int j, float dot) {
        s[u * Ts + j] = k0 + j <= t0 + u ? s[u * Ts + j] * (dot - pd[u]) * scale : 0.0f;
      });
}

// dq of queries t0 + u (u < rows) = sum over keys t2 <= t0 + u of d[u, t2] k[t2], from
// the score gradients s [rows, keys + 1] of keys [0, keys) and k [keys, pad4(hd)]: up
// to the tile's last query (zeros past each row's own).
template <int kRows>
__device__ void query_gradients(const Head& g, const float* s, const float* k, int t0, int rows, int keys) {
  const int Ts = keys + 1;
  tile_product<kRows>(
      1, rows, g.hd, [&](int, int u, int t2) { return s[u * Ts + t2]; }, [&](int) { return k; }, pad4(g.hd),
      [&](int, int r0, int) { return make_int2(0, min(keys, t0 + r0 + kRows)); },
      [&](int, int u, int i, float acc) { g.dx(0, t0 + u)[i] = acc; }, head_product_lanes<kRows>(rows, g.hd, keys));
}

// Keys [k0, k0 + keys): dv and dk over the queries t = k0 + u >= k0 (n = T - k0 of
// them); whole (k0 = 0, keys = T), dq too.
template <int kRows>
__device__ void backward_keys(const Head& g, int k0, int keys, bool whole, float scale) {
  extern __shared__ float4 shared4[];
  const int n = g.T - k0, hd = g.hd, hdp = pad4(hd), Ts = keys + 1;
  float* q = reinterpret_cast<float*>(shared4);  // [n, hdp]
  float* dy = q + n * hdp;                       // [n, hdp]
  float* vT = dy + n * hdp;                      // [hd, transposed_ld(keys)]
  float* k = vT + hd * transposed_ld(keys);      // whole: [keys, hdp]
  float* s = k + (whole ? keys * hdp : 0);       // [n, Ts] probabilities, then score gradients
  float* pd = s + n * Ts;                        // [n]
  load_rows(q, hdp, hd, k0, n, g.x.part(0));
  load_rows(dy, hdp, hd, k0, n, g.dy());
  load_transposed(vT, hd, k0, keys, g.x.part(2));
  if (whole) load_rows(k, hdp, hd, 0, keys, g.x.part(1));
  load_probabilities(s, pd, g, k0, n, k0, keys);
  __syncthreads();
  const int lanes = head_product_lanes<kRows>(keys, hd, n);
  // dv[k0 + j] = sum over u >= j of p[u, j] dy[u]: from the tile's first row (zeros before each row's own)
  tile_product<kRows>(
      1, keys, hd, [&](int, int j, int u) { return s[u * Ts + j]; }, [&](int) { return dy; }, hdp,
      [&](int, int r0, int) { return make_int2(r0, n); },
      [&](int, int j, int i, float acc) { g.dx(2, k0 + j)[i] = acc; }, lanes);
  __syncthreads();  // every probability read before it becomes its score's gradient
  score_gradients<kRows>(s, dy, vT, pd, k0, n, k0, keys, hd, scale);
  __syncthreads();
  // dk[k0 + j] = sum over u >= j of d[u, j] q[u]
  tile_product<kRows>(
      1, keys, hd, [&](int, int j, int u) { return s[u * Ts + j]; }, [&](int) { return q; }, hdp,
      [&](int, int r0, int) { return make_int2(r0, n); },
      [&](int, int j, int i, float acc) { g.dx(1, k0 + j)[i] = acc; }, lanes);
  if (whole) query_gradients<kRows>(g, s, k, 0, n, keys);
}

// Queries [t0, t0 + rows): dq over the keys up to the last of them.
template <int kRows>
__device__ void backward_queries(const Head& g, int t0, int rows, float scale) {
  extern __shared__ float4 shared4[];
  const int keys = t0 + rows, hdp = pad4(g.hd);
  float* dy = reinterpret_cast<float*>(shared4);  // [rows, hdp]
  float* vT = dy + rows * hdp;                    // [hd, transposed_ld(keys)]
  float* k = vT + g.hd * transposed_ld(keys);     // [keys, hdp]
  float* s = k + keys * hdp;                      // [rows, keys + 1] probabilities, then score gradients
  float* pd = s + rows * (keys + 1);              // [rows]
  load_rows(dy, hdp, g.hd, t0, rows, g.dy());
  load_transposed(vT, g.hd, 0, keys, g.x.part(2));
  load_rows(k, hdp, g.hd, 0, keys, g.x.part(1));
  load_probabilities(s, pd, g, t0, rows, 0, keys);
  __syncthreads();
  score_gradients<kRows>(s, dy, vT, pd, t0, rows, 0, keys, g.hd, scale);
  __syncthreads();
  query_gradients<kRows>(g, s, k, t0, rows, keys);
}

// Blocks: jobs x heads (head = seq * H + h, fastest). A head of one chunk is one job;
// else 2 x chunks jobs, the ones with the most work first: key chunk 0 (every query
// after it), the last query chunk (every key before it), key chunk 1, and so on.
template <int kRows>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) attention_backward_kernel(const __grid_constant__ BackwardArgs p) {
  const int chunks = chunks_of(p.T);
  const int64_t heads = gridDim.x / (chunks == 1 ? 1 : 2 * chunks), head = blockIdx.x % heads;
  const int job = static_cast<int>(blockIdx.x / heads), c = job / 2;
  const Head g(p, head);
  if (chunks == 1) {
    backward_keys<kRows>(g, 0, p.T, true, p.scale);
  } else if (job % 2 == 0) {
    backward_keys<kRows>(g, c * kChunk, min(kChunk, p.T - c * kChunk), false, p.scale);
  } else {
    const int t0 = (chunks - 1 - c) * kChunk;
    backward_queries<kRows>(g, t0, min(kChunk, p.T - t0), p.scale);
  }
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
  const size_t limit = shared_memory_optin_limit() / sizeof(float);
  int T = 1;
  while (std::max(forward_shared_floats(T + 1, head_dim), backward_shared_floats(T + 1, head_dim)) <= limit) ++T;
  return T;
}

void attention_forward(float* out, float* att, const float* qkv, const float* qkv_bias, int M, int B, int T, int C,
                       int H, cudaStream_t stream) {
  const int hd = C / H;
  const size_t shared = forward_shared_floats(T, hd) * sizeof(float);
  auto kernel = tile_rows_for(T) == 4 ? attention_forward_kernel<4> : attention_forward_kernel<1>;
  kernel<<<M * B * H * chunks_of(T), kThreads, shared, stream>>>(out, att, qkv, qkv_bias, B, T, C, H,
                                                                            attention_scale(hd));
  UNIV_CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dqkv, const float* dout, const float* out, const float* qkv, const float* qkv_bias,
                        const float* att, int M, int B, int T, int C, int H, cudaStream_t stream) {
  const int hd = C / H, chunks = chunks_of(T);
  const size_t shared = backward_shared_floats(T, hd) * sizeof(float);
  auto kernel = tile_rows_for(T) == 4 ? attention_backward_kernel<4> : attention_backward_kernel<1>;
  const BackwardArgs args{dqkv, dout, out, qkv, qkv_bias, att, B, T, C, H, attention_scale(hd)};
  kernel<<<M * B * H * (chunks == 1 ? 1 : 2 * chunks), kThreads, shared, stream>>>(args);
  UNIV_CUDA_CHECK_LAUNCH();
}

}  // namespace univ::cuda
