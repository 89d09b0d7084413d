// Linear layers, PyTorch's [out, in] weights in row-major memory (llm.c's operand
// order), batched over the model axis: cuBLAS strided-batched GEMMs, except where the
// products are small (a tiny model's few thousand rows, short reductions) and what
// reads their output next fits in this file's own kernel's epilogue: the MLP's bias +
// activation (forward) and the activation's derivative (backward), and where a tile
// holds whole rows (at most 64 columns) the layer norm after a layer's bias and
// residual, the cross-entropy after the logits, and the layer norm's backward after
// an input gradient. Where they do not fit, cuBLAS and the op's own kernel.
// The weight gradient, a long reduction over N rows into a small output, is split
// over row blocks as extra batches and the partial products added in order
// (ColumnSums' stage 2): a deterministic split-K.
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
// a weight W read as W^T) or [K, P]. Block (column tile, row tile, model) of kGroups
// groups of 16 x 8 threads; thread (x, y) of a group owns rows 4y .. 4y + 3 and columns
// 4x .. 4x + 3 of a 32 x 64 tile and adds its products in k order over the group's
// tiles of the reduction (group g: tiles g, g + kGroups, ...); the groups' sums then
// add up in group order. Tiles come through shared memory, the next one loaded into
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
// gradient, then the gradient at its input).
enum class Epilogue { bias_activation, activation_grad, add_layernorm, crossentropy, layernorm_backward };
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

struct SmallProduct {
  float* out;
  float* post;        // bias_activation: act(out)
  const float* a;     // [M, R, K]
  const float* b;     // [M, P, K] or [M, K, P]
  const float* bias;  // bias_activation, add_layernorm: [M, P]
  const float* pre;   // activation_grad: [M, R, P]
  int R, P, K;
  Act act;
  // The row epilogues' operands, [M, R, P] or [M, R] (mean, rstd, targets, row_loss)
  // or [M, P] (norm_w, norm_b).
  const float* residual;              // add_layernorm
  float *norm_out, *mean, *rstd;      // add_layernorm: written
  const float *norm_w, *norm_b;       // add_layernorm (both), layernorm_backward (norm_w)
  const float* norm_in;               // layernorm_backward: the norm's input ...
  const float *saved_mean, *saved_rstd;  // ... and its statistics
  float* dinp;                        // layernorm_backward: dinp = dinp_in (null: 0) + ...
  const float* dinp_in;
  const int32_t* targets;             // crossentropy
  float* row_loss;
  bool backward;
};

// Row r of the block's summed tile x (one warp, global row `row` of model m).
template <Epilogue kEpilogue>
__device__ void row_epilogue(const SmallProduct& p, float* x, int64_t m, int row) {
  const int lane = threadIdx.x % kWarpSize, P = p.P;
  const int64_t at = (m * p.R + row) * P;
  if (kEpilogue == Epilogue::add_layernorm) {  // as add_layernorm_forward
    float sum = 0.0f;
    for (int c = lane; c < P; c += kWarpSize) {
      float v = x[c] + p.bias[m * P + c];
      v += p.residual[at + c];
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
  } else {  // layernorm_backward, as layernorm_backward_input
    for (int c = lane; c < P; c += kWarpSize) p.out[at + c] = x[c];
    layernorm_backward_lanes(p.dinp + at, p.dinp_in ? p.dinp_in + at : nullptr, 1, x, 1, p.norm_in + at, 1,
                             p.norm_w + m * P, p.saved_mean[m * p.R + row], p.saved_rstd[m * p.R + row], P);
  }
}

// One group: at most 128 registers (four blocks per SM), which the prefetched loads
// come close to; kRowGroups groups: 64 (two blocks per SM).
template <bool kBByRow, Epilogue kEpilogue, int kGroups>
__global__ void __launch_bounds__(kThreads * kGroups, kGroups == 1 ? 4 : 2) small_matmul_kernel(const SmallProduct p) {
  static_assert(!per_row(kEpilogue) || kGroups > 1, "the row epilogues add the groups' sums in shared memory");
  constexpr int kTileK = tile_k(kGroups);
  constexpr int kAStride = kTileRows + 4, kBStride = kTileCols + 4;  // padded rows, 16-byte aligned
  constexpr int kALoads = kTileRows * kTileK / kThreads, kBLoads = kTileCols * kTileK / kThreads;
  constexpr int kGroupFloats = kTileK * (kAStride + kBStride);  // a group's a_tile[k][row], then b_tile[k][col]
  constexpr int kRowLd = kTileCols + 4;
  constexpr int kSumFloats = (kGroups - 1) * kTileRows * kRowLd;  // groups 1.. sums, after the tiles are used
  constexpr int kStorage = (kGroups * kGroupFloats > kSumFloats ? kGroups * kGroupFloats : kSumFloats) / 4;
  __shared__ float4 storage[kStorage];  // float4 for the alignment
  const int tid = threadIdx.x % kThreads, group = threadIdx.x / kThreads;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  float* a_tile = reinterpret_cast<float*>(storage) + group * kGroupFloats;
  float* b_tile = a_tile + kTileK * kAStride;
  const int64_t m = blockIdx.z;
  const int row0 = blockIdx.y * kTileRows, col0 = blockIdx.x * kTileCols;
  // Thread tid loads rows (or columns) tid / width + i * step of its operand's tile at
  // the one offset tid % width: one pointer and one stride per operand.
  constexpr int kAStep = kThreads / kTileK, kBStep = kThreads / (kBByRow ? kTileK : kTileCols);
  const int a_k = tid % kTileK, a_r = row0 + tid / kTileK;
  const float* a_at = p.a + m * p.R * p.K + int64_t(a_r) * p.K + a_k;
  const int64_t a_stride = int64_t(kAStep) * p.K;
  const int b_in = kBByRow ? tid % kTileK : tid % kTileCols;          // k (by row) or column
  const int b_out = kBByRow ? col0 + tid / kTileK : tid / kTileCols;  // column (by row) or k
  const float* b_at =
      p.b + m * p.P * p.K + (kBByRow ? int64_t(b_out) * p.K + b_in : int64_t(b_out) * p.P + col0 + b_in);
  const int64_t b_stride = int64_t(kBStep) * (kBByRow ? p.K : p.P);
  float a_next[kALoads], b_next[kBLoads];
  auto load = [&](int k0) {  // tile k0 into registers, zeros past the edges
    const bool a_in = k0 + a_k < p.K;
#pragma unroll
    for (int i = 0; i < kALoads; ++i)
      a_next[i] = a_in && a_r + i * kAStep < p.R ? a_at[i * a_stride + k0] : 0.0f;
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      if (kBByRow)
        b_next[i] = k0 + b_in < p.K && b_out + i * kBStep < p.P ? b_at[i * b_stride + k0] : 0.0f;
      else
        b_next[i] = col0 + b_in < p.P && k0 + b_out + i * kBStep < p.K ? b_at[i * b_stride + int64_t(k0) * p.P] : 0.0f;
    }
  };
  // Every group makes the same trips (the barriers are the block's); a tile past the
  // reduction's end loads zeros.
  constexpr int kTripK = kGroups * kTileK;
  const int trips = ceil_div(p.K, kTripK);
  float acc[4][4] = {};
  load(group * kTileK);
  for (int trip = 0, k0 = group * kTileK; trip < trips; ++trip, k0 += kTripK) {
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
    if (trip + 1 < trips) load(k0 + kTripK);
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      const float4 av = *reinterpret_cast<const float4*>(a_tile + k * kAStride + 4 * ty);
      const float4 bv = *reinterpret_cast<const float4*>(b_tile + k * kBStride + 4 * tx);
      const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are read before the next ones are stored
  }
  if constexpr (per_row(kEpilogue)) {
    // Groups 1.. leave their sums in the tiles' room; group 0 adds them in order into
    // group 1's place, each element read and written by one thread.
    float* sums = reinterpret_cast<float*>(storage);
    auto sum_at = [&](int g, int i) {  // row 4 ty + i, columns 4 tx .. of group g + 1's sums
      return reinterpret_cast<float4*>(sums + (g * kTileRows + 4 * ty + i) * kRowLd + 4 * tx);
    };
    if (group > 0)
#pragma unroll
      for (int i = 0; i < 4; ++i) *sum_at(group - 1, i) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    __syncthreads();
    if (group == 0)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        for (int g = 0; g < kGroups - 1; ++g) {
          const float4 s = *sum_at(g, i);
          acc[i][0] += s.x, acc[i][1] += s.y, acc[i][2] += s.z, acc[i][3] += s.w;
        }
        *sum_at(0, i) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
    __syncthreads();
    // A warp per row; every lane of a warp takes the same rows.
    for (int r = threadIdx.x / kWarpSize; r < kTileRows && row0 + r < p.R; r += blockDim.x / kWarpSize)
      row_epilogue<kEpilogue>(p, sums + r * kRowLd, m, row0 + r);
  } else {
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
          p.out[at] = pre;
          p.post[at] = activate(pre, p.act);
        } else {
          p.out[at] = acc[i][j] * activation_derivative(p.pre[at], p.act);
        }
      }
    }
  }
}

bool is_small(int M, int R, int P, int K) { return int64_t(M) * R * P <= kSmallOutputs && K <= kSmallK; }
// A tile holds whole rows, and the groups' reductions are as short as is_small's.
bool rows_fit(int M, int R, int P, int K) {
  return P <= kTileCols && int64_t(M) * R * P <= kSmallOutputs && K <= kRowGroups * kSmallK;
}

template <bool kBByRow, Epilogue kEpilogue>
void launch_small(const SmallProduct& p, int M, cudaStream_t stream) {
  constexpr int groups = per_row(kEpilogue) ? kRowGroups : 1;
  const dim3 grid(ceil_div(p.P, kTileCols), ceil_div(p.R, kTileRows), M);
  small_matmul_kernel<kBByRow, kEpilogue, groups><<<grid, kThreads * groups, 0, stream>>>(p);
  UNIV_CUDA_CHECK_LAUNCH();
}

// out [M, R, P] = a [M, R, K] times b (kBByRow: [M, P, K], else [M, K, P]).
SmallProduct product(float* out, const float* a, const float* b, int R, int P, int K) {
  SmallProduct p{};
  p.out = out, p.a = a, p.b = b, p.R = R, p.P = P, p.K = K;
  return p;
}

cudaStream_t stream_of(cublasHandle_t handle) {
  cudaStream_t stream = nullptr;
  UNIV_CUBLAS_CHECK(cublasGetStream(handle, &stream));
  return stream;
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
                               const float* bias, int M, int N, int C, int OC, Act act) {
  if (!is_small(M, N, OC, C)) {
    matmul_forward(handle, pre, inp, weight, M, N, C, OC);
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
                                      const float* pre, int M, int N, int C, int OC, Act act) {
  if (!is_small(M, N, C, OC)) {
    matmul_backward_input(handle, dpre, dout, weight, M, N, C, OC);
    return activation_backward(dpre, pre, int64_t(M) * N * C, act, stream_of(handle));
  }
  SmallProduct p = product(dpre, dout, weight, N, C, OC);
  p.pre = pre, p.act = act;
  launch_small<false, Epilogue::activation_grad>(p, M, stream_of(handle));
}

void matmul_add_layernorm_forward(cublasHandle_t handle, float* out, float* mean, float* rstd, float* resid,
                                  const float* inp, const float* weight, const float* bias, const float* residual,
                                  const float* norm_w, const float* norm_b, int M, int N, int C, int OC) {
  if (!rows_fit(M, N, OC, C)) {
    matmul_forward(handle, resid, inp, weight, M, N, C, OC);
    return add_layernorm_forward(out, mean, rstd, resid, bias, residual, norm_w, norm_b, M, N, OC, stream_of(handle));
  }
  SmallProduct p = product(resid, inp, weight, N, OC, C);
  p.bias = bias, p.residual = residual, p.norm_out = out, p.mean = mean, p.rstd = rstd;
  p.norm_w = norm_w, p.norm_b = norm_b;
  launch_small<true, Epilogue::add_layernorm>(p, M, stream_of(handle));
}

void matmul_crossentropy(cublasHandle_t handle, float* row_loss, float* logits, const float* inp, const float* weight,
                         const int32_t* targets, int M, int N, int C, int V, bool backward) {
  if (!rows_fit(M, N, V, C)) {
    matmul_forward(handle, logits, inp, weight, M, N, C, V);
    return crossentropy_forward_backward(row_loss, logits, targets, M, N, V, backward, stream_of(handle));
  }
  SmallProduct p = product(logits, inp, weight, N, V, C);
  p.targets = targets, p.row_loss = row_loss, p.backward = backward;
  launch_small<true, Epilogue::crossentropy>(p, M, stream_of(handle));
}

void matmul_backward_input_layernorm(cublasHandle_t handle, float* dnorm, float* dinp, const float* dinp_in,
                                     const float* dout, const float* weight, const float* norm_in,
                                     const float* norm_w, const float* mean, const float* rstd, int M, int N, int C,
                                     int OC) {
  if (!rows_fit(M, N, C, OC)) {
    matmul_backward_input(handle, dnorm, dout, weight, M, N, C, OC);
    return layernorm_backward_input(dinp, dinp_in, dnorm, norm_in, norm_w, mean, rstd, M, N, C, stream_of(handle));
  }
  SmallProduct p = product(dnorm, dout, weight, N, C, OC);
  p.norm_in = norm_in, p.norm_w = norm_w, p.saved_mean = mean, p.saved_rstd = rstd, p.dinp = dinp;
  p.dinp_in = dinp_in;
  launch_small<false, Epilogue::layernorm_backward>(p, M, stream_of(handle));
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
