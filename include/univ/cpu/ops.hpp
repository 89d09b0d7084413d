// The CPU backend's ops: readable reference versions of every CUDA kernel, templated
// on the float type (float to train, double for gradient checks), each covering all
// M models at once. Shapes: M models, B sequences, T positions, C = d_model,
// H heads, V vocabulary, N = B * T rows. Parameter gradients accumulate (+=).
#pragma once
#include <cstdint>

#include "univ/config.hpp"

namespace univ::cpu {

// out[M,B,T,C] = wte[m, tokens[m,b,t]] + pos[m, t]. pos is [M,T,C] (learned,
// pos_model_stride = T*C) or one shared [T,C] table (sinusoidal, stride 0).
template <class F>
void embedding_forward(F* out, const int32_t* tokens, const F* wte, const F* pos, int64_t pos_model_stride, int M,
                       int B, int T, int C, int V);
// dwte[M,V,C] += ..., dwpe[M,T,C] += ... (dwpe null: fixed positions). Sequential per model: deterministic.
template <class F>
void embedding_backward(F* dwte, F* dwpe, const F* dout, const int32_t* tokens, int M, int B, int T, int C, int V);
// table[T,C]: sin(t / 10000^(2i/C)) at 2i, cos at 2i+1.
template <class F>
void sinusoidal_positions(F* table, int T, int C);

// out[M,N,C] = (inp - mean) * rstd * weight + bias; mean, rstd [M,N] kept for backward.
template <class F>
void layernorm_forward(F* out, F* mean, F* rstd, const F* inp, const F* weight, const F* bias, int M, int N, int C);
// dinp += ..., dweight += ..., dbias += ...
template <class F>
void layernorm_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp, const F* weight, const F* mean,
                        const F* rstd, int M, int N, int C);

// out[M,N,OC] = inp[M,N,C] weight[M,OC,C]^T + bias[M,OC] (bias may be null).
template <class F>
void matmul_forward(F* out, const F* inp, const F* weight, const F* bias, int M, int N, int C, int OC);
// dinp = dout weight (overwritten; null: skipped), dweight += dout^T inp, dbias += sum over rows.
template <class F>
void matmul_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp, const F* weight, int M, int N, int C,
                     int OC);

// Causal multi-head attention. qkv [M,B,T,3C] = q | k | v, head h on channels
// [h*C/H, (h+1)*C/H) of each; out [M,B,T,C]; att [M,B,H,T,T] softmax probabilities
// (zero above the diagonal).
template <class F>
void attention_forward(F* out, F* att, const F* qkv, int M, int B, int T, int C, int H);
// dqkv [M,B,T,3C] overwritten.
template <class F>
void attention_backward(F* dqkv, const F* dout, const F* qkv, const F* att, int M, int B, int T, int C, int H);

// out[n] = act(inp[n]); GELU is the exact (erf) form, as PyTorch's default.
template <class F>
void activation_forward(F* out, const F* inp, int64_t n, Activation act);
// dinp[n] = dout[n] * act'(inp[n]) (overwritten).
template <class F>
void activation_backward(F* dinp, const F* dout, const F* inp, int64_t n, Activation act);

// out[n] = a[n] + b[n]
template <class F>
void residual_forward(F* out, const F* a, const F* b, int64_t n);

// Fused softmax cross-entropy. losses[M] = mean over the N rows of -log softmax(logits[m,n])[target];
// dlogits[M,N,V] (null: forward only) = (softmax - onehot(target)) / N.
template <class F>
void crossentropy_forward_backward(F* losses, F* dlogits, const F* logits, const int32_t* targets, int M, int N,
                                   int V);

// One AdamW update (PyTorch's formulas) of n elements; grads are multiplied by
// grad_scale (the clipping factor) first. step is the 1-based update count.
struct AdamWStep {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;
};
template <class F>
void adamw_update(F* params, const F* grads, F* exp_avg, F* exp_avg_sq, int64_t n, double grad_scale,
                  const AdamWStep& h);

// Sum of squares in double over fixed chunks: the same result for any thread count.
template <class F>
double sum_squares(const F* x, int64_t n);

}  // namespace univ::cpu
