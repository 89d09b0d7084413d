// Linear layers as cuBLAS strided-batched GEMMs over the model axis, PyTorch's
// [out, in] weights in row-major memory (llm.c's operand order). Biases are added
// by the epilogues in bias.cu.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

void matmul_forward(cublasHandle_t handle, float* out, const float* inp, const float* weight, int M, int N, int C,
                    int OC) {
  // Column-major view: out^T [OC, N] = weight [OC, C] (stored as its transpose) x inp^T [C, N].
  const float one = 1.0f, zero = 0.0f;
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, &one, weight, C,
                                              int64_t(OC) * C, inp, C, int64_t(N) * C, &zero, out, OC,
                                              int64_t(N) * OC, M));
}

void matmul_backward(cublasHandle_t handle, float* dinp, float* dweight, const float* dout, const float* inp,
                     const float* weight, int M, int N, int C, int OC) {
  const float one = 1.0f, zero = 0.0f;
  if (dinp)  // dinp^T [C, N] = weight^T [C, OC] x dout^T [OC, N]
    UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, &one, weight, C,
                                                int64_t(OC) * C, dout, OC, int64_t(N) * OC, &zero, dinp, C,
                                                int64_t(N) * C, M));
  // dweight^T [C, OC] += inp^T [C, N] x dout [N, OC]
  UNIV_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, &one, inp, C,
                                              int64_t(N) * C, dout, OC, int64_t(N) * OC, &one, dweight, C,
                                              int64_t(OC) * C, M));
}

}  // namespace univ::cuda
