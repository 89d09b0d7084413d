// Causal multi-head attention, fused, scores in shared memory: a block per head where
// the head's whole layout fits in a block's shared memory, else blocks per chunk of 32
// queries or keys (sequences up to 581 at head width 32). The forward's block (model,
// sequence, head, chunk of queries) holds the keys and values up to its chunk's last
// query and the chunk's scores, adds the QKV bias as it loads (qkv stays as it is) and
// writes the softmax probabilities for the backward. The backward takes each query's
// sum over keys of p d(p) as dy . out (flash-attention's identity), so a block can form
// d(scores) from its own chunk's probabilities: a block per chunk of keys adds their dk
// and dv over the later queries, and a block per chunk of queries their dq over the
// earlier keys, each from its own d(scores) (the dy . v product twice, but no sums
// across blocks). A whole head is one block that does both, and where T < 64 and the
// block fits in 48 KiB the products at the attention's ends run in the block too: the
// forward's q, k and v from the norm before it, the backward's dy from the gradient at
// the projection after it (a graph node each way fewer).
#include <cmath>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

// A head is one chunk where it fits: at T = 128 and head width 32 (the large
// configuration) the backward of a whole head's 1024-thread block took 182-191 us per
// layer on an H100 where chunks of 32 in 256-thread blocks, four per SM, took 259 (they
// load a head's operands once per chunk, and form dy . v twice); the forward took 130
// us either way. Chunks of kChunk beyond. Blocks of 256 threads (four per SM where
// their shared memory allows it), of 1024 for a whole head from T = 64 (one fills an
// SM): at most 64 registers per thread either way.
constexpr int kChunk = 32;
constexpr int kThreads = 256, kBlocksPerSM = 4, kWholeHeadThreads = 1024;

__host__ __device__ constexpr int chunks_of(int T, int chunk) { return (T + chunk - 1) / chunk; }

// Shared-memory layouts: rows padded as common.cuh's pad4 and transposed_ld say; score
// rows of n keys padded by one (n + 1), so that threads reading different rows at one
// column hit different banks. The largest a launch's blocks need:
size_t forward_shared_floats(int T, int chunk, int hd) {  // kT, v up to T keys; q, s of a chunk
  const size_t rows = std::min(T, chunk);
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
size_t backward_shared_floats(int T, int chunk, int hd) {  // the first key chunk's, the last query chunk's
  if (chunks_of(T, chunk) == 1) return key_block_floats(T, T, hd, true);
  return std::max(key_block_floats(T, chunk, hd, false), query_block_floats(chunk, T, hd));
}
// The products in the block stage, before the layouts above, the head's weight columns
// (q, k and v's [3, C, pad4(hd)] forward, the projection's [C, pad4(hd)] backward), then
// the sequence's T rows of their input [T, odd_ld(C)], padded to keep what follows
// aligned for four-float reads.
__host__ __device__ constexpr int odd_ld(int C) { return C | 1; }  // rows at one k in distinct banks
__host__ __device__ constexpr int product_floats(int T, int C, int hd, int parts) {
  return parts * C * pad4(hd) + pad4(T * odd_ld(C));
}

// The queries or keys per block: T where a whole head fits, else kChunk.
int chunk_for(int T, int hd) {
  const size_t limit = shared_memory_optin_limit() / sizeof(float);
  return std::max(forward_shared_floats(T, T, hd), backward_shared_floats(T, T, hd)) <= limit ? T : kChunk;
}

// Tiles of four rows from T = 64 (blocks with many tiles per thread), of one row below
// that (short k loops).
int tile_rows_for(int T) { return T >= 64 ? 4 : 1; }
int threads_for(int T, int chunk) { return chunk == T && T >= 64 ? kWholeHeadThreads : kThreads; }

// Where the products run in the block: a whole head in tiles of one row (the kernels'
// product path), and a block within the 48 KiB any kernel may use (four blocks per SM).
constexpr size_t kProductBlockBytes = 48 * 1024;
bool products_fit(int T, int C, int H) {
  const int hd = C / H;
  const size_t floats = std::max(forward_shared_floats(T, T, hd) + product_floats(T, C, hd, 3),
                                 backward_shared_floats(T, T, hd) + product_floats(T, C, hd, 1));
  return chunk_for(T, hd) == T && tile_rows_for(T) == 1 && floats * sizeof(float) <= kProductBlockBytes;
}

// Lanes per tile of the products of `rows` queries or keys and the head's channels, sums
// over up to `depth` keys or queries: they have few tiles for the block's threads.
template <int kRows>
__device__ int head_product_lanes(int rows, int hd, int depth) {
  return lanes_per_tile(ceil_div(rows, kRows) * ceil_div(hd, 4), blockDim.x, depth);
}

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

struct ForwardArgs {
  float *out, *att;
  const float *qkv, *qkv_bias;
  const float *ln, *qkv_w;  // set: qkv_out = ln qkv_w^T here ([M,B,T,C], [M,3C,C]), qkv unread
  float* qkv_out;
  int B, T, C, H;
  int chunk;  // queries per block
  float scale;
  bool embed;               // ln is embedding's norm, formed here
  EmbeddingNorm embedding;
};

// Stages into w [parts, C, pad4(hd)] (at the front of shared memory) the weight columns
// weight(e, k, i) of the head's channels i < hd, zeros to the pad (the products read
// four at a time); returns where the rows go after them, x [T, odd_ld(C)]. The threads
// run along what is contiguous in memory: kAlongK (the QKV weight, whose rows run
// along k), 4 k (fastest) x 8 channels per warp, so that a warp's load touches 8
// sectors of 32 bytes where the channels fastest touched 16 (rows C floats apart);
// else (the projection, whose rows run along the channels) the channels fastest.
template <bool kAlongK, class Weight>
__device__ float* stage_weights(float* w, int C, int hd, int parts, const Weight& weight) {
  const int hdp = pad4(hd), Cp = pad4(C);
  for (int idx = threadIdx.x; idx < parts * (kAlongK ? Cp : C) * hdp; idx += blockDim.x) {
    int i, k, e;
    if (kAlongK)
      i = idx / 4 % hdp, k = idx / (4 * hdp) % (Cp / 4) * 4 + idx % 4, e = idx / (Cp * hdp);
    else
      i = idx % hdp, k = idx / hdp % C, e = idx / (hdp * C);
    if (k < C) w[(e * C + k) * hdp + i] = i < hd ? weight(e, k, i) : 0.0f;
  }
  return w + parts * C * hdp;
}

// The sequence's rows of `in` [T, C] into x [T, odd_ld(C)].
__device__ void stage_rows(float* x, const float* __restrict__ in, int T, int C) {
  for (int idx = threadIdx.x; idx < T * C; idx += blockDim.x) x[idx / C * odd_ld(C) + idx % C] = in[idx];
}

// The sequence's rows of the first layer's norm into x [T, odd_ld(C)], as
// embedding_layernorm_forward forms them (a warp per row, the same lane functions):
// encoded = wte[token] + pos, then its norm; `writer` (one block per sequence) also
// writes encoded, the norm, mean and rstd. Not inlined: inlined, the forward kernel
// spilled 32 bytes at its 64 registers (ptxas, sm_90); called, neither spills.
__device__ __noinline__ void embed_rows(float* x, const EmbeddingNorm& e, int64_t seq, int64_t m, int T, int C, bool writer) {
  const int lane = threadIdx.x % kWarpSize;
  for (int t = threadIdx.x / kWarpSize; t < T; t += blockDim.x / kWarpSize) {
    const int64_t row = seq * T + t;
    const float* token_row = e.wte + (m * e.V + e.tokens[row]) * C;
    const float* pos_row = e.pos + m * e.pos_model_stride + int64_t(t) * C;
    float* xr = x + t * odd_ld(C);
    float sum = 0.0f;
    for (int c = lane; c < C; c += kWarpSize) {
      const float v = token_row[c] + pos_row[c];
      xr[c] = v;  // read back below by this lane only
      if (writer) e.encoded[row * C + c] = v;
      sum += v;
    }
    const float2 stats = normalize_lanes(xr, 1, xr, 1, sum, e.norm_w + m * C, e.norm_b + m * C, C);
    if (!writer) continue;
    for (int c = lane; c < C; c += kWarpSize) e.out[row * C + c] = xr[c];
    if (lane == 0) e.mean[row] = stats.x, e.rstd[row] = stats.y;
  }
}

// A head of one chunk: its q, k and v from the norm before it, ln qkv_w^T, written to
// qkv without the bias (for the backward) and with it into q [T, hd + 1], kT [hd,
// transposed_ld(T)] (rows past T zero) and v [T, pad4(hd)].
__device__ void head_qkv_product(float* q, float* kT, float* v, float* w, const ForwardArgs& p, int64_t head) {
  const int T = p.T, C = p.C, hd = C / p.H, hdp = pad4(hd), h = static_cast<int>(head % p.H), ldT = transposed_ld(T);
  const int64_t seq = head / p.H, m = seq / p.B;
  const float* qkv_w = p.qkv_w + m * 3 * C * C + int64_t(h) * hd * C;  // row (e C + h hd + i) at e C^2 + i C
  float* x =
      stage_weights<true>(w, C, hd, 3, [&](int e, int k, int i) { return qkv_w[(int64_t(e) * C + i) * C + k]; });
  if (p.embed)
    embed_rows(x, p.embedding, seq, m, T, C, h == 0);
  else
    stage_rows(x, p.ln + seq * T * C, T, C);
  for (int idx = threadIdx.x; idx < hd * (pad4(T) - T); idx += blockDim.x)
    kT[idx / (pad4(T) - T) * ldT + T + idx % (pad4(T) - T)] = 0.0f;
  __syncthreads();
  const float* bias = p.qkv_bias ? p.qkv_bias + m * 3 * C + h * hd : nullptr;
  float* qkv = p.qkv_out + seq * T * 3 * C + h * hd;
  tile_product<1>(
      3, T, hdp, [&](int, int t, int k) { return x[t * odd_ld(C) + k]; }, [&](int e) { return w + e * C * hdp; },
      hdp, [&](int, int, int) { return make_int2(0, C); },
      [&](int e, int t, int i, float acc) {
        // (read-only loads: they need not wait for the stores before them)
        const float value = bias && i < hd ? acc + __ldg(bias + e * C + i) : acc;  // pad columns: zeros
        if (i < hd) qkv[int64_t(t) * 3 * C + e * C + i] = acc;
        if (e == 0 && i < hd) q[t * (hd + 1) + i] = value;
        if (e == 1 && i < hd) kT[i * ldT + t] = value;
        if (e == 2) v[t * hdp + i] = value;
      },
      lanes_per_tile(3 * T * (hdp / 4), blockDim.x, C));
}

template <int kRows>
__global__ void __launch_bounds__(kRows == 4 ? kWholeHeadThreads : kThreads, kRows == 4 ? 1 : kBlocksPerSM)
    attention_forward_kernel(const __grid_constant__ ForwardArgs p) {
  chain_after_prior_grids();
  extern __shared__ float4 shared4[];
  // The chunks with the most keys first (blocks start about in index order, so the
  // grid's tail has the short ones), each over all heads (head = seq * H + h).
  const int T = p.T, C = p.C;
  const int chunks = chunks_of(T, p.chunk);
  const int64_t heads = gridDim.x / chunks, head = blockIdx.x % heads, seq = head / p.H;
  const int h = static_cast<int>(head % p.H), chunk = chunks - 1 - static_cast<int>(blockIdx.x / heads);
  const int t0 = chunk * p.chunk, rows = min(T - t0, p.chunk), keys = t0 + rows;
  const int hd = C / p.H, hdp = pad4(hd), ldT = transposed_ld(keys), Ts = keys + 1, lq = hd + 1;
  const bool product = kRows == 1 && p.ln;  // (one chunk: tiles of one row)
  float* staged = reinterpret_cast<float*>(shared4);                 // product: its operands
  float* kT = staged + (product ? product_floats(T, C, hd, 3) : 0);  // [hd, ldT]: k transposed
  float* v = kT + hd * ldT;                                          // [keys, hdp]
  float* q = v + keys * hdp;  // [rows, hd + 1]: queries t0, t0 + 1, ...
  float* s = q + rows * lq;   // [rows, Ts] scores, then probabilities
  if (product) {
    head_qkv_product(q, kT, v, staged, p, head);
  } else {
    const HeadQkv g(p.qkv, p.qkv_bias, p.B, T, C, p.H, head);
    load_transposed(kT, hd, 0, keys, g.part(1));
    load_rows(v, hdp, hd, 0, keys, g.part(2));
    load_rows(q, lq, hd, t0, rows, g.part(0));
  }
  __syncthreads();
  // scores of queries t0 + r: tiles wholly above the diagonal are skipped (the softmax
  // writes their zeros)
  tile_product<kRows>(
      1, rows, keys, [&](int, int r, int i) { return q[r * lq + i]; }, [&](int) { return kT; }, ldT,
      [&](int, int r0, int c0) { return c0 > t0 + r0 + kRows - 1 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int, int r, int t2, float dot) { s[r * Ts + t2] = dot * p.scale; });
  __syncthreads();
  for (int r = threadIdx.x / kWarpSize; r < rows; r += blockDim.x / kWarpSize)  // a warp per query
    causal_softmax_lanes(s + r * Ts, 1, t0 + r, keys);
  __syncthreads();
  float* a = p.att + (head * T + t0) * T;  // [M,B,H,T,T]: the chunk's queries, zeros past its keys
  for (int idx = threadIdx.x; idx < rows * T; idx += blockDim.x) {
    const int r = idx / T, t2 = idx % T;
    a[idx] = t2 < keys ? s[r * Ts + t2] : 0.0f;
  }
  // out[t0 + r] = sum over t2 of p[r, t2] v[t2]: up to the tile's last query (zeros past each row's own)
  tile_product<kRows>(
      1, rows, hd, [&](int, int r, int t2) { return s[r * Ts + t2]; }, [&](int) { return v; }, hdp,
      [&](int, int r0, int) { return make_int2(0, min(keys, t0 + r0 + kRows)); },
      [&](int, int r, int i, float acc) { p.out[(seq * T + t0 + r) * C + h * hd + i] = acc; },
      head_product_lanes<kRows>(rows, hd, keys));
}

struct BackwardArgs {
  float* dqkv;
  const float *dout, *out, *qkv, *qkv_bias, *att;
  const float *dproj, *proj_w;  // set: dout = dproj proj_w here ([M,B,T,C], [M,C,C])
  int B, T, C, H;
  float scale;
  int chunk;  // queries or keys per block
};

// The backward's view of head (seq, h) = head: its q, k and v, rows of dy (dout) and
// out, its probabilities, its slices of dqkv.
struct Head {
  HeadQkv x;
  const float *dout, *out, *probs, *dproj, *proj_w;
  float* grad;
  int T, C, hd;
  __device__ Head(const BackwardArgs& p, int64_t head)
      : x(p.qkv, p.qkv_bias, p.B, p.T, p.C, p.H, head), T(p.T), C(p.C), hd(p.C / p.H) {
    const int64_t seq = head / p.H, channel = head % p.H * hd;  // the head's first channel
    dout = p.dout ? p.dout + seq * T * C + channel : nullptr;
    out = p.out + seq * T * C + channel;
    probs = p.att + head * T * T;
    grad = p.dqkv + seq * T * 3 * C + channel;
    dproj = p.dproj ? p.dproj + seq * T * C : nullptr;
    proj_w = p.proj_w ? p.proj_w + seq / p.B * C * C + channel : nullptr;  // column `channel` of model seq / B's
  }
  __device__ auto dy() const {
    return [this](int t, int i) { return dout[int64_t(t) * C + i]; };
  }
  __device__ float* dx(int part, int t) const { return grad + int64_t(t) * 3 * C + part * C; }
};

// The probabilities of queries [t0, t0 + rows) and keys [k0, k0 + keys) into s [rows,
// keys + 1].
__device__ void load_probabilities(float* s, const Head& g, int t0, int rows, int k0, int keys) {
  for (int idx = threadIdx.x; idx < rows * keys; idx += blockDim.x) {
    const int u = idx / keys, j = idx % keys;
    s[u * (keys + 1) + j] = g.probs[int64_t(t0 + u) * g.T + k0 + j];
  }
}

// pd[u] = dy . out of query t0 + u (u < rows; dy [rows, pad4(hd)] in shared memory), its
// sum over keys of p d(p) (a warp per query).
__device__ void output_dots(float* pd, const float* dy, const Head& g, int t0, int rows) {
  const int lane = threadIdx.x % kWarpSize;
  for (int u = threadIdx.x / kWarpSize; u < rows; u += blockDim.x / kWarpSize) {
    const int64_t at = int64_t(t0 + u) * g.C;
    float dot = 0.0f;
    for (int i = lane; i < g.hd; i += kWarpSize) dot += dy[u * pad4(g.hd) + i] * g.out[at + i];
    dot = warp_sum(dot);
    if (lane == 0) pd[u] = dot;
  }
}

// A head of one chunk: dy [T, pad4(hd)] = dproj proj_w of the head's channels (zeros to
// the pad), the gradient at the projection's input, from operands staged at `staged`.
__device__ void head_output_gradient(float* dy, float* staged, const Head& g) {
  const int T = g.T, C = g.C, hdp = pad4(g.hd);
  float* x =
      stage_weights<false>(staged, C, g.hd, 1, [&](int, int o, int i) { return g.proj_w[int64_t(o) * C + i]; });
  stage_rows(x, g.dproj, T, C);
  __syncthreads();
  tile_product<1>(
      1, T, hdp, [&](int, int t, int o) { return x[t * odd_ld(C) + o]; }, [&](int) { return staged; }, hdp,
      [&](int, int, int) { return make_int2(0, C); }, [&](int, int t, int i, float acc) { dy[t * hdp + i] = acc; },
      head_product_lanes<1>(T, hdp, C));
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
  const bool product = kRows == 1 && g.dproj;  // (one chunk: tiles of one row)
  float* staged = reinterpret_cast<float*>(shared4);                    // product: dy's operands
  float* q = staged + (product ? product_floats(g.T, g.C, hd, 1) : 0);  // [n, hdp]
  float* dy = q + n * hdp;                                             // [n, hdp]
  float* vT = dy + n * hdp;                                            // [hd, transposed_ld(keys)]
  float* k = vT + hd * transposed_ld(keys);                            // whole: [keys, hdp]
  float* s = k + (whole ? keys * hdp : 0);  // [n, Ts] probabilities, then score gradients
  float* pd = s + n * Ts;                   // [n]
  load_rows(q, hdp, hd, k0, n, g.x.part(0));
  load_transposed(vT, hd, k0, keys, g.x.part(2));
  if (whole) load_rows(k, hdp, hd, 0, keys, g.x.part(1));
  load_probabilities(s, g, k0, n, k0, keys);
  if (product)
    head_output_gradient(dy, staged, g);
  else
    load_rows(dy, hdp, hd, k0, n, g.dy());
  __syncthreads();
  output_dots(pd, dy, g, k0, n);
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
  load_probabilities(s, g, t0, rows, 0, keys);
  __syncthreads();
  output_dots(pd, dy, g, t0, rows);
  __syncthreads();
  score_gradients<kRows>(s, dy, vT, pd, t0, rows, 0, keys, g.hd, scale);
  __syncthreads();
  query_gradients<kRows>(g, s, k, t0, rows, keys);
}

// Blocks: jobs x heads (head = seq * H + h, fastest). A head of one chunk is one job;
// else 2 x chunks jobs, the ones with the most work first: key chunk 0 (every query
// after it), the last query chunk (every key before it), key chunk 1, and so on.
template <int kRows>
__global__ void __launch_bounds__(kRows == 4 ? kWholeHeadThreads : kThreads, kRows == 4 ? 1 : kBlocksPerSM)
    attention_backward_kernel(const __grid_constant__ BackwardArgs p) {
  chain_after_prior_grids();
  const int chunks = chunks_of(p.T, p.chunk);
  const int64_t heads = gridDim.x / (chunks == 1 ? 1 : 2 * chunks), head = blockIdx.x % heads;
  const int job = static_cast<int>(blockIdx.x / heads), c = job / 2;
  const Head g(p, head);
  if (chunks == 1) {
    backward_keys<kRows>(g, 0, p.T, true, p.scale);
  } else if (job % 2 == 0) {
    backward_keys<kRows>(g, c * p.chunk, min(p.chunk, p.T - c * p.chunk), false, p.scale);
  } else {
    const int t0 = (chunks - 1 - c) * p.chunk;
    backward_queries<kRows>(g, t0, min(p.chunk, p.T - t0), p.scale);
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
  prepare_attention_flash_kernels();
}

int attention_max_seq_len(int head_dim) {
  const size_t limit = shared_memory_optin_limit() / sizeof(float);
  int T = 1;
  while (std::max(forward_shared_floats(T + 1, kChunk, head_dim), backward_shared_floats(T + 1, kChunk, head_dim)) <=
         limit)
    ++T;
  return T;
}

namespace {

// p.chunk is set here.
void launch_forward(ForwardArgs p, int M, cudaStream_t stream) {
  const int hd = p.C / p.H;
  p.chunk = chunk_for(p.T, hd);
  const size_t shared =
      (forward_shared_floats(p.T, p.chunk, hd) + (p.ln ? product_floats(p.T, p.C, hd, 3) : 0)) * sizeof(float);
  auto kernel = tile_rows_for(p.T) == 4 ? attention_forward_kernel<4> : attention_forward_kernel<1>;
  launch_chained(kernel, M * p.B * p.H * chunks_of(p.T, p.chunk), threads_for(p.T, p.chunk), shared, stream, p);
}

void launch_backward(BackwardArgs p, int M, cudaStream_t stream) {
  const int hd = p.C / p.H;
  p.chunk = chunk_for(p.T, hd);
  const int chunks = chunks_of(p.T, p.chunk);
  const size_t shared =
      (backward_shared_floats(p.T, p.chunk, hd) + (p.dproj ? product_floats(p.T, p.C, hd, 1) : 0)) * sizeof(float);
  auto kernel = tile_rows_for(p.T) == 4 ? attention_backward_kernel<4> : attention_backward_kernel<1>;
  launch_chained(kernel, M * p.B * p.H * (chunks == 1 ? 1 : 2 * chunks), threads_for(p.T, p.chunk), shared, stream,
                 p);
}

}  // namespace

void attention_forward(float* out, float* att, const float* qkv, const float* qkv_bias, int M, int B, int T, int C,
                       int H, cudaStream_t stream) {
  ForwardArgs p{};
  p.out = out, p.att = att, p.qkv = qkv, p.qkv_bias = qkv_bias, p.B = B, p.T = T, p.C = C, p.H = H;
  p.scale = attention_scale(C / H);
  launch_forward(p, M, stream);
}

void attention_backward(float* dqkv, const float* dout, const float* out, const float* qkv, const float* qkv_bias,
                        const float* att, int M, int B, int T, int C, int H, cudaStream_t stream) {
  launch_backward({dqkv, dout, out, qkv, qkv_bias, att, nullptr, nullptr, B, T, C, H, attention_scale(C / H)}, M,
                  stream);
}

bool attention_keeps_probabilities(int T, int C, int H, bool tf32, bool for_backward, bool with_lse) {
  return !attention_flash_fits(T, C, H, false, tf32) ||
         (for_backward && !(with_lse && attention_flash_recomputes(T, C, H, tf32)));
}

void attention_forward_with_products(cublasHandle_t handle, const AttentionWithProducts& a, int M) {
  const EmbeddingNorm* e = a.embedding;
  const float* ln = e ? e->out : a.ln;
  const bool flash = attention_flash_fits(a.T, a.C, a.H, false, a.tf32);
  if (a.apart || flash || !products_fit(a.T, a.C, a.H) || !ln) {
    if (e) {
      RowProduct qkv = linear_product(a.qkv, ln, a.qkv_w, a.B * a.T, a.C, 3 * a.C);
      qkv.apart = a.apart;
      embedding_linear(handle, *e, qkv, M, a.B, a.T);
    } else if (ln) {
      matmul_forward(handle, a.qkv, ln, a.qkv_w, M, a.B * a.T, a.C, 3 * a.C);
    }
    if (flash) {
      const bool keep_att = attention_keeps_probabilities(a.T, a.C, a.H, a.tf32, a.for_backward, a.lse != nullptr);
      return attention_forward_flash(a.out, keep_att ? a.att : nullptr,
                                     a.for_backward && !keep_att ? a.lse : nullptr, a.qkv, a.qkv_b, M, a.B, a.T, a.C,
                                     a.H, a.tf32, stream_of(handle));
    }
    return attention_forward(a.out, a.att, a.qkv, a.qkv_b, M, a.B, a.T, a.C, a.H, stream_of(handle));
  }
  ForwardArgs p{};
  p.out = a.out, p.att = a.att, p.qkv_bias = a.qkv_b, p.ln = ln, p.qkv_w = a.qkv_w, p.qkv_out = a.qkv;
  if (e) p.embedding = *e, p.embed = true;
  p.B = a.B, p.T = a.T, p.C = a.C, p.H = a.H, p.scale = attention_scale(a.C / a.H);
  launch_forward(p, M, stream_of(handle));
}

void attention_backward_with_products(cublasHandle_t handle, const AttentionWithProducts& a, int M) {
  const bool flash = attention_flash_fits(a.T, a.C, a.H, true, a.tf32);
  if (a.apart || flash || !products_fit(a.T, a.C, a.H) || !a.dproj) {
    if (a.dproj) matmul_backward_input(handle, a.datty, a.dproj, a.proj_w, M, a.B * a.T, a.C, a.C);
    if (flash) {
      const bool recompute = a.lse && attention_flash_recomputes(a.T, a.C, a.H, a.tf32);
      return attention_backward_flash(a.dqkv, a.datty, a.out, a.qkv, a.qkv_b, recompute ? nullptr : a.att,
                                      recompute ? a.lse : nullptr, M, a.B, a.T, a.C, a.H, a.tf32, stream_of(handle));
    }
    return attention_backward(a.dqkv, a.datty, a.out, a.qkv, a.qkv_b, a.att, M, a.B, a.T, a.C, a.H,
                              stream_of(handle));
  }
  launch_backward({a.dqkv, nullptr, a.out, a.qkv, a.qkv_b, a.att, a.dproj, a.proj_w, a.B, a.T, a.C, a.H,
                   attention_scale(a.C / a.H)},
                  M, stream_of(handle));
}

}  // namespace univ::cuda
