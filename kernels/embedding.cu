// Token embedding plus positional encoding, forward and backward. The backward sums
// each token's gradient rows in position order inside one block: deterministic,
// no float atomics, the same order as the CPU backend.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kScanThreads = 128;

__global__ void embedding_forward_kernel(float* __restrict__ out, const int32_t* __restrict__ tokens,
                                         const float* __restrict__ wte, const float* __restrict__ pos,
                                         int64_t pos_model_stride, int64_t rows_per_model, int T, int C, int V,
                                         int64_t total) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / C;
    const int c = static_cast<int>(idx % C);
    const int64_t m = row / rows_per_model;
    const int t = static_cast<int>(row % T);
    out[idx] = wte[(m * V + tokens[row]) * C + c] + pos[m * pos_model_stride + int64_t(t) * C + c];
  }
}

// Block (v, m): finds model m's positions holding token v, in order (ballot and
// prefix counts), and adds their gradient rows channel by channel.
__global__ void embedding_backward_wte_kernel(float* __restrict__ dwte, const float* __restrict__ dout,
                                              const int32_t* __restrict__ tokens, int64_t N, int C, int V) {
  extern __shared__ float shared[];
  float* acc = shared;                                   // [C]
  int* positions = reinterpret_cast<int*>(acc + C);      // [blockDim.x]
  int* warp_counts = positions + blockDim.x;             // [blockDim.x / 32]
  const int v = blockIdx.x, m = blockIdx.y;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  for (int c = threadIdx.x; c < C; c += blockDim.x) acc[c] = 0.0f;
  const int32_t* tok = tokens + m * N;
  const float* grad = dout + m * N * C;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const bool hit = n < N && tok[n] == v;
    const unsigned mask = __ballot_sync(kFullMask, hit);
    if (lane == 0) warp_counts[warp] = __popc(mask);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (hit) positions[before + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(n);
    __syncthreads();
    for (int j = 0; j < total; ++j) {
      const float* row = grad + int64_t(positions[j]) * C;
      for (int c = threadIdx.x; c < C; c += blockDim.x) acc[c] += row[c];
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) dwte[(int64_t(m) * V + v) * C + c] += acc[c];
}

// Block (t, m): dwpe[m, t, :] += sum over sequences b, in order.
__global__ void embedding_backward_wpe_kernel(float* __restrict__ dwpe, const float* __restrict__ dout, int B, int T,
                                              int C) {
  const int t = blockIdx.x, m = blockIdx.y;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.0f;
    for (int b = 0; b < B; ++b) acc += dout[((int64_t(m) * B + b) * T + t) * C + c];
    dwpe[(int64_t(m) * T + t) * C + c] += acc;
  }
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* pos, int64_t pos_model_stride,
                       int M, int B, int T, int C, int V, cudaStream_t stream) {
  const int64_t total = int64_t(M) * B * T * C;
  embedding_forward_kernel<<<blocks_for(total, kThreads), kThreads, 0, stream>>>(out, tokens, wte, pos,
                                                                                 pos_model_stride, int64_t(B) * T, T,
                                                                                 C, V, total);
  UNIV_CUDA_CHECK_LAUNCH();
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int M, int B, int T,
                        int C, int V, cudaStream_t stream) {
  const size_t shared = C * sizeof(float) + (kScanThreads + kScanThreads / kWarpSize) * sizeof(int);
  embedding_backward_wte_kernel<<<dim3(V, M), kScanThreads, shared, stream>>>(dwte, dout, tokens, int64_t(B) * T, C,
                                                                              V);
  UNIV_CUDA_CHECK_LAUNCH();
  if (dwpe) {
    embedding_backward_wpe_kernel<<<dim3(T, M), 128, 0, stream>>>(dwpe, dout, B, T, C);
    UNIV_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace univ::cuda
