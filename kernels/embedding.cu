// Token embedding plus positional encoding, forward and backward. The backward sums
// each token's gradient rows in position order inside one block: deterministic,
// no float atomics, the same order as the CPU backend; the positional gradient is a
// column sum over sequences in a fixed order.
#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kScanThreads = 512;  // positions scanned per step of the token gradient

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
// prefix counts), and adds their gradient rows channel by channel into row v.
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
    // Channels outermost: a thread's loads of the hit rows are independent and can
    // overlap, while each channel still adds its rows in position order.
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      float a = acc[c];
#pragma unroll 4
      for (int j = 0; j < total; ++j) a += grad[int64_t(positions[j]) * C + c];
      acc[c] = a;
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < C; c += blockDim.x) dwte[(int64_t(m) * V + v) * C + c] = acc[c];
}

// dwpe[m] [T*C] = sum over sequences b of dout[m, b] [T*C]. Block (column tile,
// model): thread (x, y) sums sequences y, y + kColumnRowGroups, ... of column x; the
// groups then add up in order. T*C columns give enough blocks for one stage.
__global__ void embedding_backward_wpe_kernel(float* __restrict__ dwpe, const float* __restrict__ dout, int B,
                                              int64_t TC) {
  __shared__ float group[kColumnRowGroups][kColumnTile];
  const int64_t i = blockIdx.x * int64_t(kColumnTile) + threadIdx.x;
  const int64_t m = blockIdx.y;
  float sum = 0.0f;
  if (i < TC)
    for (int b = threadIdx.y; b < B; b += kColumnRowGroups) sum += dout[(m * B + b) * TC + i];
  group[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && i < TC) {
    for (int g = 1; g < kColumnRowGroups; ++g) sum += group[g][threadIdx.x];
    dwpe[m * TC + i] = sum;
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
    const int64_t TC = int64_t(T) * C;
    embedding_backward_wpe_kernel<<<dim3(static_cast<unsigned>(ceil_div<int64_t>(TC, kColumnTile)), M),
                                    dim3(kColumnTile, kColumnRowGroups), 0, stream>>>(dwpe, dout, B, TC);
    UNIV_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace univ::cuda
