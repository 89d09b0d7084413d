// Launchers of the CUDA kernels (kernels/*.cu), one group per op, forward and
// backward together; each launch covers all M models. Shapes as in univ/cpu/ops.hpp:
// M models, B sequences, T positions, C = d_model, H heads, D = d_mlp, V vocabulary,
// N = B * T rows; tensors [M, ...], contiguous per model. Parameter gradients are
// written (=), each by one op per pass, so nothing zeroes them first; every reduction
// runs in a fixed order: results are bitwise reproducible. Plain C++17 (the kernels
// compile as such).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "univ/split_precision.hpp"

namespace univ::cuda {

enum class Act { none, relu, gelu };

// Parameter gradients that sum over rows (layer norm, biases, split weight gradients)
// run in two stages, without atomics and in an order fixed by the shapes alone.
// Stage 1, in each op's backward, writes partial sums [outputs, M, chunks, columns]
// where a ColumnSums says; stage 2 (ColumnSums::sum_added and finish) writes each
// gradient as the sum of its op's chunks in order, the ops added since the last stage 2
// in one launch (bias.cu).
struct ColumnSumJob {
  float* out0;            // out0[m, c] = sum over k of partials[0, m, k, c]
  float* out1;            // null, or out1[m, c] = the same of partials[1, m, k, c]
  const float* partials;  // [out1 ? 2 : 1, models, chunks, columns]
  int64_t columns;
  int models, chunks;
};
class ColumnSums {
 public:
  // scratch: device memory for `capacity` floats, holding the partials until finish().
  ColumnSums(float* scratch, int64_t capacity) : scratch_(scratch), capacity_(capacity) {}
  // Where stage 1 writes the partials [out1 ? 2 : 1, M, chunks, C] of out0 (and out1).
  float* add(float* out0, float* out1, int M, int chunks, int64_t C);
  // Stage 2 of every sum added since the last sum_added() or finish(), their partials
  // kept: a stage 1 on another stream may still be running, and must not write where
  // this stage 2 reads.
  void sum_added(cudaStream_t stream);
  // sum_added(); the scratch is free again after.
  void finish(cudaStream_t stream);
  // The floats one add() of n partials takes from the scratch (256-byte aligned).
  static int64_t room(int64_t n) { return (n + 63) / 64 * 64; }

 private:
  float* scratch_;
  int64_t capacity_, used_ = 0;
  std::vector<ColumnSumJob> jobs_;
};
// The room of the partials of column sums over N rows of `columns` columns per model.
int64_t column_sum_partials(int M, int N, int64_t columns);

// embedding.cu: the backward (the forward is fused into the first layer norm) -------
// Host: std::out_of_range for a token of tokens [n] outside [0, V).
void check_tokens(const int32_t* tokens, int64_t n, int V);
// Host: each model's positions n in [0, N) grouped by token (a stable counting sort of
// tokens [M,N]): token_rows [M,N], model m's rows of token v at token_rows[m,
// token_starts[m,v] .. token_starts[m,v+1]); token_starts [M,V+1]. Throws as
// check_tokens.
void sort_positions_by_token(int32_t* token_rows, int32_t* token_starts, const int32_t* tokens, int M, int N, int V);
// dwte[M,V,C] = ..., dwpe[M,T,C] = ... (null: fixed positions), from the sorted
// positions of the batch's tokens; without atomics, in an order fixed by the batch.
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* token_rows,
                        const int32_t* token_starts, int M, int B, int T, int C, int V, cudaStream_t stream);

// layernorm.cu: each forward fused with what writes its input -----------------------
// inp[M,N,C] = inp + inp_bias[M,C] + residual[M,N,C], written back (the bias and
// residual that close a linear layer); then out = (inp - mean) * rstd * weight[m] +
// bias[m]; mean, rstd [M,N].
void add_layernorm_forward(float* out, float* mean, float* rstd, float* inp, const float* inp_bias,
                           const float* residual, const float* weight, const float* bias, int M, int N, int C,
                           cudaStream_t stream);
// The same norm of encoded[M,B,T,C] = wte[m, tokens[m,b,t]] + pos[m, t], written first
// (the first layer's norm of the embedding); pos [M,T,C] (stride T*C) or one shared
// sinusoidal table [T,C] (pos_model_stride 0).
void embedding_layernorm_forward(float* out, float* mean, float* rstd, float* encoded, const int32_t* tokens,
                                 const float* wte, const float* pos, int64_t pos_model_stride, const float* weight,
                                 const float* bias, int M, int B, int T, int C, int V, cudaStream_t stream);
// dinp = dinp_in + the gradient through the norm (dinp_in null: nothing to add; it may
// be dinp itself).
void layernorm_backward_input(float* dinp, const float* dinp_in, const float* dout, const float* inp,
                              const float* weight, const float* mean, const float* rstd, int M, int N, int C,
                              cudaStream_t stream);
// dweight = ..., dbias = ... through `sums` (2 column_sum_partials(M, N, C) of room).
void layernorm_backward_params(float* dweight, float* dbias, ColumnSums& sums, const float* dout, const float* inp,
                               const float* mean, const float* rstd, int M, int N, int C, cudaStream_t stream);

// matmul.cu: cuBLAS strided-batched; small products with what reads their output next
// in an own kernel (on the handle's stream, in float32 whatever the handle's math mode) -
// out[M,N,OC] = inp[M,N,C] weight[M,OC,C]^T
void matmul_forward(cublasHandle_t handle, float* out, const float* inp, const float* weight, int M, int N, int C,
                    int OC);
// pre = inp weight^T + bias[M,OC]; post = act(pre) (exact GELU, as PyTorch). In the own
// kernel where the product is small, unless apart (then cuBLAS and the epilogue kernel).
// pre null: not kept (a ReLU's backward takes post for it: relu'(pre) = relu'(post)).
void matmul_forward_activation(cublasHandle_t handle, float* pre, float* post, const float* inp, const float* weight,
                               const float* bias, int M, int N, int C, int OC, Act act, bool apart = false);
// dinp[M,N,C] = dout[M,N,OC] weight (overwritten).
void matmul_backward_input(cublasHandle_t handle, float* dinp, const float* dout, const float* weight, int M, int N,
                           int C, int OC);
// dpre[M,N,C] = (dout weight) * act'(pre[M,N,C]): the input gradient of a product
// whose input was act(pre); where it runs as above.
void matmul_backward_input_activation(cublasHandle_t handle, float* dpre, const float* dout, const float* weight,
                                      const float* pre, int M, int N, int C, int OC, Act act, bool apart = false);
// The products that close a layer, with the row op that reads their output next: made
// by the functions below, run by run_row_product (one kernel where a row has at most
// 64 outputs and the product is small and `apart` is not set, else cuBLAS and that
// op's kernel) or inside the MLP's kernel (mlp_forward, mlp_backward). linear and
// backward_input are products with no row op (of any width): cuBLAS's on their own,
// stages of the MLP's kernel beside it.
enum class RowOp { add_layernorm, crossentropy, layernorm_backward, linear, backward_input };
struct RowProduct {
  RowOp op;
  float* out;          // [M, R, P]
  const float *a, *b;  // a [M, R, K]; b [M, P, K] read as b^T (add_layernorm, crossentropy), else [M, K, P]
  int R, P, K;
  const float *bias, *residual;  // add_layernorm: [M, P], [M, R, P]
  float *norm_out, *mean, *rstd;  // add_layernorm: written
  const float *norm_w, *norm_b;   // add_layernorm (both), layernorm_backward (norm_w)
  const int32_t* targets;         // crossentropy
  float* row_loss;
  bool backward;
  const float *norm_in, *saved_mean, *saved_rstd;  // layernorm_backward: the norm's input and statistics
  float* dinp;                                     // dinp = dinp_in (null: 0) + the gradient at norm_in
  const float* dinp_in;
  // layernorm_backward: null, or also the norm's weight and bias gradients [M, P], as
  // layernorm_backward_params sums them through `sums` (in the rows' kernel where it
  // runs the product and each 32-row tile is one of those sums' chunks).
  float *dnorm_w, *dnorm_b;
  ColumnSums* sums;
  bool apart;  // the product and the row op in launches of their own, whatever fits
};
// resid[M,N,OC] = inp[M,N,C] weight^T + bias[M,OC] + residual[M,N,OC]; out, mean, rstd:
// the layer norm of resid (add_layernorm_forward's, norm_w and norm_b [M,OC]).
RowProduct add_layernorm_product(float* out, float* mean, float* rstd, float* resid, const float* inp,
                                 const float* weight, const float* bias, const float* residual, const float* norm_w,
                                 const float* norm_b, int N, int C, int OC);
// logits[M,N,V] = inp[M,N,C] weight[M,V,C]^T, then crossentropy_forward_backward's row
// losses (with backward, the logits become their gradient).
RowProduct crossentropy_product(float* row_loss, float* logits, const float* inp, const float* weight,
                                const int32_t* targets, int N, int C, int V, bool backward);
// dnorm[M,N,C] = dout[M,N,OC] weight, the gradient at a layer norm's output; then dinp =
// dinp_in + the gradient at its input norm_in (layernorm_backward_input's).
RowProduct backward_input_layernorm_product(float* dnorm, float* dinp, const float* dinp_in, const float* dout,
                                            const float* weight, const float* norm_in, const float* norm_w,
                                            const float* mean, const float* rstd, int N, int C, int OC);
// out[M,N,OC] = inp[M,N,C] weight^T (matmul_forward's).
RowProduct linear_product(float* out, const float* inp, const float* weight, int N, int C, int OC);
// dinp[M,N,C] = dout[M,N,OC] weight (matmul_backward_input's).
RowProduct backward_input_product(float* dinp, const float* dout, const float* weight, int N, int C, int OC);
void run_row_product(cublasHandle_t handle, const RowProduct& p, int M);
// The MLP sublayer, one kernel each way where d_model C <= 64, d_mlp D <= 256 and the
// two weights fit a block's shared memory (else the products above, two each way;
// prepare_mlp_kernels() lets the kernel take that memory: once per device, before the
// first launch, not during graph capture). Forward: pre[M,N,D] = ln2 fc_w^T + fc_b,
// post = act(pre), resid_out[M,N,C] = post out_w^T + out_b + resid_mid, then next_ln,
// next_mean, next_rstd: the layer norm after it (next_w, next_b); pre null: not kept, as
// matmul_forward_activation's. Backward, from dresid_out (and pre, or a ReLU's post,
// resid_mid and the norm's ln2_w, ln2_mean, ln2_rstd): dpre =
// (dresid_out out_w) * act'(pre), dln2 = dpre fc_w, dresid_mid = dresid_out + the
// gradient through that norm. Row products of the same N rows run in the same kernel
// where they fit too (else apart, in order): `before` the MLP, the one that makes its
// input (forward: an add_layernorm writing ln2; backward: a layernorm_backward writing
// dresid_out); `after` it, forward either a crossentropy reading next_ln and then a
// layernorm_backward reading its gradient (the head, both ways) or a linear reading
// next_ln (the next layer's QKV product), backward a backward_input reading
// dresid_mid (the attention's projection). Null: none. With `apart`, every product and
// row op in launches of their own (cuBLAS, then the epilogue or row kernel), whatever
// fits. tf32: in the kernel, the MLP's two products on the tensor cores (TF32 operands,
// float32 sums; the row products stay float32).
struct MlpSublayer {
  const float *ln2, *fc_w, *fc_b, *out_w, *out_b, *resid_mid, *next_w, *next_b;
  float *pre, *post, *resid_out, *next_ln, *next_mean, *next_rstd;
  const float *dresid_out, *ln2_w, *ln2_mean, *ln2_rstd;
  float *dpre, *dln2, *dresid_mid;
  int N, C, D;
  Act act;
  const RowProduct* before;
  const RowProduct* after;
  int after_count;  // 0 to 2 (the head) or 1 (linear) forward, 0 or 1 backward
  bool apart, tf32;
};
void prepare_mlp_kernels();
void mlp_forward(cublasHandle_t handle, const MlpSublayer& s, int M);
void mlp_backward(cublasHandle_t handle, const MlpSublayer& s, int M);
// dweight[M,OC,C] = dout^T inp, at once or over row blocks whose products `sums` adds
// in a fixed order (matmul_backward_partials(M, N, C, OC) of room there, 0 unsplit).
int64_t matmul_backward_partials(int M, int N, int C, int OC);
void matmul_backward_weight(cublasHandle_t handle, float* dweight, ColumnSums& sums, const float* dout,
                            const float* inp, int M, int N, int C, int OC);

// bias.cu: the MLP's epilogues and the column sums' stage 2 -----------------------------
// pre[M,N,D] += bias[M,D]; post = act(pre) (exact GELU, as PyTorch). pre null: post
// holds the product and becomes act(product + bias) in place.
void bias_activation_forward(float* pre, float* post, const float* bias, int M, int N, int D, Act act,
                             cudaStream_t stream);
// dpre[n] *= act'(pre[n]).
void activation_backward(float* dpre, const float* pre, int64_t n, Act act, cudaStream_t stream);
// dpre = dpost * act'(pre) (act none: dpost itself, dpre and pre unused);
// dbias[M,D] = sum over the rows of dpre through `sums` (column_sum_partials(M, N, D)).
void bias_activation_backward(float* dpre, float* dbias, ColumnSums& sums, const float* dpost, const float* pre,
                              int M, int N, int D, Act act, cudaStream_t stream);

// attention.cu: scores in shared memory, a block per (model, sequence, head) where the
// head fits, else per chunk of 32 queries or keys --
// qkv [M,B,T,3C] = q | k | v, head h on channels [h*C/H, (h+1)*C/H); out [M,B,T,C];
// att [M,B,H,T,T] softmax probabilities (zero above the diagonal). qkv_bias [M,3C] not
// null: q, k and v are qkv + qkv_bias (the QKV layer's bias, fused here; qkv is left
// as it is, and the backward takes the same bias).
void attention_forward(float* out, float* att, const float* qkv, const float* qkv_bias, int M, int B, int T, int C,
                       int H, cudaStream_t stream);
// dqkv [M,B,T,3C] overwritten, from dout [M,B,T,C], the forward's out and att, qkv and
// qkv_bias.
void attention_backward(float* dqkv, const float* dout, const float* out, const float* qkv, const float* qkv_bias,
                        const float* att, int M, int B, int T, int C, int H, cudaStream_t stream);
// attention_flash.cu: the same two flash attention's way (a warp per 16 queries or
// keys, scores in registers), their products on the tensor cores (tf32: TF32 operands,
// float32 sums) or in float32, where attention_flash_fits: head width a multiple of 8
// up to 64 (float32: 32), T up to 256, the block's tiles within shared memory (the
// backward's hold a head's T x T score gradients: T up to 192 at head width 32). The
// forward writes att, or with att null passes over the keys once and writes nothing
// but out, and with lse [M,B,H,T] each query's log-sum-exp of its scaled scores. The
// backward reads att, or in TF32 where attention_flash_recomputes (head width up to 32)
// forms the probabilities again from lse (att null), so that no T x T matrix goes
// through memory.
bool attention_flash_fits(int T, int C, int H, bool backward, bool tf32);
bool attention_flash_recomputes(int T, int C, int H, bool tf32);
void attention_forward_flash(float* out, float* att, float* lse, const float* qkv, const float* qkv_bias, int M,
                             int B, int T, int C, int H, bool tf32, cudaStream_t stream);
void attention_backward_flash(float* dqkv, const float* dout, const float* out, const float* qkv,
                              const float* qkv_bias, const float* att, const float* lse, int M, int B, int T, int C,
                              int H, bool tf32, cudaStream_t stream);
// The first layer's norm of the embedding as embedding_layernorm_forward takes it (out,
// the norm, and mean, rstd and encoded written), for the attention to form itself.
struct EmbeddingNorm {
  float *out, *mean, *rstd, *encoded;
  const int32_t* tokens;
  const float *wte, *pos;
  int64_t pos_model_stride;
  const float *norm_w, *norm_b;
  int V;
};
// That norm on its own (embedding_layernorm_forward).
inline void embedding_layernorm_forward(const EmbeddingNorm& e, int M, int B, int T, int C, cudaStream_t stream) {
  embedding_layernorm_forward(e.out, e.mean, e.rstd, e.encoded, e.tokens, e.wte, e.pos, e.pos_model_stride, e.norm_w,
                              e.norm_b, M, B, T, C, e.V, stream);
}
// That norm, then a linear product of it (linear_product with inp = e.out, B * T rows
// per model: the first layer's QKV product): one kernel where the product is small
// (matmul.cu's own, 64 columns at a time) and `apart` is not set, else the norm's
// kernel and cuBLAS; std::invalid_argument for another product.
void embedding_linear(cublasHandle_t handle, const EmbeddingNorm& e, const RowProduct& p, int M, int B, int T);
// The attention with the products at its ends: cuBLAS's products and flash attention's
// kernels where those fit (attention_flash_fits), else each way in one kernel where T <
// 64, a head is one block, its operands stay within 48 KiB and `apart` is not set (else
// cuBLAS and the kernels above). Forward: qkv [M,B,T,3C] = ln [M,B,T,C]
// qkv_w[M,3C,C]^T (written without the bias; with ln null and no embedding, qkv holds
// it already), then attention_forward's out and att with qkv_b; with embedding (the
// first layer), ln is its norm, formed here too (one block per sequence writes it).
// Backward: the gradient at the projection's input dproj [M,B,T,C] proj_w [M,C,C]
// (into datty where it runs apart; with dproj null, datty holds it already), then
// attention_backward's dqkv. tf32: flash attention's kernels on the tensor cores. What
// the forward keeps for the backward, and the backward reads: with lse set, where
// attention_flash_recomputes, lse, else att. Without for_backward the forward keeps
// att only where flash attention does not run.
struct AttentionWithProducts {
  const float *ln, *qkv_w, *qkv_b, *proj_w, *dproj;
  float *qkv, *att, *lse, *out, *datty, *dqkv;
  bool for_backward;
  const EmbeddingNorm* embedding;
  int B, T, C, H;
  bool apart, tf32;
};
void attention_forward_with_products(cublasHandle_t handle, const AttentionWithProducts& a, int M);
// Whether that forward writes att: where flash attention does not run, or for a
// backward that does not form the probabilities again (with_lse: lse set).
bool attention_keeps_probabilities(int T, int C, int H, bool tf32, bool for_backward, bool with_lse);
void attention_backward_with_products(cublasHandle_t handle, const AttentionWithProducts& a, int M);
// The longest sequence the fused kernels hold in shared memory for a head width.
int attention_max_seq_len(int head_dim);
// The scale of the scores, 1 / sqrt(head_dim) rounded from float64.
float attention_scale(int head_dim);
// Lets the attention kernels (both files') use all the shared memory a block may opt
// in to; call once per device before the first launch (not during graph capture).
void prepare_attention_kernels();
void prepare_attention_flash_kernels();  // attention_flash.cu's part of it

// block.cu: a transformer block's forward and backward passes, each in one kernel ----
// Where block_forward_fits(), one launch per layer writes what the per-op forward
// writes (layer norms, qkv with its bias, attention probabilities and output,
// resid_mid, pre and post activations), with the residual sums complete: resid_mid =
// resid_in + attention, resid_out = resid_mid + MLP. Weights and biases of model 0,
// each model's following at its tensor's size.
struct BlockForward {
  const float* resid_in;  // [M,N,C]; null at the first layer: the embedding, written to encoded
  float* encoded;
  const int32_t* tokens;  // [M,N]
  const float *wte, *pos;  // pos as embedding_layernorm_forward takes it
  int64_t pos_model_stride;
  const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc_w, *fc_b, *out_w, *out_b;
  const float *lnf_w, *lnf_b;  // the last layer's final norm, with lnf not null
  float *ln1, *ln1_mean, *ln1_rstd, *qkv, *att, *atty, *resid_mid, *ln2, *ln2_mean, *ln2_rstd, *pre, *post,
      *resid_out, *lnf, *lnf_mean, *lnf_rstd;
  // The head after the final norm, with lm_head [M,V,C] not null: logits [M,N,V] =
  // lnf lm_head^T, row_loss [M,N] as crossentropy_forward_backward; with backward, the
  // logits become their gradient, and dlnf and dresid_top [M,N,C] (the gradients at
  // the final norm's output and input) are written.
  const float* lm_head;
  const int32_t* targets;  // [M,N]
  float *logits, *row_loss, *dlnf, *dresid_top;
  bool backward;
  int B, T, C, H, D, V;
  float scale;  // 1 / sqrt(C / H), as attention_scale()
  Act act;
};
// Where block_backward_fits(), one launch per layer takes the gradient at the layer's
// output back to its input: dresid_in = dresid_mid + the first norm's input gradient,
// and writes the gradients the parameters' products and column sums read: dpre (of
// the MLP's pre-activations), dln2, dresid_mid, dqkv, dln1 [M,N,...], as the per-op
// backward does, and each sequence's share of the bias and norm gradients (`sums`),
// which the per-op backward sums apart. It reads what block_forward (or the per-op
// forward) wrote.
// Each sequence's share of the layer's bias and norm gradients, [M, B, columns]: the
// partials of ColumnSums::add(gradient, ..., M, B, columns), a chunk per sequence.
struct BlockParamSums {
  float *out_b, *fc_b, *ln2_w, *ln2_b, *proj_b, *qkv_b, *ln1_w, *ln1_b;
};
struct BlockBackward {
  const float* dresid_out;  // [M,N,C]
  const float *resid_in, *ln1_mean, *ln1_rstd, *qkv, *att, *resid_mid, *ln2_mean, *ln2_rstd, *pre;
  const float *ln1_w, *qkv_w, *proj_w, *ln2_w, *fc_w, *out_w;
  float *dpre, *dln2, *dresid_mid, *dqkv, *dln1, *dresid_in;
  BlockParamSums sums;
  int B, T, C, H, D;
  float scale;
  Act act;
};
// Whether the kernels hold this shape in the current device's shared memory (the
// forward with a head of head_vocab tokens, or none).
bool block_forward_fits(int T, int C, int H, int D, int head_vocab = 0);
bool block_backward_fits(int T, int C, int H, int D);
// Once per device before the first launch (not during graph capture).
void prepare_block_kernels();
void block_forward(const BlockForward& params, int M, cudaStream_t stream);
void block_backward(const BlockBackward& params, int M, cudaStream_t stream);

// crossentropy.cu ---------------------------------------------------------------------
// row_loss[M,N] = -log softmax(logits)[target]; with backward, logits [M,N,V] are
// overwritten by dlogits = (softmax - onehot) / N.
void crossentropy_forward_backward(float* row_loss, float* logits, const int32_t* targets, int M, int N, int V,
                                   bool backward, cudaStream_t stream);
// losses[M] = the mean of each model's N row losses.
void mean_loss_per_model(float* losses, const float* row_loss, int M, int N, cudaStream_t stream);

// adamw.cu: global-norm clipping and AdamW over the flat parameter buffer ------------
// One model's block of one parameter tensor.
struct ParamSegment {
  int64_t offset;
  int64_t numel;
  int model;
  int decay;  // weight decay applies
};
// The per-step constants, computed on the host in float64 exactly as the CPU backend does.
struct OptimizerStep {
  float step_size;      // lr / (1 - beta1^t)
  float inv_sqrt_bc2;   // 1 / sqrt(1 - beta2^t)
  float decay_factor;   // 1 - lr * weight_decay
  float beta1, beta2, eps;
  double clip;          // <= 0: no clipping
};
// The segments cut into the pieces that grad_norms and adamw_update take one block
// each, in order.
std::vector<ParamSegment> norm_pieces(const std::vector<ParamSegment>& segments);
// The device's place in a run of queued training steps (step_queue.cu), written by the
// host before the run.
struct StepCursor {
  int next;    // the slot the next step loads, and whose report it writes
  int halted;  // set by the run's first step that is not finite: no later step updates
};
// Where grad_norms also writes each model's loss and norm and the finite flag for the
// host: pinned host memory (cudaMallocHost's, which kernels reach at the same address),
// so that no copy follows a step; null members: not written. With a cursor, the
// report of slot k goes to losses[k * M + m], norms[k * M + m] and finite[k], and
// the cursor moves on; without, to slot 0.
struct StepReport {
  float *losses, *norms;
  int* finite;
  StepCursor* cursor;
};
// norms[M] = global gradient norm per model over the pieces of its segments;
// scales[M] = min(1, clip / (norm + 1e-6)); finite[0] = 1 when every loss and norm is
// finite (and, with a cursor, no earlier step of the run was not); the same into
// `report`. partials [num_pieces] scratch; blocks_done, a counter of the launch's
// finished blocks, must be zero before the first launch and is zero after each.
void grad_norms(double* partials, unsigned* blocks_done, float* norms, float* scales, int* finite, const float* grads,
                const ParamSegment* pieces, int num_pieces, const float* losses, int M, const OptimizerStep* step,
                const StepReport& report, cudaStream_t stream);
// AdamW on every piece, gradients times the model's scale; nothing when !finite[0].
void adamw_update(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, const ParamSegment* pieces,
                  int num_pieces, const float* scales, const int* finite, const OptimizerStep* step,
                  cudaStream_t stream);

// step_queue.cu: runs of training steps without the host between them ----------------
// step [bytes] = slots [cursor->next] (slots of `bytes` each; bytes a multiple of 16,
// both 16-byte aligned): a queued step's constants and batch, laid out as the step's own
// buffers, copied into them as its graph begins (grad_norms moves the cursor on).
void load_queued_step(char* step, const char* slots, int64_t bytes, const StepCursor* cursor, cudaStream_t stream);

// comoment.cu: correlation statistics of token-major activation chunks ---------------
// sums[cols] += sum over n tokens of (x[t, c] - shift[c]) in float64, x row stride ld;
// shift null: no shift. The difference is taken in float32, as split_tf32 does.
void column_sums(double* sums, const float* x, int64_t ld, const float* shift, int cols, int64_t n,
                 cudaStream_t stream);
// shift[cols] = float(sums / n): each column's mean from its sums over n tokens.
void shift_from_sums(float* shift, const double* sums, int cols, int64_t n, cudaStream_t stream);
// Tokens whose products a float32 sum spans before joining the float64 master (the
// default of CudaStatsAccumulator): the float32 sums lose accuracy as spans grow (2048
// missed the 1e-5 in two GPU tests, docs/DECISIONS.md).
constexpr int64_t kComomentSpan = 1024;
// stacked [spans, 4, n, cols] (packed) = lo | hi | hi | lo per span of n tokens, the
// TF32 parts of y = x[t, c] - shift[c] for t < spans * n (x row stride ldx): hi =
// tf32(y), lo = tf32(y - hi).
void split_tf32(float* stacked, const float* x, int64_t ldx, const float* shift, int cols, int64_t n, int spans,
                cudaStream_t stream);
// inv_scale[cols]: powers of two that map each column's largest |x - shift| over n rows
// to at most 2^6 (FP16 reaches 2^16: values may grow 1000-fold before overflowing).
void column_scales(float* inv_scale, const float* x, int64_t ld, const float* shift, int cols, int64_t n,
                   cudaStream_t stream);
// The same as split_tf32 in FP16 parts of y = (x[t, c] - shift[c]) * inv_scale[c];
// *overflow set to 1 when a finite value leaves FP16's range.
void split_f16(void* stacked, const float* x, int64_t ldx, const float* shift, const float* inv_scale, int cols,
               int64_t n, int spans, int* overflow, cudaStream_t stream);
// products [batch, rows, cols] = sum over one span of n tokens of y_a[t]^T y_b[t], from
// stacks of a (row stride lda, rows columns) and of b (ldb, cols) that split_tf32 or
// split_f16 wrote: one GEMM of depth 3n with float32 accumulation per batch entry on
// `handle`. Entry e reads a's stack from e * stride_a elements on and b's from e *
// stride_b (the spans of a group, or every layer's columns for within-layer blocks).
void comoment_products(cublasHandle_t handle, float* products, const void* a_stacked, int64_t lda, int rows,
                       const void* b_stacked, int64_t ldb, int cols, int64_t n, SplitPrecision split, int batch,
                       int64_t stride_a, int64_t stride_b);
// master[rows, cols] (row stride ld_master) += the sum in float64 of the count blocks
// products [count, rows, cols], in order.
void add_products_to_float64(double* master, int64_t ld_master, const float* products, int rows, int cols, int count,
                             cudaStream_t stream);
// centered [batch, rows, cols] = raw * s_a s_b^T - n mu_a mu_b^T for each of `batch`
// raw blocks [rows, cols] (packed), mu = sums / n and s = 1 / inv_scale (the FP16
// split's; null: 1); entry e reads sums_a and inv_scale_a from e * rows on and the b
// side from e * cols. symmetric (rows == cols): each block then (C + C^T) / 2 of that,
// as the covariance it stands for (the GEMM adds the (a, b) and (b, a) terms in
// different orders). float64 rounded as written, without fused multiply-adds.
void center_comoments(double* centered, const double* raw, const double* sums_a, const float* inv_scale_a,
                      const double* sums_b, const float* inv_scale_b, int rows, int cols, int batch, int64_t n,
                      bool symmetric, cudaStream_t stream);

// rotation.cu: the rotation baseline -------------------------------------------------
// g [batch, n, n] column-major: Gaussian matrices, matrix b from the Philox stream
// streams[b] (device array) under `seed`, the numbers the host's
// PhiloxStream(seed, streams[b]).next_normal() draws row by row.
void gaussian_matrices(double* g, const uint64_t* streams, uint64_t seed, int n, int batch, cudaStream_t stream);
// q [batch, n, n] column-major = Q diag(sign(diag R)) of the QR of each g (overwritten):
// Haar-random orthogonal matrices for Gaussian g, equal to the host's haar_orthogonal
// to rounding. One block per matrix; n at most batched_qr_max_width().
void haar_q_batched(double* q, double* g, int n, int batch, cudaStream_t stream);
int batched_qr_max_width();  // of the current device (its shared memory holds 19 n doubles)
// sign [n] = the signs of the diagonal of the column-major n x n a (+1 for 0): of R after
// a QR (cuSOLVER's geqrf leaves R above a's diagonal).
void diagonal_signs(double* sign, const double* a, int n, cudaStream_t stream);
// q = a diag(sign), column-major n x n.
void columns_times_signs(double* q, const double* a, const double* sign, int n, cudaStream_t stream);
// var [batch, n] = the diagonals of qs[b] q[b]^T (column-major n x n): with qs = Q S,
// the variances diag(Q S Q^T) of rotated neurons.
void rotated_variances(double* var, const double* qs, const double* q, int n, int batch, cudaStream_t stream);
// r [batch, rows, cols] /= sqrt(var_rows[rows] var_cols[batch, cols]); 0 where a
// variance is 0.
void normalize_correlations(double* r, const double* var_rows, const double* var_cols, int64_t rows, int64_t cols,
                            int batch, cudaStream_t stream);
// out [batch, rows] = r[d, a, a mod cols] (index matching) or the largest r[d, a, c]
// over the row.
void match_rows(double* out, const double* r, int64_t rows, int64_t cols, bool index, int batch,
                cudaStream_t stream);

}  // namespace univ::cuda
