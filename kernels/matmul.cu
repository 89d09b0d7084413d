// Linear layers as cuBLAS strided-batched GEMMs over the model axis, PyTorch's
// [out, in] weights in row-major memory (llm.c's operand order). Biases are added
// by the epilogues in bias.cu. The weight gradient, a long reduction over N rows into
// a small output, is split over row blocks as extra batches and the partial products
// added in order (ColumnSums' stage 2): a deterministic split-K.
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

}  // namespace

void matmul_forward(cublasHandle_t handle, float* out, const float* inp, const float* weight, int M, int N, int C,
                    int OC) {
  // Column-major view: out^T [OC, N] = weight [OC, C] (stored as its transpose) x inp^T [C, N].
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, weight, C,
                                              int64_t(OC) * C, inp, C, int64_t(N) * C, &zero, out, OC,
                                              int64_t(N) * OC, M));
}

void matmul_backward_input(cublasHandle_t handle, float* dinp, const float* dout, const float* weight, int M, int N,
                           int C, int OC) {
  // dinp^T [C, N] = weight^T [C, OC] x dout^T [OC, N]
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, weight, C,
                                              int64_t(OC) * C, dout, OC, int64_t(N) * OC, &zero, dinp, C,
                                              int64_t(N) * C, M));
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
