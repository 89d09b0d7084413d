// A transformer block's forward and backward passes, each in one kernel: one block of
// threads per (model, sequence) holds the sequence's residual stream (or its gradient)
// and the layer's activations in shared memory, transposed (features x positions), and
// each weight matrix in turn. The forward runs norm, QKV, causal attention,
// projection, norm and MLP with their biases, residuals and activation, the first
// layer's embedding before and the last layer's final norm and head after (logits,
// cross-entropy, and for training the gradient back through both); the backward runs
// the chain of input gradients back through a block, and sums each sequence's share of
// the bias and norm gradients on the way. Short sequences of narrow models
// (the seed experiment's) fit; there each replaces a chain of seven kernels per layer.
// Both write what the per-op kernels write: the forward every activation the backward
// reads, the backward every gradient the parameter gradients (run apart, per op) read.
#include <cfloat>

#include "common.cuh"
#include "univ/cuda/kernels.hpp"

namespace univ::cuda {

namespace {

constexpr int kThreads = 512;  // one block per SM (its shared memory holds no second)
constexpr int kRows = 4;  // weight products: output features per thread tile

// w [rows, ld] = src [rows, cols].
__device__ void stage_weights(float* w, const float* __restrict__ src, int rows, int cols, int ld) {
  copy_batched(rows * cols, [&](int i) { return src[i]; }, [&](int i, float v) { w[i / cols * ld + i % cols] = v; });
}

// dst [cols, ldt] = src [T, cols] (global, row-major) transposed.
__device__ void load_transposed(float* dst, const float* __restrict__ src, int T, int cols, int ldt) {
  copy_batched(T * cols, [&](int i) { return src[i]; }, [&](int i, float v) { dst[i % cols * ldt + i / cols] = v; });
}

// dst [T, cols] (global, row-major) = src [cols, ldt] transposed.
__device__ void store_rows(float* __restrict__ dst, const float* src, int T, int cols, int ldt) {
  for (int idx = threadIdx.x; idx < T * cols; idx += blockDim.x) dst[idx] = src[idx % cols * ldt + idx / cols];
}

// out[c, t] = the layer norm of x[., t] over C channels, a warp per position; mean,
// rstd [T] to global memory.
__device__ void norm_positions(float* out, const float* x, int ldt, const float* __restrict__ weight,
                               const float* __restrict__ bias, float* __restrict__ mean, float* __restrict__ rstd,
                               int T, int C) {
  const int lane = threadIdx.x % kWarpSize;
  for (int t = threadIdx.x / kWarpSize; t < T; t += blockDim.x / kWarpSize) {
    float sum = 0.0f;
    for (int c = lane; c < C; c += kWarpSize) sum += x[c * ldt + t];
    const float2 stats = normalize_lanes(out + t, ldt, x + t, ldt, sum, weight, bias, C);
    if (lane == 0) {
      mean[t] = stats.x;
      rstd[t] = stats.y;
    }
  }
}

// out(o, t) = sum over k < K of a(o, k) act[k, t] for o < OC, t < T (act row stride
// ldt), each (o, t) passed once to epilogue(o, t, sum): a reads a staged weight matrix
// as it is (forward) or transposed (backward). All threads call it.
template <class A, class Epilogue>
__device__ void weight_product(int OC, int T, int K, const A& a, const float* act, int ldt, const Epilogue& epilogue) {
  tile_product<kRows>(
      1, OC, T, [&](int, int o, int k) { return a(o, k); }, [&](int) { return act; }, ldt,
      [&](int, int, int) { return make_int2(0, K); }, [&](int, int o, int t, float v) { epilogue(o, t, v); },
      lanes_per_tile(ceil_div(OC, kRows) * ceil_div(T, 4), kThreads, K));
}

// Lanes per tile of the heads' head-width x T products (sums over up to T positions).
__device__ int head_product_lanes(int H, int hd, int T) {
  return lanes_per_tile(H * ceil_div(hd, 2) * ceil_div(T, 4), kThreads, T);
}

// The forward's products: out = w x with w [OC, K] staged with rows of K + 1.
template <class Epilogue>
__device__ void forward_product(int OC, int T, int K, const float* w, const float* act, int ldt,
                                const Epilogue& epilogue) {
  weight_product(OC, T, K, [&](int o, int k) { return w[o * (K + 1) + k]; }, act, ldt, epilogue);
}

// The backward's products: dx = w^T dy, w [K, OC] staged with rows of ldw, odd (w[k,
// o]: a warp's tiles read consecutive o, and a tile's lanes rows k apart: distinct
// banks).
template <class Epilogue>
__device__ void backward_product(int OC, int T, int K, const float* w, int ldw, const float* dy, int ldt,
                                 const Epilogue& epilogue) {
  weight_product(OC, T, K, [&](int o, int k) { return w[k * ldw + o]; }, dy, ldt, epilogue);
}

// The forward's shared memory, in floats from its start: w, one weight matrix [OC, K +
// 1] (odd rows, so that a warp's tiles read distinct banks); x, the residual stream
// [C, ldt]; ln, a norm's output, then the attention's [C, ldt]; wide, qkv [3C, ldt],
// then the MLP's activations [D, ldt]; scores, the attention's [H, T, ldt].
struct ForwardLayout {
  int ldt;
  int64_t x, ln, wide, scores, total;
};
// V: the vocabulary of the head that ends the last layer, 0 without one (its weights
// in w, its logits in wide).
__host__ __device__ ForwardLayout forward_layout(int T, int C, int H, int D, int V) {
  ForwardLayout s;
  s.ldt = transposed_ld(T);
  const int64_t w = max(max(max(int64_t(3) * C, int64_t(D)), int64_t(V)) * (C + 1), int64_t(C) * (D + 1));
  s.x = pad4(static_cast<int>(w));
  s.ln = s.x + int64_t(C) * s.ldt;
  s.wide = s.ln + int64_t(C) * s.ldt;
  s.scores = s.wide + int64_t(max(max(3 * C, D), V)) * s.ldt;
  s.total = s.scores + int64_t(H) * T * s.ldt;
  return s;
}

// The backward's: w, one weight matrix as it is [OC, K], rows of K + 1; g, the
// gradient of the residual stream [C, ldt]; dln, a norm's output gradient, then the
// attention output's [C, ldt]; wide, the pre-activations, then their gradient [D,
// ldt], then qkv's gradient [3C, ldt]; qkv [3C, ldt]; probs, the probabilities and
// their gradients [2, H, T, ldt].
struct BackwardLayout {
  int ldt;
  int64_t g, dln, wide, qkv, probs, total;
};
__host__ __device__ BackwardLayout backward_layout(int T, int C, int H, int D) {
  BackwardLayout s;
  s.ldt = transposed_ld(T);
  const int64_t w = max(max(int64_t(3) * C, int64_t(D)) * (C + 1), int64_t(C) * (D + 1));
  s.g = pad4(static_cast<int>(w));
  s.dln = s.g + int64_t(C) * s.ldt;
  s.wide = s.dln + int64_t(C) * s.ldt;
  s.qkv = s.wide + int64_t(max(3 * C, D)) * s.ldt;
  s.probs = s.qkv + int64_t(3 * C) * s.ldt;
  s.total = s.probs + int64_t(2) * H * T * s.ldt;
  return s;
}

__global__ void __launch_bounds__(kThreads, 1) block_forward_kernel(const __grid_constant__ BlockForward p) {
  chain_after_prior_grids();
  extern __shared__ float4 shared4[];
  const int T = p.T, C = p.C, H = p.H, D = p.D, hd = C / H;
  const int V = p.lm_head ? p.V : 0;
  const ForwardLayout layout = forward_layout(T, C, H, D, V);
  const int ldt = layout.ldt;
  float* smem = reinterpret_cast<float*>(shared4);
  float *w = smem, *x = smem + layout.x, *ln = smem + layout.ln, *wide = smem + layout.wide,
        *scores = smem + layout.scores;
  const int64_t seq = blockIdx.x, m = seq / p.B, row0 = seq * T;  // rows [row0, row0 + T) of [M, N]
  const float* __restrict__ qkv_b = p.qkv_b + m * 3 * C;
  const float* __restrict__ proj_b = p.proj_b + m * C;
  const float* __restrict__ fc_b = p.fc_b + m * D;
  const float* __restrict__ out_b = p.out_b + m * C;

  // x[c, t]: the residual stream entering the layer, or the embedding (written out)
  if (p.resid_in) {
    load_transposed(x, p.resid_in + row0 * C, T, C, ldt);
  } else {
    copy_batched(
        T * C,
        [&](int i) {
          const int t = i / C, c = i % C;
          return p.wte[(m * p.V + p.tokens[row0 + t]) * C + c] + p.pos[m * p.pos_model_stride + int64_t(t) * C + c];
        },
        [&](int i, float v) {
          p.encoded[row0 * C + i] = v;
          x[i % C * ldt + i / C] = v;
        });
  }
  stage_weights(w, p.qkv_w + m * 3 * C * C, 3 * C, C, C + 1);
  __syncthreads();
  norm_positions(ln, x, ldt, p.ln1_w + m * C, p.ln1_b + m * C, p.ln1_mean + row0, p.ln1_rstd + row0, T, C);
  __syncthreads();
  store_rows(p.ln1 + row0 * C, ln, T, C, ldt);
  forward_product(3 * C, T, C, w, ln, ldt, [&](int o, int t, float v) { wide[o * ldt + t] = v + qkv_b[o]; });
  __syncthreads();

  // attention: rows [0, C) of wide are q, [C, 2C) k, [2C, 3C) v; head h on hd of each
  store_rows(p.qkv + row0 * 3 * C, wide, T, 3 * C, ldt);
  stage_weights(w, p.proj_w + m * C * C, C, C, C + 1);
  tile_product<2>(
      H, T, T, [&](int h, int t2, int i) { return wide[(C + h * hd + i) * ldt + t2]; },
      [&](int h) { return wide + h * hd * ldt; }, ldt,
      [&](int, int r0, int c0) { return c0 + 3 < r0 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int h, int t2, int t, float dot) { scores[(h * T + t2) * ldt + t] = dot * p.scale; });
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int col = threadIdx.x / kWarpSize; col < H * T; col += warps) {  // softmax, a warp per (head, query)
    const int h = col / T, t = col % T;
    float* s = scores + h * T * ldt + t;  // key t2 at s[t2 * ldt]
    causal_softmax_lanes(s, ldt, t, T);
    float* a = p.att + ((seq * H + h) * T + t) * T;  // [M, B, H, T, T]
    for (int t2 = lane; t2 < T; t2 += kWarpSize) a[t2] = s[t2 * ldt];  // each lane its own keys
  }
  __syncthreads();
  const int head_lanes = head_product_lanes(H, hd, T);
  // y[h hd + i, t] = sum over t2 <= t of v[i, t2] p[t2, t], into ln (free since the QKV product)
  tile_product<2>(
      H, hd, T, [&](int h, int i, int t2) { return wide[(2 * C + h * hd + i) * ldt + t2]; },
      [&](int h) { return scores + h * T * ldt; }, ldt, [&](int, int, int c0) { return make_int2(0, min(T, c0 + 4)); },
      [&](int h, int i, int t, float acc) { ln[(h * hd + i) * ldt + t] = acc; },
      head_lanes);
  __syncthreads();
  store_rows(p.atty + row0 * C, ln, T, C, ldt);
  forward_product(C, T, C, w, ln, ldt, [&](int o, int t, float v) { x[o * ldt + t] += v + proj_b[o]; });
  __syncthreads();

  // MLP: x = resid_mid + act(ln2 W1^T + b1) W2^T + b2
  store_rows(p.resid_mid + row0 * C, x, T, C, ldt);
  norm_positions(ln, x, ldt, p.ln2_w + m * C, p.ln2_b + m * C, p.ln2_mean + row0, p.ln2_rstd + row0, T, C);
  stage_weights(w, p.fc_w + m * D * C, D, C, C + 1);
  __syncthreads();
  store_rows(p.ln2 + row0 * C, ln, T, C, ldt);
  forward_product(D, T, C, w, ln, ldt, [&](int o, int t, float v) {
    const float pre = v + fc_b[o];
    p.pre[(row0 + t) * D + o] = pre;
    wide[o * ldt + t] = activate(pre, p.act);
  });
  __syncthreads();
  store_rows(p.post + row0 * D, wide, T, D, ldt);
  stage_weights(w, p.out_w + m * C * D, C, D, D + 1);
  __syncthreads();
  forward_product(C, T, D, w, wide, ldt, [&](int o, int t, float v) { x[o * ldt + t] += v + out_b[o]; });
  __syncthreads();
  store_rows(p.resid_out + row0 * C, x, T, C, ldt);
  if (!p.lnf) return;
  // the last layer: the final norm, then the head
  norm_positions(ln, x, ldt, p.lnf_w + m * C, p.lnf_b + m * C, p.lnf_mean + row0, p.lnf_rstd + row0, T, C);
  if (V) stage_weights(w, p.lm_head + m * V * C, V, C, C + 1);
  __syncthreads();
  store_rows(p.lnf + row0 * C, ln, T, C, ldt);
  if (!V) return;
  float* logits = wide;  // [V, ldt]
  forward_product(V, T, C, w, ln, ldt, [&](int v, int t, float acc) { logits[v * ldt + t] = acc; });
  __syncthreads();
  for (int t = threadIdx.x / kWarpSize; t < T; t += warps) {  // a warp per position
    const float loss = crossentropy_lanes(logits + t, ldt, p.targets[row0 + t], V, p.B * T, p.backward);
    if (lane == 0) p.row_loss[row0 + t] = loss;
  }
  __syncthreads();
  store_rows(p.logits + row0 * V, logits, T, V, ldt);  // with backward, their gradient
  if (!p.backward) return;
  // dlnf = dlogits lm_head, into ln; dresid_top = the final norm's input gradient, over x
  backward_product(C, T, V, w, C + 1, logits, ldt, [&](int c, int t, float v) { ln[c * ldt + t] = v; });
  __syncthreads();
  store_rows(p.dlnf + row0 * C, ln, T, C, ldt);
  for (int t = threadIdx.x / kWarpSize; t < T; t += warps)
    layernorm_backward_lanes(x + t, nullptr, ldt, ln + t, ldt, x + t, ldt, p.lnf_w + m * C, p.lnf_mean[row0 + t],
                             p.lnf_rstd[row0 + t], C);
  __syncthreads();
  store_rows(p.dresid_top + row0 * C, x, T, C, ldt);
}

// g[c, t] += the input gradient of the layer norm of x [T, C] (global) from dln[., t],
// a warp per position.
__device__ void norm_backward_positions(float* g, const float* dln, int ldt, const float* __restrict__ x,
                                        const float* __restrict__ weight, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, int T, int C) {
  for (int t = threadIdx.x / kWarpSize; t < T; t += blockDim.x / kWarpSize)
    layernorm_backward_lanes(g + t, g + t, ldt, dln + t, ldt, x + int64_t(t) * C, 1, weight, mean[t], rstd[t], C);
}

// parts[c] = the sum over positions t < T of term(c, t) for c < cols: one sequence's
// share of a column sum (ColumnSums adds the sequences' shares in order). Adjacent
// lanes share a column, each every lanes-th position, their sums added by shuffles in
// a fixed tree. All threads call it.
template <class Term>
__device__ void sum_positions(float* __restrict__ parts, int cols, int T, const Term& term) {
  const int lanes = lanes_per_tile(cols, kThreads, T), lane = threadIdx.x % kWarpSize;
  for (int first = threadIdx.x - lane; first < cols * lanes; first += blockDim.x) {  // whole warps
    const int item = first + lane, c = item / lanes, j = item % lanes;
    const bool active = item < cols * lanes;
    float sum = 0.0f;
    if (active)
      for (int t = j; t < T; t += lanes) sum += term(c, t);
    for (int offset = 1; offset < lanes; offset <<= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
    if (active && j == 0) parts[c] = sum;
  }
}

// One sequence's share of a layer norm's weight and bias gradients from the gradient
// at its output dln [C, ldt] and its input x [T, C] (global).
__device__ void norm_param_sums(float* weight_parts, float* bias_parts, const float* dln, int ldt,
                                const float* __restrict__ x, const float* __restrict__ mean,
                                const float* __restrict__ rstd, int T, int C) {
  sum_positions(weight_parts, C, T,
                [&](int c, int t) { return dln[c * ldt + t] * ((x[int64_t(t) * C + c] - mean[t]) * rstd[t]); });
  sum_positions(bias_parts, C, T, [&](int c, int t) { return dln[c * ldt + t]; });
}

__global__ void __launch_bounds__(kThreads, 1) block_backward_kernel(const __grid_constant__ BlockBackward p) {
  chain_after_prior_grids();
  extern __shared__ float4 shared4[];
  const int T = p.T, C = p.C, H = p.H, D = p.D, hd = C / H;
  const BackwardLayout layout = backward_layout(T, C, H, D);
  const int ldt = layout.ldt;
  float* smem = reinterpret_cast<float*>(shared4);
  float *w = smem, *g = smem + layout.g, *dln = smem + layout.dln, *wide = smem + layout.wide,
        *qkv = smem + layout.qkv, *attention = smem + layout.probs;
  const int64_t seq = blockIdx.x, m = seq / p.B, row0 = seq * T;  // rows [row0, row0 + T) of [M, N]

  // MLP: dpre = (dresid W2) * act'(pre); dln2 = dpre W1; dresid_mid = dresid + norm'(dln2)
  load_transposed(g, p.dresid_out + row0 * C, T, C, ldt);
  load_transposed(wide, p.pre + row0 * D, T, D, ldt);
  load_transposed(qkv, p.qkv + row0 * 3 * C, T, 3 * C, ldt);
  stage_weights(w, p.out_w + m * C * D, C, D, D + 1);
  __syncthreads();
  const BlockParamSums& sums = p.sums;  // this sequence's shares from seq * columns on
  sum_positions(sums.out_b + seq * C, C, T, [&](int c, int t) { return g[c * ldt + t]; });
  backward_product(D, T, C, w, D + 1, g, ldt, [&](int i, int t, float v) {
    wide[i * ldt + t] = v * activation_derivative(wide[i * ldt + t], p.act);
  });
  __syncthreads();
  store_rows(p.dpre + row0 * D, wide, T, D, ldt);
  sum_positions(sums.fc_b + seq * D, D, T, [&](int i, int t) { return wide[i * ldt + t]; });
  stage_weights(w, p.fc_w + m * D * C, D, C, C + 1);
  __syncthreads();
  backward_product(C, T, D, w, C + 1, wide, ldt, [&](int i, int t, float v) { dln[i * ldt + t] = v; });
  __syncthreads();
  store_rows(p.dln2 + row0 * C, dln, T, C, ldt);
  norm_param_sums(sums.ln2_w + seq * C, sums.ln2_b + seq * C, dln, ldt, p.resid_mid + row0 * C, p.ln2_mean + row0,
                  p.ln2_rstd + row0, T, C);
  norm_backward_positions(g, dln, ldt, p.resid_mid + row0 * C, p.ln2_w + m * C, p.ln2_mean + row0,
                          p.ln2_rstd + row0, T, C);
  stage_weights(w, p.proj_w + m * C * C, C, C, C + 1);
  __syncthreads();

  // attention: datty = dresid_mid Wproj, through the attention into dqkv (in wide)
  store_rows(p.dresid_mid + row0 * C, g, T, C, ldt);
  sum_positions(sums.proj_b + seq * C, C, T, [&](int c, int t) { return g[c * ldt + t]; });
  backward_product(C, T, C, w, C + 1, g, ldt, [&](int i, int t, float v) { dln[i * ldt + t] = v; });
  __syncthreads();
  float* dprobs = attention;                      // [H, T (key t2), ldt (query t)]: d(probabilities), then d(scores)
  float* probs = attention + int64_t(H) * T * ldt;  // [H, T (query t), ldt (key t2)]: probabilities, then d(scores)
  copy_batched(H * T * T, [&](int i) { return p.att[seq * H * T * T + i]; },
               [&](int i, float v) { probs[i / T * ldt + i % T] = v; });
  stage_weights(w, p.qkv_w + m * 3 * C * C, 3 * C, C, C + 1);
  // dprob^T(t2, t) = v(t2) . dy(t), for t2 <= t
  tile_product<2>(
      H, T, T, [&](int h, int t2, int i) { return qkv[(2 * C + h * hd + i) * ldt + t2]; },
      [&](int h) { return dln + h * hd * ldt; }, ldt,
      [&](int, int r0, int c0) { return c0 + 3 < r0 ? make_int2(0, 0) : make_int2(0, hd); },
      [&](int h, int t2, int t, float dot) { dprobs[(h * T + t2) * ldt + t] = dot; });
  __syncthreads();
  const int head_lanes = head_product_lanes(H, hd, T);
  // dv[i, t2] = sum over t >= t2 of dy[i, t] p(t, t2)
  tile_product<2>(
      H, hd, T, [&](int h, int i, int t) { return dln[(h * hd + i) * ldt + t]; },
      [&](int h) { return probs + h * T * ldt; }, ldt, [&](int, int, int c0) { return make_int2(c0, T); },
      [&](int h, int i, int t2, float acc) { wide[(2 * C + h * hd + i) * ldt + t2] = acc; },
      head_lanes);
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int row = threadIdx.x / kWarpSize; row < H * T; row += warps) {  // softmax backward, a warp per (head, query)
    const int h = row / T, t = row % T;
    float* a = probs + (h * T + t) * ldt;  // key t2 at a[t2]
    float* d = dprobs + h * T * ldt + t;   // key t2 at d[t2 * ldt]
    causal_softmax_backward_lanes(a, 1, d, ldt, t, T, p.scale);
    for (int t2 = lane; t2 < T; t2 += kWarpSize) a[t2] = d[t2 * ldt];  // d(scores) in both layouts
  }
  __syncthreads();
  // dq[i, t] = sum over t2 <= t of k[i, t2] ds(t, t2); dk[i, t2] = sum over t >= t2 of q[i, t] ds(t, t2)
  tile_product<2>(
      H, hd, T, [&](int h, int i, int t2) { return qkv[(C + h * hd + i) * ldt + t2]; },
      [&](int h) { return dprobs + h * T * ldt; }, ldt,
      [&](int, int, int c0) { return make_int2(0, min(T, c0 + 4)); },
      [&](int h, int i, int t, float acc) { wide[(h * hd + i) * ldt + t] = acc; },
      head_lanes);
  tile_product<2>(
      H, hd, T, [&](int h, int i, int t) { return qkv[(h * hd + i) * ldt + t]; },
      [&](int h) { return probs + h * T * ldt; }, ldt, [&](int, int, int c0) { return make_int2(c0, T); },
      [&](int h, int i, int t2, float acc) { wide[(C + h * hd + i) * ldt + t2] = acc; },
      head_lanes);
  __syncthreads();

  // dln1 = dqkv Wqkv; dresid_in = dresid_mid + norm'(dln1)
  store_rows(p.dqkv + row0 * 3 * C, wide, T, 3 * C, ldt);
  sum_positions(sums.qkv_b + seq * 3 * C, 3 * C, T, [&](int o, int t) { return wide[o * ldt + t]; });
  backward_product(C, T, 3 * C, w, C + 1, wide, ldt, [&](int i, int t, float v) { dln[i * ldt + t] = v; });
  __syncthreads();
  store_rows(p.dln1 + row0 * C, dln, T, C, ldt);
  norm_param_sums(sums.ln1_w + seq * C, sums.ln1_b + seq * C, dln, ldt, p.resid_in + row0 * C, p.ln1_mean + row0,
                  p.ln1_rstd + row0, T, C);
  norm_backward_positions(g, dln, ldt, p.resid_in + row0 * C, p.ln1_w + m * C, p.ln1_mean + row0,
                          p.ln1_rstd + row0, T, C);
  __syncthreads();
  store_rows(p.dresid_in + row0 * C, g, T, C, ldt);
}

size_t forward_bytes(int T, int C, int H, int D, int V) {
  return size_t(forward_layout(T, C, H, D, V).total) * sizeof(float);
}
size_t backward_bytes(int T, int C, int H, int D) { return size_t(backward_layout(T, C, H, D).total) * sizeof(float); }

}  // namespace

bool block_forward_fits(int T, int C, int H, int D, int head_vocab) {
  return T >= 1 && C % H == 0 && forward_bytes(T, C, H, D, head_vocab) <= shared_memory_optin_limit();
}

bool block_backward_fits(int T, int C, int H, int D) {
  return T >= 1 && C % H == 0 && backward_bytes(T, C, H, D) <= shared_memory_optin_limit();
}

void prepare_block_kernels() {
  const int bytes = static_cast<int>(shared_memory_optin_limit());
  UNIV_CUDA_CHECK(cudaFuncSetAttribute(block_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  UNIV_CUDA_CHECK(cudaFuncSetAttribute(block_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

void block_forward(const BlockForward& p, int M, cudaStream_t stream) {
  launch_chained(block_forward_kernel, M * p.B, kThreads, forward_bytes(p.T, p.C, p.H, p.D, p.lm_head ? p.V : 0),
                 stream, p);
}

void block_backward(const BlockBackward& p, int M, cudaStream_t stream) {
  launch_chained(block_backward_kernel, M * p.B, kThreads, backward_bytes(p.T, p.C, p.H, p.D), stream, p);
}

}  // namespace univ::cuda
