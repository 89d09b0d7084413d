// Linear layers, PyTorch's [out, in] weights in row-major memory (llm.c's operand
// order), batched over the model axis: cuBLAS strided-batched GEMMs, except that the
// MLP's products with its activation (forward: bias + activation after the first
// product; backward: times the activation's derivative after the second's input
// gradient) run in this file's own kernel with the activation in its epilogue where
// they are small (a tiny model's few thousand rows, a short reduction); where they
// are not, cuBLAS and an epilogue kernel of bias.cu.
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
// a weight W read as W^T) or [K, P]. Block (column tile, row tile, model) of 16 x 8
// threads; thread (x, y) owns rows 4y .. 4y + 3 and columns 4x .. 4x + 3 of a 32 x 64
// tile and adds its products in k order. Tiles of kTileK come through shared memory,
// the next one loaded into registers while the current one is used; each k takes two
// 16-byte shared loads per 16 multiply-adds (one float per multiply-add, as in a
// plain loop, would leave the kernel waiting on shared memory). On an H100 it takes
// about 10 us where cuBLAS takes 9.3 for the product alone, so it runs only where it
// saves the epilogue kernel. Epilogues: bias_activation (out = pre = product +
// bias[m, col], post = act(pre)); activation_grad (out = product * act'(pre)).
enum class Epilogue { bias_activation, activation_grad };
constexpr int kTileK = 32, kTileRows = 32, kTileCols = 64;
constexpr int kThreadsX = kTileCols / 4, kThreadsY = kTileRows / 4, kThreads = kThreadsX * kThreadsY;
// The own kernel up to this many outputs (all models) and this long a reduction; more
// tiles of K each wait on their loads, where cuBLAS's pipelines are ahead.
constexpr int64_t kSmallOutputs = 1 << 20;
constexpr int kSmallK = 64;

struct SmallProduct {
  float* out;
  float* post;        // bias_activation: act(out)
  const float* a;     // [M, R, K]
  const float* b;     // [M, P, K] or [M, K, P]
  const float* bias;  // bias_activation: [M, P]
  const float* pre;   // activation_grad: [M, R, P]
  int R, P, K;
  Act act;
};

// At most 128 registers (four blocks per SM), which the prefetched loads come close to.
template <bool kBByRow, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, 4) small_matmul_kernel(const SmallProduct p) {
  constexpr int kAStride = kTileRows + 4, kBStride = kTileCols + 4;  // padded rows, 16-byte aligned
  constexpr int kALoads = kTileRows * kTileK / kThreads, kBLoads = kTileCols * kTileK / kThreads;
  __shared__ float4 a_storage[kTileK][kAStride / 4];  // a_tile[k][row], as float4 for the alignment
  __shared__ float4 b_storage[kTileK][kBStride / 4];  // b_tile[k][col]
  float* a_tile = reinterpret_cast<float*>(a_storage);
  float* b_tile = reinterpret_cast<float*>(b_storage);
  const int tid = threadIdx.x + kThreadsX * threadIdx.y;
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
  float acc[4][4] = {};
  load(0);
  for (int k0 = 0; k0 < p.K; k0 += kTileK) {
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
    if (k0 + kTileK < p.K) load(k0 + kTileK);
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      const float4 av = a_storage[k][threadIdx.y], bv = b_storage[k][threadIdx.x];
      const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are read before the next ones are stored
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + 4 * threadIdx.y + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + 4 * threadIdx.x + j;
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

bool is_small(int M, int R, int P, int K) { return int64_t(M) * R * P <= kSmallOutputs && K <= kSmallK; }

template <bool kBByRow, Epilogue kEpilogue>
void launch_small(const SmallProduct& p, int M, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.P, kTileCols), ceil_div(p.R, kTileRows), M), block(kThreadsX, kThreadsY);
  small_matmul_kernel<kBByRow, kEpilogue><<<grid, block, 0, stream>>>(p);
  UNIV_CUDA_CHECK_LAUNCH();
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
  launch_small<true, Epilogue::bias_activation>({pre, post, inp, weight, bias, nullptr, N, OC, C, act}, M,
                                                stream_of(handle));
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
  launch_small<false, Epilogue::activation_grad>({dpre, nullptr, dout, weight, nullptr, pre, N, C, OC, act}, M,
                                                 stream_of(handle));
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
