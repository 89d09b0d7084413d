// Linear layer y = x W^T + b with PyTorch's [out, in] weights, forward and backward
// (CPU): one BLAS GEMM per model and product, biases summed in order.
#include <algorithm>

#include "blas.hpp"
#include "univ/cpu/ops.hpp"

namespace univ::cpu {

namespace {
constexpr int kColumnBlock = 64;
}

template <class F>
void matmul_forward(F* out, const F* inp, const F* weight, const F* bias, int M, int N, int C, int OC) {
  for (int m = 0; m < M; ++m) {
    F* o = out + int64_t(m) * N * OC;
    if (bias) {
      const F* bm = bias + int64_t(m) * OC;
#pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < N; ++n) std::copy(bm, bm + OC, o + n * OC);
    }
    gemm(false, true, N, OC, C, F(1), inp + int64_t(m) * N * C, C, weight + int64_t(m) * OC * C, C,
         bias ? F(1) : F(0), o, OC);
  }
}

template <class F>
void matmul_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp, const F* weight, int M, int N, int C,
                     int OC) {
  for (int m = 0; m < M; ++m) {
    const F* dy = dout + int64_t(m) * N * OC;
    if (dinp) gemm(false, false, N, C, OC, F(1), dy, OC, weight + int64_t(m) * OC * C, C, F(0), dinp + int64_t(m) * N * C, C);
    gemm(true, false, OC, C, N, F(1), dy, OC, inp + int64_t(m) * N * C, C, F(1), dweight + int64_t(m) * OC * C, C);
  }
  if (!dbias) return;
  const int blocks = (OC + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for collapse(2) schedule(static)
  for (int m = 0; m < M; ++m)
    for (int blk = 0; blk < blocks; ++blk) {
      const int c0 = blk * kColumnBlock, c1 = std::min(OC, c0 + kColumnBlock);
      double acc[kColumnBlock] = {};
      for (int64_t n = 0; n < N; ++n) {
        const F* row = dout + (int64_t(m) * N + n) * OC;
        for (int c = c0; c < c1; ++c) acc[c - c0] += row[c];
      }
      for (int c = c0; c < c1; ++c) dbias[int64_t(m) * OC + c] += static_cast<F>(acc[c - c0]);
    }
}

#define UNIV_INSTANTIATE(F)                                                                \
  template void matmul_forward<F>(F*, const F*, const F*, const F*, int, int, int, int); \
  template void matmul_backward<F>(F*, F*, F*, const F*, const F*, const F*, int, int, int, int);
UNIV_INSTANTIATE(float)
UNIV_INSTANTIATE(double)

}  // namespace univ::cpu
