// Helpers shared by the kernels: warp reductions, sizes, the deterministic column sums,
// the layer norm of one row and the shared-memory tile product of the fused kernels.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "univ/cuda/chained_launch.hpp"
#include "univ/cuda/check.hpp"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The first statement of every kernel that launch_chained launches: waits until the
// grids it may have started beside are complete and their writes visible (PTX
// griddepcontrol.wait; returns at once after an ordinary launch), then lets the kernel
// after it launch, whose blocks start once every block of this one has passed here.
// Before compute capability 9.0 it does nothing.
__device__ inline void chain_after_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, shared, stream>>>(args...), a programmatic dependent launch
// where chains_launches(stream) (include/univ/cuda/chained_launch.hpp). The kernel
// must begin with chain_after_prior_grids(): nothing orders it after the kernel before
// it but that wait.
template <class... Params, class... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                    const Args&... args) {
  cudaLaunchAttribute early{};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = shared, config.stream = stream;
  if (chains_launches(stream)) config.attrs = &early, config.numAttrs = 1;
  UNIV_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

__device__ inline float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline double warp_sum(double v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// x to TF32's 10 fraction bits, to nearest with ties away from zero (as the
// instruction cvt.rna.tf32.f32, in plain C++ so that the host emulator runs it):
// half the unit of the 13 dropped bits added to the magnitude, then dropped;
// non-finite values pass.
__device__ inline float round_tf32(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7f800000u) == 0x7f800000u) return x;
  return __uint_as_float((bits + 0x1000u) & 0xffffe000u);
}

// *shared_dst = *global_src as an asynchronous copy (PTX cp.async, compute capability
// 8.0 and up; elsewhere a plain copy; on the host emulator deferred until the wait): no
// register holds the value, so a thread may issue many and go on until
// wait_async_copies(). The source must not change before that wait.
__device__ inline void copy_async(float* shared_dst, const float* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(shared_dst))),
               "l"(global_src)
               : "memory");
#elif defined(UNIV_CUDA_EMULATOR)
  emu::copy_async(shared_dst, global_src);
#else
  *shared_dst = *global_src;
#endif
}

// Waits until this thread's asynchronous copies have landed (a barrier after it makes
// them visible to the block).
__device__ inline void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(UNIV_CUDA_EMULATOR)
  emu::wait_async_copies();
#endif
}

// One warp's d += a b on the tensor cores: a 16 x 8 and b 8 x 8 of TF32 values (floats
// through round_tf32), d 16 x 8 in float32 (PTX's mma.sync m16n8k8 .row.col). Each lane
// holds the fragments the PTX ISA assigns it; with g = lane / 4 and c = lane % 4: a =
// {A(g, c), A(g + 8, c), A(g, c + 4), A(g + 8, c + 4)}, b = {B(c, g), B(c + 4, g)}, d =
// {D(g, 2c), D(g, 2c + 1), D(g + 8, 2c), D(g + 8, 2c + 1)}. The host emulator gathers
// a lane's rows of A and columns of B by shuffles and adds their products in k order
// (the tensor cores' order and rounding of the sum are their own: a TF32 tolerance),
// and stops at an operand that is not a TF32 value: the tensor cores would drop its 13
// low bits, a truncation where the kernels mean round_tf32's rounding.
__device__ inline void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
#ifdef __CUDA_ARCH__
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#else
  for (const float x : {a[0], a[1], a[2], a[3], b[0], b[1]})
    if (__float_as_uint(x) & 0x1fffu && (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u) {
      std::fprintf(stderr, "emulator: an operand of mma_tf32 is not rounded to TF32 (%a)\n", x);
      std::abort();
    }
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  // A(r, k) is lane 4 (r % 8) + k % 4's a[r / 8 + 2 (k / 4)], B(k, n) lane 4 n + k % 4's b[k / 4]
  for (int k = 0; k < 8; ++k) {
    const int half = k / 4;
    const float top = __shfl_sync(kFullMask, a[2 * half], 4 * g + k % 4);
    const float bottom = __shfl_sync(kFullMask, a[2 * half + 1], 4 * g + k % 4);
    const float left = __shfl_sync(kFullMask, b[half], 8 * c + k % 4);
    const float right = __shfl_sync(kFullMask, b[half], 8 * c + 4 + k % 4);
    d[0] = fmaf(top, left, d[0]);
    d[1] = fmaf(top, right, d[1]);
    d[2] = fmaf(bottom, left, d[2]);
    d[3] = fmaf(bottom, right, d[3]);
  }
#endif
}

// The accumulator d of a 16 x 8 product (mma_tf32's d layout) as the a operand of the
// next, its columns as the reduction (P of P V): rounded to TF32 and moved between the
// four lanes of each row group by shuffles (lane 4g + c holds columns 2c and 2c + 1,
// and takes c and c + 4). The whole warp calls it.
__device__ inline void accumulator_as_a(float (&a)[4], const float (&d)[4]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  const bool odd = c % 2;
  const int left = 4 * g + c / 2, right = left + 2;  // the lanes holding columns c and c + 4
  float x[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {  // e: a's element, from d[2 (e % 2)] or d[2 (e % 2) + 1] of lane (e < 2 ? left : right)
    const int from = e < 2 ? left : right;
    const float even_col = __shfl_sync(kFullMask, d[2 * (e % 2)], from);
    const float odd_col = __shfl_sync(kFullMask, d[2 * (e % 2) + 1], from);
    x[e] = round_tf32(odd ? odd_col : even_col);
  }
  a[0] = x[0], a[1] = x[1], a[2] = x[2], a[3] = x[3];
}

// The MLP's activations (exact GELU, as PyTorch) and their derivatives.
__device__ inline float activate(float x, Act act) {
  if (act == Act::relu) return x < 0.0f ? 0.0f : x;  // NaN passes, as in PyTorch
  if (act == Act::gelu) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
  return x;
}

__device__ inline float activation_derivative(float x, Act act) {
  if (act == Act::relu) return x > 0.0f ? 1.0f : 0.0f;
  if (act == Act::gelu)
    return 0.5f * (1.0f + erff(x * 0.70710678118654752440f)) + x * 0.39894228040143267794f * expf(-0.5f * x * x);
  return 1.0f;
}

// The layer norm of one row over C channels, a warp's lanes over channels lane, lane +
// 32, ... of x (stride x_stride), sum the lanes' sum of them: out[c * out_stride] = (x -
// mean) * rstd * w[c] + b[c]. Returns {mean, rstd}. Parameters (w, b here, w below) come
// through read-only loads, which need not wait for the stores before them: no kernel
// that reads them writes them.
constexpr float kLayerNormEps = 1e-5f;
__device__ inline float2 normalize_lanes(float* __restrict__ out, int out_stride, const float* x, int x_stride,
                                         float sum, const float* __restrict__ w, const float* __restrict__ b, int C) {
  const int lane = threadIdx.x % kWarpSize;
  const float mu = warp_sum(sum) / C;
  float sq = 0.0f;
  for (int c = lane; c < C; c += kWarpSize) sq += (x[c * x_stride] - mu) * (x[c * x_stride] - mu);
  const float rs = rsqrtf(warp_sum(sq) / C + kLayerNormEps);
  for (int c = lane; c < C; c += kWarpSize)
    out[c * out_stride] = (x[c * x_stride] - mu) * rs * __ldg(w + c) + __ldg(b + c);
  return make_float2(mu, rs);
}

// The input gradient of that norm, a warp's lanes over channels as above: dx[c *
// dx_stride] = dx_in[c * dx_stride] (null: nothing to add; it may be dx) + the gradient
// through the norm of dy (stride dy_stride), from its input x (stride x_stride; it may
// be dx, each element read before the lane writes it), weight w and the row's mean
// and rstd.
__device__ inline void layernorm_backward_lanes(float* dx, const float* dx_in, int dx_stride, const float* dy,
                                                int dy_stride, const float* x, int x_stride,
                                                const float* __restrict__ w, float mu, float rs, int C) {
  const int lane = threadIdx.x % kWarpSize;
  float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
  for (int c = lane; c < C; c += kWarpSize) {
    const float dnorm = __ldg(w + c) * dy[c * dy_stride];
    dnorm_mean += dnorm;
    dnorm_norm_mean += dnorm * (x[c * x_stride] - mu) * rs;
  }
  dnorm_mean = warp_sum(dnorm_mean) / C;
  dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
  for (int c = lane; c < C; c += kWarpSize) {
    const float d =
        (__ldg(w + c) * dy[c * dy_stride] - dnorm_mean - (x[c * x_stride] - mu) * rs * dnorm_norm_mean) * rs;
    dx[c * dx_stride] = dx_in ? dx_in[c * dx_stride] + d : d;
  }
}

// Softmax cross-entropy of one row of V logits x (stride `stride`), a warp's lanes over
// the vocabulary: returns -log softmax(x)[target]; with backward, x becomes the
// gradient of the mean over N rows, (softmax - onehot(target)) / N.
__device__ inline float crossentropy_lanes(float* x, int stride, int target, int V, int N, bool backward) {
  const int lane = threadIdx.x % kWarpSize;
  float max_logit = -FLT_MAX;
  for (int v = lane; v < V; v += kWarpSize) max_logit = fmaxf(max_logit, x[v * stride]);
  max_logit = warp_max(max_logit);
  float sum = 0.0f;
  for (int v = lane; v < V; v += kWarpSize) sum += expf(x[v * stride] - max_logit);
  sum = warp_sum(sum);
  const float target_logit = x[target * stride];
  __syncwarp();  // every lane has read the target's logit before it is overwritten
  if (backward) {
    const float inv = 1.0f / (sum * N);
    for (int v = lane; v < V; v += kWarpSize)
      x[v * stride] = expf(x[v * stride] - max_logit) * inv - (v == target ? 1.0f / N : 0.0f);
  }
  return logf(sum) - (target_logit - max_logit);
}

// The causal softmax of query t's scores (key t2 at s[t2 * stride], t2 < T), a warp's
// lanes over keys, in place: probabilities for t2 <= t, zeros after.
__device__ inline void causal_softmax_lanes(float* s, int stride, int t, int T) {
  const int lane = threadIdx.x % kWarpSize;
  float max_score = -FLT_MAX;
  for (int t2 = lane; t2 <= t; t2 += kWarpSize) max_score = fmaxf(max_score, s[t2 * stride]);
  max_score = warp_max(max_score);
  float sum = 0.0f;
  for (int t2 = lane; t2 <= t; t2 += kWarpSize) {
    s[t2 * stride] = expf(s[t2 * stride] - max_score);
    sum += s[t2 * stride];
  }
  const float inv = 1.0f / warp_sum(sum);
  for (int t2 = lane; t2 < T; t2 += kWarpSize) s[t2 * stride] = t2 <= t ? s[t2 * stride] * inv : 0.0f;
}

// Its backward for query t: d[t2 * d_stride] = p (d - sum over keys of p d) * scale
// from the probabilities p (stride p_stride) and their gradient d, in place, for t2 <=
// t; zeros after.
__device__ inline void causal_softmax_backward_lanes(const float* p, int p_stride, float* d, int d_stride, int t,
                                                     int T, float scale) {
  const int lane = threadIdx.x % kWarpSize;
  float weighted = 0.0f;
  for (int t2 = lane; t2 <= t; t2 += kWarpSize) weighted += p[t2 * p_stride] * d[t2 * d_stride];
  weighted = warp_sum(weighted);
  for (int t2 = lane; t2 < T; t2 += kWarpSize)
    d[t2 * d_stride] = t2 <= t ? p[t2 * p_stride] * (d[t2 * d_stride] - weighted) * scale : 0.0f;
}

// store(i, load(i)) for i < n across the block, kLoadsInFlight loads issued before
// their stores, so that global memory's latency is paid once per batch (a loop that
// stores each value as it comes waits a latency per element).
constexpr int kLoadsInFlight = 8;
template <class Load, class Store>
__device__ void copy_batched(int n, const Load& load, const Store& store) {
  for (int base = threadIdx.x; base < n; base += blockDim.x * kLoadsInFlight) {
    float v[kLoadsInFlight];
#pragma unroll
    for (int j = 0; j < kLoadsInFlight; ++j) {
      const int i = base + j * blockDim.x;
      v[j] = i < n ? load(i) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kLoadsInFlight; ++j) {
      const int i = base + j * blockDim.x;
      if (i < n) store(i, v[j]);
    }
  }
}

// Head `head` (= seq * H + h) of qkv [M,B,T,3C], for both attention files: value(p, t,
// i) is channel i of row t of q, k or v (p = 0, 1, 2) with the QKV bias added (null:
// none), zero past T; part(p) the same as a function of (t, i). Read-only loads: no
// attention kernel writes the qkv it reads.
struct HeadQkv {
  const float *qkv, *bias;
  int T, C;
  __device__ HeadQkv(const float* all, const float* qkv_bias, int B, int T_, int C_, int H, int64_t head)
      : T(T_), C(C_) {
    const int64_t seq = head / H;
    const int offset = static_cast<int>(head % H) * (C / H);
    qkv = all + seq * T * 3 * C + offset;
    bias = qkv_bias ? qkv_bias + seq / B * 3 * C + offset : nullptr;  // model seq / B
  }
  __device__ float value(int p, int t, int i) const {
    if (t >= T) return 0.0f;
    const float x = __ldg(qkv + int64_t(t) * 3 * C + p * C + i);
    return bias ? x + __ldg(bias + p * C + i) : x;
  }
  __device__ auto part(int p) const {
    return [this, p](int t, int i) { return value(p, t, i); };
  }
};

// Shared-memory rows read four floats at a time: padded to multiples of 4, and rows of
// T positions to pad4(T) + 4 floats, so that a warp storing 4 positions x 8 channels
// into a transposed matrix hits 32 banks.
__host__ __device__ constexpr int pad4(int n) { return (n + 3) / 4 * 4; }
__host__ __device__ constexpr int transposed_ld(int T) { return pad4(T) + 4; }

// For each of `batch` products e: out_e(r, c) for r < rows, c < cols, the sum over k in
// range(e, r0, c0) of a(e, r, k) b_e[k, c] (b(e) row-major, ld a multiple of 4, padded
// columns readable); store(e, r, c, value) takes each. A tile of kRows x 4 outputs (rows
// r0.., columns c0..) belongs to `lanes` lanes of a warp (a power of two up to 32, see
// lanes_per_tile), 32 / lanes apart: lane j of them adds the terms k0 + j, k0 + j +
// lanes, ... in order, reading b four values at a time, and shuffles add the lanes'
// partial sums in a fixed tree, so every element's sum is the same from run to run. The
// tiles' column groups run fastest across a warp's 32 / lanes tiles, so a warp reads few
// rows of a (broadcasts) and each quarter-warp's 16-byte reads of b are one k's
// consecutive columns (distinct banks; the lanes of one tile side by side would read 2
// to 8 rows at few columns, the same banks where rows are a multiple of 32 floats apart).
// Every thread of the block calls it (the shuffles need whole warps). The fused
// kernels' products are all of this form.
template <int kRows, class A, class B, class Range, class Store>
__device__ void tile_product(int batch, int rows, int cols, const A& a, const B& b, int ldb, const Range& range,
                             const Store& store, int lanes = 1) {
  const int col_groups = (cols + 3) / 4, tiles_per = (rows + kRows - 1) / kRows * col_groups;
  const int tiles = batch * tiles_per, lane = threadIdx.x % kWarpSize, tiles_per_warp = kWarpSize / lanes;
  for (int first = threadIdx.x - lane; first < tiles * lanes; first += blockDim.x) {  // the same trips for a whole warp
    const int tile = first / lanes + lane % tiles_per_warp, j = lane / tiles_per_warp;
    const int e = tile / tiles_per, r0 = tile % tiles_per / col_groups * kRows, c0 = tile % col_groups * 4;
    const bool active = tile < tiles;
    float acc[kRows][4] = {};
    if (active) {
      const int2 k_range = range(e, r0, c0);
      const float* be = b(e);
      for (int k = k_range.x + j; k < k_range.y; k += lanes) {
        const float4 bk = *reinterpret_cast<const float4*>(be + k * ldb + c0);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float ar = a(e, min(r0 + r, rows - 1), k);
          acc[r][0] += ar * bk.x;
          acc[r][1] += ar * bk.y;
          acc[r][2] += ar * bk.z;
          acc[r][3] += ar * bk.w;
        }
      }
    }
    for (int offset = tiles_per_warp; offset < kWarpSize; offset <<= 1)  // j ^ 1, then j ^ 2, ...
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] += __shfl_xor_sync(kFullMask, acc[r][c], offset);
    if (!active || j != 0) continue;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (r0 + r < rows && c0 + c < cols) store(e, r0 + r, c0 + c, acc[r][c]);
  }
}

// Lanes per tile for tile_product: a power of two up to 8, as many as keep `tiles`
// tiles within `threads` threads while each lane keeps at least 8 of `depth` terms.
// Products with few tiles and long sums (a head's T x head-width products, narrow
// layers' weight products) then put every thread to work, their longest sum shorter.
__host__ __device__ constexpr int lanes_per_tile(int tiles, int threads, int depth) {
  int lanes = 1;
  while (lanes < 8 && tiles * lanes * 2 <= threads && depth >= lanes * 2 * 8) lanes *= 2;
  return lanes;
}

template <class T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// The shared memory one block may opt in to on the current device (227 KiB on sm_90).
inline size_t shared_memory_optin_limit() {
  int device = 0, bytes = 0;
  UNIV_CUDA_CHECK(cudaGetDevice(&device));
  UNIV_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

// The stream a cuBLAS handle enqueues on: the own kernels that stand in for its
// products go there too.
inline cudaStream_t stream_of(cublasHandle_t handle) {
  cudaStream_t stream = nullptr;
  UNIV_CUBLAS_CHECK(cublasGetStream(handle, &stream));
  return stream;
}

// Blocks for a grid-stride loop over n elements.
inline int blocks_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div<int64_t>(n, threads);
  return static_cast<int>(blocks < 65536 * 16 ? (blocks > 0 ? blocks : 1) : 65536 * 16);
}

// The column sums of parameter gradients (kernels.hpp's ColumnSums): stage 1, a
// block (column tile, row chunk, model) sums its chunk's rows, kColumnRowGroups
// interleaved row groups per column added in order, into partials [M, chunks,
// columns]; stage 2 adds the chunks in order into the gradient. The chunks spread a
// model's rows over the GPU, which one block per column tile would leave mostly idle.
constexpr int kColumnTile = 32;       // columns per block, one per lane
constexpr int kColumnRowGroups = 8;   // stage 1: row groups per block
constexpr int kChunkRows = 32;        // rows per chunk ...
constexpr int kMaxChunks = 256;       // ... until a model has this many chunks

// Row chunks of a model's N rows (at least one, so that N = 0 still adds zeros).
inline int column_chunks(int N) { return std::max(1, std::min(ceil_div(N, kChunkRows), kMaxChunks)); }

}  // namespace univ::cuda
