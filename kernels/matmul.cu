// Linear layers, PyTorch's [out, in] weights in row-major memory (llm.c's operand
// order), batched over the model axis: cuBLAS strided-batched GEMMs, except where the
// products are small (a tiny model's few thousand rows, short reductions) and what
// reads their output next fits in this file's own kernel's epilogue: the MLP's bias +
// activation (forward) and the activation's derivative (backward), and where a tile
// holds whole rows (at most 64 columns) the layer norm after a layer's bias and
// residual, the cross-entropy after the logits, and the layer norm's backward after
// an input gradient; and a narrow MLP sublayer's two products, each way, in one
// kernel, with such row products of the same rows before and after it, or after it a
// product of those rows with no row op (the next layer's QKV product, the gradient at
// the attention's projection's input). Where they do not fit, cuBLAS and the op's own
// kernel.
// The weight gradient, a long reduction over N rows into a small output, is split
// over row blocks as extra batches and the partial products added in order
// (ColumnSums' stage 2): a deterministic split-K.
#include <stdexcept>
#include <vector>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kMaxSplits = 16;             // row blocks per model of the weight gradient ...
constexpr int kMinSplitRows = 32;          // ... each at least this many rows ...
constexpr int64_t kSplitOutputs = 1 << 17;  // ... where all M outputs hold fewer floats

// No split for outputs of kSplitOutputs floats or more, which give cuBLAS tiles enough
// (measured on an H200: 256 x 1024 ran near the fp32 peak unsplit and lost 7% split in
// 16, while 2 x 256 x 64 ran twice as fast split); else the largest power of two up to
// kMaxSplits that divides N into blocks of at least kMinSplitRows rows: equal blocks
// keep one batch stride over (model, block).
int weight_grad_splits(int M, int N, int C, int OC) {
  int splits = 1;
  if (int64_t(M) * OC * C >= kSplitOutputs) return splits;
  while (splits < kMaxSplits && N % (2 * splits) == 0 && N / (2 * splits) >= kMinSplitRows) splits *= 2;
  return splits;
}

// The small-shape product, out[m] [R, P] = a[m] [R, K] times b[m], b [P, K] (kBByRow:
// a weight W read as W^T) or [K, P]. Block (column tile, row tile, model) of one group
// (element epilogues) or kRowGroups groups (row epilogues) of 16 x 8 threads; thread
// (x, y) of a group owns rows 4y .. 4y + 3 and columns 4x .. 4x + 3 of a 32 x 64 tile
// and adds its products in k order over the group's tiles of the reduction (group g of
// G: tiles g, g + G, ...); the groups' sums then add up in group order. Tiles come through shared memory, the next one loaded into
// registers while the current one is used; each k takes two 16-byte shared loads per
// 16 multiply-adds (one float per multiply-add, as in a plain loop, would leave the
// kernel waiting on shared memory). On an H100 one group took about 10 us where
// cuBLAS takes 9.3 for the product alone, so it runs only where it saves a kernel.
// Epilogues per element, from each thread's registers: bias_activation (out = pre =
// product + bias[m, col], post = act(pre)); activation_grad (out = product *
// act'(pre)). Per row, where the tile holds whole rows (P <= 64), from the summed tile
// in shared memory, a warp per row with the row kernels' own lane functions (so each
// row's result is theirs for the same product): add_layernorm (out = product +
// bias[m] + residual, then its layer norm), crossentropy (out = the logits, or their
// gradient, and the row's loss), layernorm_backward (out = the norm's output
// gradient, then the gradient at its input), store (out = the product: a stage of the
// MLP's kernel).
enum class Epilogue { bias_activation, activation_grad, add_layernorm, crossentropy, layernorm_backward, store };
__host__ __device__ constexpr bool per_row(Epilogue e) { return e >= Epilogue::add_layernorm; }
constexpr int kTileRows = 32, kTileCols = 64;
constexpr int kThreadsX = kTileCols / 4, kThreadsY = kTileRows / 4, kThreads = kThreadsX * kThreadsY;
// The own kernel up to this many outputs (all models) and this long a reduction per
// group; more tiles of K each wait on their loads, where cuBLAS's pipelines are ahead.
constexpr int64_t kSmallOutputs = 1 << 20;
constexpr int kSmallK = 64;
// The row epilogues' groups: with 128 tiles of 32 rows (a seed step's products) one
// group would leave an SM four warps, and reductions up to 4 x 64 stay as short as
// the one-group kernel's.
constexpr int kRowGroups = 4;
// A group's reduction slice: 16 deep with kRowGroups groups, to keep their tiles within
// 48 KiB of static shared memory.
__host__ __device__ constexpr int tile_k(int groups) { return groups == 1 ? 32 : 16; }

// A product with the element epilogues' operands beside the row epilogues' (RowProduct).
struct SmallProduct : RowProduct {
  float* post;        // bias_activation: act(out); its bias: RowProduct's
  const float* pre;   // activation_grad: [M, R, P]
  Act act;
  float* norm_partials;  // layernorm_backward with dnorm_w: [2, M, R / 32 tiles, P] (norm_param_partials)
};

// Row r of the block's summed tile x (one warp, global row `row` of model m; store:
// columns col0.. of it).
template <Epilogue kEpilogue>
__device__ void row_epilogue(const SmallProduct& p, float* x, int64_t m, int row, int col0) {
  const int lane = threadIdx.x % kWarpSize, P = p.P;
  const int64_t at = (m * p.R + row) * P;
  if (kEpilogue == Epilogue::add_layernorm) {  // as add_layernorm_forward
    // the lane's residuals loaded before the stores below (P <= kTileCols)
    constexpr int kLaneCols = kTileCols / kWarpSize;
    float residual[kLaneCols];
#pragma unroll
    for (int q = 0; q < kLaneCols; ++q)
      residual[q] = lane + q * kWarpSize < P ? p.residual[at + lane + q * kWarpSize] : 0.0f;
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < kLaneCols && lane + q * kWarpSize < P; ++q) {
      const int c = lane + q * kWarpSize;
      float v = x[c] + __ldg(p.bias + m * P + c);
      v += residual[q];
      x[c] = v;  // read back below by this lane only
      p.out[at + c] = v;
      sum += v;
    }
    const float2 stats = normalize_lanes(p.norm_out + at, 1, x, 1, sum, p.norm_w + m * P, p.norm_b + m * P, P);
    if (lane == 0) {
      p.mean[m * p.R + row] = stats.x;
      p.rstd[m * p.R + row] = stats.y;
    }
  } else if (kEpilogue == Epilogue::crossentropy) {  // as crossentropy_forward_backward
    const float loss = crossentropy_lanes(x, 1, p.targets[m * p.R + row], P, p.R, p.backward);
    for (int c = lane; c < P; c += kWarpSize) p.out[at + c] = x[c];
    if (lane == 0) p.row_loss[m * p.R + row] = loss;
  } else if (kEpilogue == Epilogue::store) {
    for (int c = lane; c < min(kTileCols, P - col0); c += kWarpSize) p.out[at + col0 + c] = x[c];
  } else {  // layernorm_backward, as layernorm_backward_input
    for (int c = lane; c < P; c += kWarpSize) p.out[at + c] = x[c];
    layernorm_backward_lanes(p.dinp + at, p.dinp_in ? p.dinp_in + at : nullptr, 1, x, 1, p.norm_in + at, 1,
                             p.norm_w + m * P, p.saved_mean[m * p.R + row], p.saved_rstd[m * p.R + row], P);
  }
}

constexpr int kAStride = kTileRows + 4, kBStride = kTileCols + 4;  // padded rows, 16-byte aligned
constexpr int kRowLd = kTileCols + 4;                             // the row epilogues' summed tile
__host__ __device__ constexpr int group_floats(int tile_k) { return tile_k * (kAStride + kBStride); }

// One k of a thread's 4 x 4 outputs: acc[i][j] += a[i] b[j].
__device__ inline void add_outer_product(float (&acc)[4][4], float4 a, float4 b) {
  const float ar[4] = {a.x, a.y, a.z, a.w}, br[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
}

// acc += one group's 32 x 64 tile (rows row0.., columns col0..) of a [R, K] times b
// ([P, K] by row, else [K, P]; both of one model) over the reduction's tiles k_first,
// k_first + k_step, ... (`trips` of them, the same for every group, since the barriers
// are the block's; a tile past K loads zeros), staged through the group's a_tile[k][row]
// and b_tile[k][col], the next tile loaded into registers while the current one is
// used. Thread tid of the group owns rows 4 ty .. 4 ty + 3 and columns 4 tx .. 4 tx + 3.
template <bool kBByRow, int kTileK>
__device__ void group_tile_product(float (&acc)[4][4], const float* a, const float* b, int R, int P, int K, int row0,
                                   int col0, int k_first, int k_step, int trips, float* a_tile, float* b_tile,
                                   int tid) {
  constexpr int kALoads = kTileRows * kTileK / kThreads, kBLoads = kTileCols * kTileK / kThreads;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  // Thread tid loads rows (or columns) tid / width + i * step of its operand's tile at
  // the one offset tid % width: one pointer and one stride per operand.
  constexpr int kAStep = kThreads / kTileK, kBStep = kThreads / (kBByRow ? kTileK : kTileCols);
  const int a_k = tid % kTileK, a_r = row0 + tid / kTileK;
  const float* a_at = a + int64_t(a_r) * K + a_k;
  const int64_t a_stride = int64_t(kAStep) * K;
  const int b_in = kBByRow ? tid % kTileK : tid % kTileCols;          // k (by row) or column
  const int b_out = kBByRow ? col0 + tid / kTileK : tid / kTileCols;  // column (by row) or k
  const float* b_at = b + (kBByRow ? int64_t(b_out) * K + b_in : int64_t(b_out) * P + col0 + b_in);
  const int64_t b_stride = int64_t(kBStep) * (kBByRow ? K : P);
  float a_next[kALoads], b_next[kBLoads];
  auto load = [&](int k0) {  // tile k0 into registers, zeros past the edges
    const bool a_in = k0 + a_k < K;
#pragma unroll
    for (int i = 0; i < kALoads; ++i) a_next[i] = a_in && a_r + i * kAStep < R ? a_at[i * a_stride + k0] : 0.0f;
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      if (kBByRow)
        b_next[i] = k0 + b_in < K && b_out + i * kBStep < P ? b_at[i * b_stride + k0] : 0.0f;
      else
        b_next[i] = col0 + b_in < P && k0 + b_out + i * kBStep < K ? b_at[i * b_stride + int64_t(k0) * P] : 0.0f;
    }
  };
  load(k_first);
  for (int trip = 0, k0 = k_first; trip < trips; ++trip, k0 += k_step) {
#pragma unroll
    for (int i = 0; i < kALoads; ++i) {
      const int at = tid + i * kThreads;
      a_tile[at % kTileK * kAStride + at / kTileK] = a_next[i];
    }
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      const int at = tid + i * kThreads;
      if (kBByRow) b_tile[at % kTileK * kBStride + at / kTileK] = b_next[i];
      else b_tile[at / kTileCols * kBStride + at % kTileCols] = b_next[i];
    }
    __syncthreads();
    if (trip + 1 < trips) load(k0 + k_step);
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      add_outer_product(acc, *reinterpret_cast<const float4*>(a_tile + k * kAStride + 4 * ty),
                        *reinterpret_cast<const float4*>(b_tile + k * kBStride + 4 * tx));
    }
    __syncthreads();  // the tiles are read before the next ones are stored
  }
}

// The tile's chunk of its norm's weight and bias gradients (a layernorm_backward with
// norm_partials), from the summed tile `sums` (the gradient at the norm's output, row r
// at sums + r kRowLd): column c's sums over the tile's rows of dout (x - mean) rstd and
// of dout, as layernorm_backward_params sums a chunk (kColumnRowGroups interleaved row
// groups, then the groups in order), into partials [2, M, tiles, P].
__device__ void norm_param_partials(const SmallProduct& p, const float* sums, int64_t m, int row0) {
  const int c = threadIdx.x, tiles = ceil_div(p.R, kTileRows);
  if (c >= p.P) return;
  float dw = 0.0f, db = 0.0f;
  for (int g = 0; g < kColumnRowGroups; ++g) {
    float group_w = 0.0f, group_b = 0.0f;
    for (int r = g; r < kTileRows && row0 + r < p.R; r += kColumnRowGroups) {
      const int64_t row = m * p.R + row0 + r;
      const float dy = sums[r * kRowLd + c];
      group_b += dy;
      group_w += (p.norm_in[row * p.P + c] - p.saved_mean[row]) * p.saved_rstd[row] * dy;
    }
    dw += group_w;
    db += group_b;
  }
  const int64_t at = (m * tiles + row0 / kTileRows) * p.P + c;
  p.norm_partials[at] = dw;
  p.norm_partials[int64_t(gridDim.z) * tiles * p.P + at] = db;
}

// Where a thread's 16 values acc[t][e] of its group's 32 x 64 tile sit (tid: its rank
// in the group). Fp32Tile, the products' float32 layout: thread (tx, ty) holds rows 4 ty
// + t and columns 4 tx + e. Tf32Tile, the tensor cores': warp w of the group holds
// columns 16 w .. 16 w + 15 as four 16 x 8 tiles, t = 2 (row half) + column half, each
// in mma_tf32's d layout (e = 0, 1: row g, columns 2c, 2c + 1; e = 2, 3: row g + 8).
// kRun values in a row are adjacent, starting at even e.
struct Fp32Tile {
  static constexpr int kRun = 4;
  __device__ static int row(int tid, int t, int) { return 4 * (tid / kThreadsX) + t; }
  __device__ static int col(int tid, int, int e) { return 4 * (tid % kThreadsX) + e; }
};
struct Tf32Tile {
  static constexpr int kRun = 2;
  __device__ static int row(int tid, int t, int e) { return 16 * (t / 2) + tid % kWarpSize / 4 + 8 * (e / 2); }
  __device__ static int col(int tid, int t, int e) {
    return 16 * (tid / kWarpSize) + 8 * (t % 2) + 2 * (tid % 4) + e % 2;
  }
};

// Values e .. e + Layout::kRun - 1 of acc[t] as one vector at `at` (16- or 8-byte aligned),
// or added from there.
template <class Layout>
__device__ void store_run(float* at, const float (&v)[4], int e) {
  if constexpr (Layout::kRun == 4) *reinterpret_cast<float4*>(at) = make_float4(v[0], v[1], v[2], v[3]);
  else *reinterpret_cast<float2*>(at) = make_float2(v[e], v[e + 1]);
}
template <class Layout>
__device__ void add_run(float (&v)[4], const float* at, int e) {
  if constexpr (Layout::kRun == 4) {
    const float4 s = *reinterpret_cast<const float4*>(at);
    v[0] += s.x, v[1] += s.y, v[2] += s.z, v[3] += s.w;
  } else {
    const float2 s = *reinterpret_cast<const float2*>(at);
    v[e] += s.x, v[e + 1] += s.y;
  }
}

// After the groups' products of one tile: groups 1.. leave their sums in `sums` (room
// the tiles no longer need); group 0 adds them in order into group 1's place, each
// element read and written by one thread; then a warp per row runs the row epilogue.
template <Epilogue kEpilogue, class Layout = Fp32Tile>
__device__ void finish_rows(float (&acc)[4][4], float* sums, const SmallProduct& p, int64_t m, int row0, int groups,
                            int col0 = 0) {
  const int tid = threadIdx.x % kThreads, group = threadIdx.x / kThreads;
  auto sum_at = [&](int g, int t, int e) {  // value acc[t][e]'s place in group g + 1's sums
    return sums + (g * kTileRows + Layout::row(tid, t, e)) * kRowLd + Layout::col(tid, t, e);
  };
  if (group > 0)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; e += Layout::kRun) store_run<Layout>(sum_at(group - 1, t, e), acc[t], e);
  __syncthreads();
  if (group == 0)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; e += Layout::kRun) {
        for (int g = 0; g < groups - 1; ++g) add_run<Layout>(acc[t], sum_at(g, t, e), e);
        store_run<Layout>(sum_at(0, t, e), acc[t], e);
      }
  __syncthreads();
  // Every lane of a warp takes the same rows.
  for (int r = threadIdx.x / kWarpSize; r < kTileRows && row0 + r < p.R; r += blockDim.x / kWarpSize)
    row_epilogue<kEpilogue>(p, sums + r * kRowLd, m, row0 + r, col0);
  // (the epilogues only read the summed tile: no barrier before)
  if (kEpilogue == Epilogue::layernorm_backward && p.norm_partials) norm_param_partials(p, sums, m, row0);
}

// The block's 32-row tile of a row product, whole rows (P <= 64; store: the 64 columns
// from col0): kRowGroups groups each add every kRowGroups-th 16-deep slice of the
// reduction, then finish_rows; in `storage` (kRowTileFloats), group_floats(16) per
// group, then the groups' sums.
constexpr int kRowTileFloats = kRowGroups * group_floats(tile_k(kRowGroups)) > (kRowGroups - 1) * kTileRows * kRowLd
                                   ? kRowGroups * group_floats(tile_k(kRowGroups))
                                   : (kRowGroups - 1) * kTileRows * kRowLd;
template <bool kBByRow, Epilogue kEpilogue>
__device__ void row_tile(const SmallProduct& p, int64_t m, int row0, float* storage, int col0 = 0) {
  constexpr int kTileK = tile_k(kRowGroups);
  const int tid = threadIdx.x % kThreads, group = threadIdx.x / kThreads;
  float* a_tile = storage + group * group_floats(kTileK);
  float acc[4][4] = {};
  group_tile_product<kBByRow, kTileK>(acc, p.a + m * p.R * p.K, p.b + m * p.P * p.K, p.R, p.P, p.K, row0, col0,
                                      group * kTileK, kRowGroups * kTileK, ceil_div(p.K, kRowGroups * kTileK), a_tile,
                                      a_tile + kTileK * kAStride, tid);
  finish_rows<kEpilogue>(acc, storage, p, m, row0, kRowGroups, col0);
}

// The block's 32 rows of a product with no row op, any P. Up to two 64-column tiles:
// each a row tile (the groups split its reduction), a barrier between (they share the
// room). From three: each group takes whole tiles (group g tiles g, g + kRowGroups, ...),
// the whole reduction in 16-deep trips, each load issued a trip ahead, and stores its
// outputs from its registers: one wait on memory and no sums across groups where each
// tile had both.
template <bool kBByRow>
__device__ void product_rows(const SmallProduct& p, int64_t m, int row0, float* storage) {
  const int tiles = ceil_div(p.P, kTileCols);
  if (tiles < 3) {
    for (int col0 = 0; col0 < p.P; col0 += kTileCols) {
      if (col0 > 0) __syncthreads();
      row_tile<kBByRow, Epilogue::store>(p, m, row0, storage, col0);
    }
    return;
  }
  constexpr int kTileK = tile_k(kRowGroups);
  const int tid = threadIdx.x % kThreads, group = threadIdx.x / kThreads, tx = tid % kThreadsX, ty = tid / kThreadsX;
  float* a_tile = storage + group * group_floats(kTileK);
  // Every group makes as many trips (the barriers are the block's): past the last tile
  // a group multiplies zeros and stores nothing.
  for (int first = 0; first < tiles; first += kRowGroups) {
    const int col0 = (first + group) * kTileCols;
    float acc[4][4] = {};
    group_tile_product<kBByRow, kTileK>(acc, p.a + m * p.R * p.K, p.b + m * p.P * p.K, p.R, p.P, p.K, row0, col0, 0,
                                        kTileK, ceil_div(p.K, kTileK), a_tile, a_tile + kTileK * kAStride, tid);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = row0 + 4 * ty + i, c = col0 + 4 * tx + j;
        if (r < p.R && c < p.P) p.out[(m * p.R + r) * p.P + c] = acc[i][j];
      }
  }
}

// One group: at most 128 registers (four blocks per SM), which the prefetched loads
// come close to; kRowGroups groups (the row epilogues): 64 (two blocks per SM).
template <bool kBByRow, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads * (per_row(kEpilogue) ? kRowGroups : 1), per_row(kEpilogue) ? 2 : 4)
    small_matmul_kernel(const SmallProduct p) {
  chain_after_prior_grids();
  const int64_t m = blockIdx.z;
  const int row0 = blockIdx.y * kTileRows;
  if constexpr (per_row(kEpilogue)) {
    __shared__ float4 storage[kRowTileFloats / 4];  // float4 for the alignment
    row_tile<kBByRow, kEpilogue>(p, m, row0, reinterpret_cast<float*>(storage));
  } else {
    constexpr int kTileK = tile_k(1);
    __shared__ float4 storage[group_floats(kTileK) / 4];
    float* a_tile = reinterpret_cast<float*>(storage);
    const int col0 = blockIdx.x * kTileCols, tid = threadIdx.x, tx = tid % kThreadsX, ty = tid / kThreadsX;
    float acc[4][4] = {};
    group_tile_product<kBByRow, kTileK>(acc, p.a + m * p.R * p.K, p.b + m * p.P * p.K, p.R, p.P, p.K, row0, col0, 0,
                                        kTileK, ceil_div(p.K, kTileK), a_tile, a_tile + kTileK * kAStride, tid);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = row0 + 4 * ty + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = col0 + 4 * tx + j;
        if (r >= p.R || c >= p.P) continue;
        const int64_t at = (m * p.R + r) * p.P + c;
        if (kEpilogue == Epilogue::bias_activation) {
          const float pre = acc[i][j] + p.bias[m * p.P + c];
          if (p.out) p.out[at] = pre;
          p.post[at] = activate(pre, p.act);
        } else {
          p.out[at] = acc[i][j] * activation_derivative(p.pre[at], p.act);
        }
      }
    }
  }
}

// The MLP sublayer of a tile of 32 rows, d_model C <= 64 and d_mlp D <= 4 x 64. Its
// stages run one after another on one block per SM, so each wait on memory stands in
// the step's chain: both of the MLP's weights (each group's slices) go to shared
// memory as the kernel starts, by asynchronous copies that land while the row stage
// before runs, and the 32 rows of its input follow in one load. Group g then computes
// hidden columns [64 g, 64 g + 64) of the first product (reduction C) without a
// barrier, applies its element epilogue (its operands loaded as the kernel starts),
// keeps them in shared memory as hidden[k][row], and takes them as its slice of the
// second product's reduction; then the groups' sums and the row epilogue.
// Forward: pre = ln2 W1^T + b1, post = act(pre), then resid_out = post W2^T + b2 +
// resid_mid and the next norm (rows: add_layernorm). Backward: dpre = (dresid W2)
// act'(pre), then dln2 = dpre W1 and dresid_mid = dresid + the norm's backward (rows:
// layernorm_backward). Row products of the same rows run before it (forward:
// add_layernorm, backward: layernorm_backward) and after it (forward: crossentropy,
// then layernorm_backward), each after a barrier: a stage reads the rows the block's
// warps wrote to memory in the one before.
struct MlpProduct {
  const float* a;    // [M, R, C]: ln2, or dresid_out
  const float* w1;   // fc_w [M, D, C] (forward, read as W^T), or out_w [M, C, D]
  const float* w2;   // out_w [M, C, D] (forward, read as W^T), or fc_w [M, D, C]
  const float* b1;   // forward: fc_b [M, D]
  const float* pre;  // backward: [M, R, D]
  float* hidden;     // pre (forward; null: not kept) or dpre (backward), [M, R, D]
  float* post;       // forward: act(pre)
  int D;
  Act act;
  SmallProduct rows;  // the second product's row epilogue: R, P = C, its operands
  SmallProduct before, after[2];
  bool has_before;
  int after_count;
};

// The kernel's shared memory in floats, from its start: the row stages' tiles and
// the groups' sums, and between them the hidden columns (kMlpStorage); the input rows
// [k][row] (kMlpInput); then for each of the groups holding hidden columns its slice
// of the first weight, [k][column], and of the second, [hidden k][output column]
// (kMlpSlice each).
constexpr int kHiddenLd = kTileRows + 4;
constexpr int kMlpStorage = kRowGroups * kTileCols * kHiddenLd;
constexpr int kMlpInput = kTileCols * kAStride;
constexpr int kMlpSlice = kTileCols * kBStride;
static_assert(kMlpStorage >= kRowTileFloats && kMlpStorage >= (kRowGroups - 1) * kTileRows * kRowLd);
__host__ __device__ int mlp_groups(int D) { return ceil_div(D, kTileCols); }
size_t mlp_shared_bytes(int D) {
  return size_t(kMlpStorage + kMlpInput + 2 * mlp_groups(D) * kMlpSlice) * sizeof(float);
}

// dst [64 (k)][kBStride] = weight(k, column) = w[k * k_stride + column * column_stride]
// for k < ks and column < columns, zero elsewhere: the block's threads, asynchronous
// copies where the weight has a value, each warp's 32 consecutive in memory.
__device__ void stage_slice(float* dst, const float* __restrict__ w, int64_t k_stride, int64_t column_stride,
                            int ks, int columns) {
  for (int i = threadIdx.x; i < kTileCols * kTileCols; i += blockDim.x) {
    const int fast = i % kTileCols, slow = i / kTileCols;
    const int k = k_stride == 1 ? fast : slow, column = k_stride == 1 ? slow : fast;
    float* at = dst + k * kBStride + column;
    if (k < ks && column < columns) copy_async(at, w + k * k_stride + column * column_stride);
    else *at = 0.0f;
  }
}

// acc += the group's 32 x 64 tile of a [k][row] (row stride kAStride) times b
// [k][column] (kBStride) over k < K, both in shared memory, in Layout's values (tid: the
// thread's rank in its group): float32, or on the tensor cores, 8 k at a time (what lies
// past K in the last 8 must be zero), the operands rounded to TF32 as they are read.
template <class Layout>
__device__ void shared_tile_product(float (&acc)[4][4], const float* a, const float* b, int K, int tid) {
  if constexpr (Layout::kRun == 4) {
    const int tx = tid % kThreadsX, ty = tid / kThreadsX;
#pragma unroll 4
    for (int k = 0; k < K; ++k)
      add_outer_product(acc, *reinterpret_cast<const float4*>(a + k * kAStride + 4 * ty),
                        *reinterpret_cast<const float4*>(b + k * kBStride + 4 * tx));
  } else {
    const int g = tid % kWarpSize / 4, c = tid % 4, col0 = 16 * (tid / kWarpSize);
    for (int k0 = 0; k0 < K; k0 += 8) {
      const float *a_k = a + (k0 + c) * kAStride, *b_k = b + (k0 + c) * kBStride;
      float rows[2][4], cols[2][2];  // mma_tf32's a of rows 16 h.., b of columns col0 + 8 h..
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * h + g, n = col0 + 8 * h + g;
        rows[h][0] = round_tf32(a_k[r]), rows[h][1] = round_tf32(a_k[r + 8]);
        rows[h][2] = round_tf32(a_k[4 * kAStride + r]), rows[h][3] = round_tf32(a_k[4 * kAStride + r + 8]);
        cols[h][0] = round_tf32(b_k[n]), cols[h][1] = round_tf32(b_k[4 * kBStride + n]);
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) mma_tf32(acc[t], rows[t / 2], cols[t % 2]);
    }
  }
}

// The forward with its three kinds of row stages spilled at 64 registers (ptxas,
// sm_90), so both take up to 128, one block per SM: the grids have at most 128 blocks
// at d_mlp 256 (mlp_fits' limit on outputs), where the weights fill most of an SM's
// shared memory anyway. Layout: the two products in float32 (Fp32Tile) or on the tensor
// cores (Tf32Tile, --precision tf32); the row stages are float32 either way.
template <bool kBackward, class Layout>
__global__ void __launch_bounds__(kThreads * kRowGroups, 1) mlp_kernel(const MlpProduct p) {
  chain_after_prior_grids();
  static_assert(kHiddenLd == kAStride, "the second product reads the hidden columns as its first operand");
  extern __shared__ float4 shared4[];
  float* storage = reinterpret_cast<float*>(shared4);
  float* input = storage + kMlpStorage;  // [k][row]
  float* slices = input + kMlpInput;
  const int tid = threadIdx.x % kThreads, group = threadIdx.x / kThreads;
  const int64_t m = blockIdx.z;
  const int row0 = blockIdx.y * kTileRows, R = p.rows.R, C = p.rows.P, D = p.D, groups = mlp_groups(D);
  // The weights' slices: group g's first at slices + g kMlpSlice, its second after all
  // the firsts. Forward: W1 [D, C] and W2 [C, D] read as W^T; backward: W1 [C, D], W2
  // [D, C] as they are.
  const float *w1 = p.w1 + m * C * D, *w2 = p.w2 + m * C * D;
  for (int g = 0; g < groups; ++g) {
    const int first = kTileCols * g, hidden_columns = min(kTileCols, D - first);
    float *first_slice = slices + g * kMlpSlice, *second_slice = slices + (groups + g) * kMlpSlice;
    if (kBackward) {
      stage_slice(first_slice, w1 + first, D, 1, C, hidden_columns);
      stage_slice(second_slice, w2 + int64_t(first) * C, C, 1, hidden_columns, C);
    } else {
      stage_slice(first_slice, w1 + int64_t(first) * C, 1, C, C, hidden_columns);
      stage_slice(second_slice, w2 + first, 1, D, hidden_columns, C);
    }
  }
  // The element epilogue's operands of this thread's 16 hidden values, loaded now:
  // nothing in this kernel writes them.
  const bool holds_hidden = kTileCols * group < D;
  auto hidden_row = [&](int t, int e) { return row0 + Layout::row(tid, t, e); };
  auto hidden_col = [&](int t, int e) { return kTileCols * group + Layout::col(tid, t, e); };
  float operand[4][4];
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = hidden_row(t, e), c = hidden_col(t, e);
      operand[t][e] = r >= R || c >= D ? 0.0f : kBackward ? p.pre[(m * R + r) * D + c] : p.b1[m * D + c];
    }
  if (p.has_before) {
    row_tile<!kBackward, kBackward ? Epilogue::layernorm_backward : Epilogue::add_layernorm>(p.before, m, row0,
                                                                                             storage);
    __syncthreads();
  }
  const float* a = p.a + m * R * C;
  for (int i = threadIdx.x; i < kTileRows * kTileCols; i += blockDim.x) {
    const int k = i % kTileCols, r = i / kTileCols;
    input[k * kAStride + r] = row0 + r < R && k < C ? a[int64_t(row0 + r) * C + k] : 0.0f;
  }
  wait_async_copies();
  __syncthreads();
  float acc[4][4] = {};
  float* hidden = storage + group * kTileCols * kHiddenLd;  // [k][row]
  if (holds_hidden) {
    // the tensor cores take 8 k at a time: the input and the slice are zero past C
    shared_tile_product<Layout>(acc, input, slices + group * kMlpSlice, Layout::kRun == 4 ? C : ceil_div(C, 8) * 8,
                                tid);
    float h[4][4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = hidden_row(t, e), c = hidden_col(t, e);
        const int64_t at = (m * R + r) * D + c;
        h[t][e] = 0.0f;  // rows and columns past the edges add nothing below
        if (r >= R || c >= D) continue;
        if (kBackward) {
          h[t][e] = acc[t][e] * activation_derivative(operand[t][e], p.act);
          p.hidden[at] = h[t][e];
        } else {
          const float pre = acc[t][e] + operand[t][e];
          h[t][e] = activate(pre, p.act);
          if (p.hidden) p.hidden[at] = pre;
          p.post[at] = h[t][e];
        }
      }
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float* at = hidden + Layout::col(tid, t, e) * kHiddenLd + Layout::row(tid, t, e);
        if constexpr (Layout::kRun == 4) {  // a column's four rows at once
          if (t == 0) *reinterpret_cast<float4*>(at) = make_float4(h[0][e], h[1][e], h[2][e], h[3][e]);
        } else {
          *at = h[t][e];
        }
      }
  }
  __syncthreads();  // a group's threads read each other's hidden columns
  float out[4][4] = {};
  if (holds_hidden)
    shared_tile_product<Layout>(out, hidden, slices + (groups + group) * kMlpSlice, kTileCols, tid);
  __syncthreads();  // every group's hidden columns are read before the sums overwrite them
  finish_rows<kBackward ? Epilogue::layernorm_backward : Epilogue::add_layernorm, Layout>(out, storage, p.rows, m,
                                                                                            row0, kRowGroups);
  if constexpr (kBackward) {
    if (p.after_count > 0) {
      __syncthreads();
      product_rows<false>(p.after[0], m, row0, storage);
    }
  } else if (p.after_count > 0 && p.after[0].op == RowOp::linear) {
    __syncthreads();
    product_rows<true>(p.after[0], m, row0, storage);
  } else {
    if (p.after_count > 0) {
      __syncthreads();
      row_tile<true, Epilogue::crossentropy>(p.after[0], m, row0, storage);
    }
    if (p.after_count > 1) {
      __syncthreads();
      row_tile<false, Epilogue::layernorm_backward>(p.after[1], m, row0, storage);
    }
  }
}

// The first layer's QKV product with the embedding's norm before it, 32 rows a block:
// a warp per row forms encoded = wte[token] + pos and its norm as
// embedding_layernorm_forward does (the same lane functions; encoded, the norm, mean
// and rstd written), then product_rows reads the norm's rows back.
__global__ void __launch_bounds__(kThreads * kRowGroups) embedding_linear_kernel(const EmbeddingNorm e,
                                                                                 const SmallProduct p, int T) {
  chain_after_prior_grids();
  __shared__ float4 storage[kRowTileFloats / 4];  // float4 for the alignment
  const int64_t m = blockIdx.z;
  const int row0 = blockIdx.y * kTileRows, C = p.K, lane = threadIdx.x % kWarpSize;
  for (int r = threadIdx.x / kWarpSize; r < kTileRows && row0 + r < p.R; r += blockDim.x / kWarpSize) {
    const int64_t row = m * p.R + row0 + r;
    const float* token_row = e.wte + (m * e.V + e.tokens[row]) * C;
    const float* pos_row = e.pos + m * e.pos_model_stride + int64_t((row0 + r) % T) * C;
    float* x = e.encoded + row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += kWarpSize) {
      const float v = token_row[c] + pos_row[c];
      x[c] = v;  // read back below by this lane only
      sum += v;
    }
    const float2 stats = normalize_lanes(e.out + row * C, 1, x, 1, sum, e.norm_w + m * C, e.norm_b + m * C, C);
    if (lane == 0) e.mean[row] = stats.x, e.rstd[row] = stats.y;
  }
  __syncthreads();
  product_rows<true>(p, m, row0, reinterpret_cast<float*>(storage));
}

bool is_small(int M, int R, int P, int K) { return int64_t(M) * R * P <= kSmallOutputs && K <= kSmallK; }
// Each group's 64 hidden columns hold a whole slice, the rows fit one tile, and the
// weights fit shared memory.
bool mlp_fits(int M, int N, int C, int D) {
  return C <= std::min(kTileCols, kSmallK) && D <= kRowGroups * kTileCols && int64_t(M) * N * D <= kSmallOutputs &&
         mlp_shared_bytes(D) <= shared_memory_optin_limit();
}
// Whether the own kernel's 32-row tiles take p: `apart` not set, a tile holds whole
// rows (a product with no row op: any number of 64-column tiles), the groups'
// reductions are as short as is_small's, and where p also sums its norm's parameter
// gradients, layernorm_backward_params' chunks of its R rows are the tiles.
static_assert(kChunkRows == kTileRows);
bool rows_kernel_fits(int M, const RowProduct& p) {
  const bool any_width = p.op == RowOp::linear || p.op == RowOp::backward_input;
  return !p.apart && (any_width || p.P <= kTileCols) && int64_t(M) * p.R * p.P <= kSmallOutputs &&
         p.K <= kRowGroups * kSmallK && (!p.dnorm_w || column_chunks(p.R) == ceil_div(p.R, kTileRows));
}

template <bool kBByRow, Epilogue kEpilogue>
void launch_small(const SmallProduct& p, int M, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.P, kTileCols), ceil_div(p.R, kTileRows), M);
  launch_chained(small_matmul_kernel<kBByRow, kEpilogue>, grid, kThreads * (per_row(kEpilogue) ? kRowGroups : 1), 0,
                 stream, p);
}

// out [M, R, P] = a [M, R, K] times b (kBByRow: [M, P, K], else [M, K, P]).
SmallProduct product(float* out, const float* a, const float* b, int R, int P, int K) {
  SmallProduct p{};
  p.out = out, p.a = a, p.b = b, p.R = R, p.P = P, p.K = K;
  return p;
}

// p with no element epilogue's operands.
SmallProduct small_of(const RowProduct& p) {
  SmallProduct small{};
  static_cast<RowProduct&>(small) = p;
  return small;
}

// p for the rows' kernel: with dnorm_w, room for its norm parameters' partials taken
// from p.sums.
SmallProduct rows_kernel_product(const RowProduct& p, int M) {
  SmallProduct small = small_of(p);
  if (p.op == RowOp::layernorm_backward && p.dnorm_w)
    small.norm_partials = p.sums->add(p.dnorm_w, p.dnorm_b, M, ceil_div(p.R, kTileRows), p.P);
  return small;
}

}  // namespace

void matmul_forward(cublasHandle_t handle, float* out, const float* inp, const float* weight, int M, int N, int C,
                    int OC) {
  // Column-major view: out^T [OC, N] = weight [OC, C] (stored as its transpose) x inp^T [C, N].
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, weight, C,
                                              int64_t(OC) * C, inp, C, int64_t(N) * C, &zero, out, OC,
                                              int64_t(N) * OC, M));
}

void matmul_forward_activation(cublasHandle_t handle, float* pre, float* post, const float* inp, const float* weight,
                               const float* bias, int M, int N, int C, int OC, Act act, bool apart) {
  if (apart || !is_small(M, N, OC, C)) {
    matmul_forward(handle, pre ? pre : post, inp, weight, M, N, C, OC);
    return bias_activation_forward(pre, post, bias, M, N, OC, act, stream_of(handle));
  }
  SmallProduct p = product(pre, inp, weight, N, OC, C);
  p.post = post, p.bias = bias, p.act = act;
  launch_small<true, Epilogue::bias_activation>(p, M, stream_of(handle));
}

void matmul_backward_input(cublasHandle_t handle, float* dinp, const float* dout, const float* weight, int M, int N,
                           int C, int OC) {
  // dinp^T [C, N] = weight^T [C, OC] x dout^T [OC, N]
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, weight, C,
                                              int64_t(OC) * C, dout, OC, int64_t(N) * OC, &zero, dinp, C,
                                              int64_t(N) * C, M));
}

void matmul_backward_input_activation(cublasHandle_t handle, float* dpre, const float* dout, const float* weight,
                                      const float* pre, int M, int N, int C, int OC, Act act, bool apart) {
  if (apart || !is_small(M, N, C, OC)) {
    matmul_backward_input(handle, dpre, dout, weight, M, N, C, OC);
    return activation_backward(dpre, pre, int64_t(M) * N * C, act, stream_of(handle));
  }
  SmallProduct p = product(dpre, dout, weight, N, C, OC);
  p.pre = pre, p.act = act;
  launch_small<false, Epilogue::activation_grad>(p, M, stream_of(handle));
}

RowProduct add_layernorm_product(float* out, float* mean, float* rstd, float* resid, const float* inp,
                                 const float* weight, const float* bias, const float* residual, const float* norm_w,
                                 const float* norm_b, int N, int C, int OC) {
  RowProduct p{};
  p.op = RowOp::add_layernorm, p.out = resid, p.a = inp, p.b = weight, p.R = N, p.P = OC, p.K = C;
  p.bias = bias, p.residual = residual, p.norm_out = out, p.mean = mean, p.rstd = rstd;
  p.norm_w = norm_w, p.norm_b = norm_b;
  return p;
}

RowProduct crossentropy_product(float* row_loss, float* logits, const float* inp, const float* weight,
                                const int32_t* targets, int N, int C, int V, bool backward) {
  RowProduct p{};
  p.op = RowOp::crossentropy, p.out = logits, p.a = inp, p.b = weight, p.R = N, p.P = V, p.K = C;
  p.targets = targets, p.row_loss = row_loss, p.backward = backward;
  return p;
}

RowProduct linear_product(float* out, const float* inp, const float* weight, int N, int C, int OC) {
  RowProduct p{};
  p.op = RowOp::linear, p.out = out, p.a = inp, p.b = weight, p.R = N, p.P = OC, p.K = C;
  return p;
}

RowProduct backward_input_product(float* dinp, const float* dout, const float* weight, int N, int C, int OC) {
  RowProduct p{};
  p.op = RowOp::backward_input, p.out = dinp, p.a = dout, p.b = weight, p.R = N, p.P = C, p.K = OC;
  return p;
}

RowProduct backward_input_layernorm_product(float* dnorm, float* dinp, const float* dinp_in, const float* dout,
                                            const float* weight, const float* norm_in, const float* norm_w,
                                            const float* mean, const float* rstd, int N, int C, int OC) {
  RowProduct p{};
  p.op = RowOp::layernorm_backward, p.out = dnorm, p.a = dout, p.b = weight, p.R = N, p.P = C, p.K = OC;
  p.norm_in = norm_in, p.norm_w = norm_w, p.saved_mean = mean, p.saved_rstd = rstd, p.dinp = dinp;
  p.dinp_in = dinp_in;
  return p;
}

void run_row_product(cublasHandle_t handle, const RowProduct& p, int M) {
  const cudaStream_t stream = stream_of(handle);
  const bool fits = rows_kernel_fits(M, p);
  switch (p.op) {
    case RowOp::add_layernorm:
      if (fits) return launch_small<true, Epilogue::add_layernorm>(small_of(p), M, stream);
      matmul_forward(handle, p.out, p.a, p.b, M, p.R, p.K, p.P);
      return add_layernorm_forward(p.norm_out, p.mean, p.rstd, p.out, p.bias, p.residual, p.norm_w, p.norm_b, M, p.R,
                                   p.P, stream);
    case RowOp::crossentropy:
      if (fits) return launch_small<true, Epilogue::crossentropy>(small_of(p), M, stream);
      matmul_forward(handle, p.out, p.a, p.b, M, p.R, p.K, p.P);
      return crossentropy_forward_backward(p.row_loss, p.out, p.targets, M, p.R, p.P, p.backward, stream);
    case RowOp::layernorm_backward:
      if (fits) return launch_small<false, Epilogue::layernorm_backward>(rows_kernel_product(p, M), M, stream);
      matmul_backward_input(handle, p.out, p.a, p.b, M, p.R, p.P, p.K);
      layernorm_backward_input(p.dinp, p.dinp_in, p.out, p.norm_in, p.norm_w, p.saved_mean, p.saved_rstd, M, p.R,
                               p.P, stream);
      if (p.dnorm_w)
        layernorm_backward_params(p.dnorm_w, p.dnorm_b, *p.sums, p.out, p.norm_in, p.saved_mean, p.saved_rstd, M,
                                  p.R, p.P, stream);
      return;
    case RowOp::linear:  // nothing to take after these: cuBLAS's
      return matmul_forward(handle, p.out, p.a, p.b, M, p.R, p.K, p.P);
    case RowOp::backward_input:
      return matmul_backward_input(handle, p.out, p.a, p.b, M, p.R, p.P, p.K);
  }
}

void embedding_linear(cublasHandle_t handle, const EmbeddingNorm& e, const RowProduct& p, int M, int B, int T) {
  if (p.op != RowOp::linear || p.a != e.out || p.R != B * T)
    throw std::invalid_argument("embedding_linear: a linear product of the embedding's norm, B * T rows");
  if (!rows_kernel_fits(M, p)) {
    embedding_layernorm_forward(e, M, B, T, p.K, stream_of(handle));
    return run_row_product(handle, p, M);
  }
  launch_chained(embedding_linear_kernel, dim3(1, ceil_div(p.R, kTileRows), M), kThreads * kRowGroups, 0,
                 stream_of(handle), e, small_of(p), T);
}

namespace {

// The MLP's row stages in its kernel where the own kernel's tiles take each, rows of
// the same R.
bool stages_fit(const MlpSublayer& s, int M) {
  auto fits = [&](const RowProduct& p) { return p.R == s.N && rows_kernel_fits(M, p); };
  if (s.before && !fits(*s.before)) return false;
  for (int i = 0; i < s.after_count; ++i)
    if (!fits(s.after[i])) return false;
  return true;
}

// The stages' ops are the ones their places take (kernels.hpp's MlpSublayer).
void check_stages(const MlpSublayer& s, bool backward) {
  const RowOp before = backward ? RowOp::layernorm_backward : RowOp::add_layernorm;
  const bool linear = !backward && s.after_count > 0 && s.after[0].op == RowOp::linear;
  const std::vector<RowOp> after = backward ? std::vector<RowOp>{RowOp::backward_input}
                                   : linear ? std::vector<RowOp>{RowOp::linear}
                                            : std::vector<RowOp>{RowOp::crossentropy, RowOp::layernorm_backward};
  bool fits = (!s.before || s.before->op == before) && s.after_count >= 0 &&
              s.after_count <= static_cast<int>(after.size());
  for (int i = 0; fits && i < s.after_count; ++i) fits = s.after[i].op == after[i];
  if (!fits) throw std::invalid_argument("mlp_forward / mlp_backward: row products in places that do not take them");
}

// The MLP's kernel with its stages, or (apart) the stages and the MLP's two products in
// order; the MLP's part is `apart` or `product`'s.
template <bool kBackward, class Apart>
void launch_mlp(cublasHandle_t handle, const MlpSublayer& s, int M, MlpProduct p, const Apart& apart) {
  check_stages(s, kBackward);
  if (s.apart || !mlp_fits(M, s.N, s.C, s.D) || !stages_fit(s, M)) {
    if (s.before) run_row_product(handle, *s.before, M);
    apart();
    for (int i = 0; i < s.after_count; ++i) run_row_product(handle, s.after[i], M);
    return;
  }
  p.has_before = s.before != nullptr, p.after_count = s.after_count;
  if (s.before) p.before = rows_kernel_product(*s.before, M);
  for (int i = 0; i < s.after_count; ++i) p.after[i] = rows_kernel_product(s.after[i], M);
  auto kernel = s.tf32 ? mlp_kernel<kBackward, Tf32Tile> : mlp_kernel<kBackward, Fp32Tile>;
  launch_chained(kernel, dim3(1, ceil_div(s.N, kTileRows), M), kThreads * kRowGroups, mlp_shared_bytes(s.D),
                 stream_of(handle), p);
}

}  // namespace

void prepare_mlp_kernels() {
  const int bytes = static_cast<int>(shared_memory_optin_limit());
  for (auto kernel : {mlp_kernel<false, Fp32Tile>, mlp_kernel<true, Fp32Tile>, mlp_kernel<false, Tf32Tile>,
                      mlp_kernel<true, Tf32Tile>})
    UNIV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

void mlp_forward(cublasHandle_t handle, const MlpSublayer& s, int M) {
  const int N = s.N, C = s.C, D = s.D;
  MlpProduct p{};
  p.a = s.ln2, p.w1 = s.fc_w, p.w2 = s.out_w, p.b1 = s.fc_b, p.hidden = s.pre, p.post = s.post, p.D = D, p.act = s.act;
  p.rows = small_of(add_layernorm_product(s.next_ln, s.next_mean, s.next_rstd, s.resid_out, nullptr, nullptr, s.out_b,
                                          s.resid_mid, s.next_w, s.next_b, N, D, C));
  launch_mlp<false>(handle, s, M, p, [&] {
    matmul_forward_activation(handle, s.pre, s.post, s.ln2, s.fc_w, s.fc_b, M, N, C, D, s.act, s.apart);
    RowProduct out = add_layernorm_product(s.next_ln, s.next_mean, s.next_rstd, s.resid_out, s.post, s.out_w,
                                           s.out_b, s.resid_mid, s.next_w, s.next_b, N, D, C);
    out.apart = s.apart;
    run_row_product(handle, out, M);
  });
}

void mlp_backward(cublasHandle_t handle, const MlpSublayer& s, int M) {
  const int N = s.N, C = s.C, D = s.D;
  MlpProduct p{};
  p.a = s.dresid_out, p.w1 = s.out_w, p.w2 = s.fc_w, p.pre = s.pre, p.hidden = s.dpre, p.D = D, p.act = s.act;
  p.rows = small_of(backward_input_layernorm_product(s.dln2, s.dresid_mid, s.dresid_out, nullptr, nullptr,
                                                     s.resid_mid, s.ln2_w, s.ln2_mean, s.ln2_rstd, N, C, D));
  launch_mlp<true>(handle, s, M, p, [&] {
    matmul_backward_input_activation(handle, s.dpre, s.dresid_out, s.out_w, s.pre, M, N, D, C, s.act, s.apart);
    RowProduct dln2 = backward_input_layernorm_product(s.dln2, s.dresid_mid, s.dresid_out, s.dpre, s.fc_w,
                                                       s.resid_mid, s.ln2_w, s.ln2_mean, s.ln2_rstd, N, C, D);
    dln2.apart = s.apart;
    run_row_product(handle, dln2, M);
  });
}

int64_t matmul_backward_partials(int M, int N, int C, int OC) {
  const int splits = weight_grad_splits(M, N, C, OC);
  return splits > 1 ? ColumnSums::room(int64_t(M) * splits * OC * C) : 0;
}

void matmul_backward_weight(cublasHandle_t handle, float* dweight, ColumnSums& sums, const float* dout,
                            const float* inp, int M, int N, int C, int OC) {
  const float one = 1.0f, zero = 0.0f;
  const int splits = weight_grad_splits(M, N, C, OC);
  if (splits == 1) {  // dweight^T [C, OC] = inp^T [C, N] x dout [N, OC]
    UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, &one, inp, C,
                                                int64_t(N) * C, dout, OC, int64_t(N) * OC, &zero, dweight, C,
                                                int64_t(OC) * C, M));
    return;
  }
  // Batch (m, s) covers rows [s R, (s + 1) R) of model m, R = N / splits, which start
  // (m splits + s) R rows in: partials[m, s]^T [C, OC] = inp^T [C, R] x dout [R, OC];
  // stage 2 adds them over s into dweight.
  const int R = N / splits;
  float* partials = sums.add(dweight, nullptr, M, splits, int64_t(OC) * C);
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, R, &one, inp, C,
                                              int64_t(R) * C, dout, OC, int64_t(R) * OC, &zero, partials, C,
                                              int64_t(OC) * C, M * splits));
}

}  // namespace univ::cuda
