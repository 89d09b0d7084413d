// The CUDA backend against the CPU backend, its oracle: every kernel forward and
// backward on random inputs of several shapes (sizes not multiples of 32, T = 1, one
// head, M = 1 and 3), outputs poisoned with NaN first; then whole steps, a 100-step
// loss trajectory, bitwise determinism and NaN handling. Skipped without a GPU; all
// but the trajectories also run on the host emulator (emulated.gpu_tests).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "test_util.hpp"
#include "training_faults.hpp"
#include "univ/backend.hpp"
#include "univ/checkpoint.hpp"
#include "univ/cpu/ops.hpp"
#include "univ/cuda/chained_launch.hpp"
#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/data.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/init.hpp"
#include "univ/train.hpp"

namespace univ {
namespace {

using testing::random_tokens;
using testing::random_vector;
using testing::relative_error;
using testing::TempDir;

constexpr double kFp32 = 1e-5;  // float32 kernels against float32 CPU ops, other summation orders
constexpr double kTf32 = 3e-3;  // TF32 operands (10 fraction bits), float32 sums

class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU tests skipped";
    cuda::prepare_attention_kernels();
    cuda::prepare_mlp_kernels();
    stream = std::make_unique<cuda::Stream>();
  }
  template <class T>
  cuda::DeviceBuffer<T> up(const std::vector<T>& host) {
    cuda::DeviceBuffer<T> d(host.size());
    d.upload(host.data(), host.size(), stream->get());
    return d;
  }
  // A device buffer of n elements filled with NaN: elements a kernel forgets stay NaN.
  cuda::DeviceBuffer<float> poisoned(size_t n) {
    cuda::DeviceBuffer<float> d(n);
    d.fill_bytes(0xff, stream->get());
    return d;
  }
  template <class T>
  std::vector<T> down(const cuda::DeviceBuffer<T>& d) {
    std::vector<T> host(d.size());
    d.download(host.data(), host.size(), stream->get());
    stream->synchronize();
    return host;
  }
  static void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol,
                           const std::string& what) {
    for (size_t i = 0; i < gpu.size(); ++i) ASSERT_TRUE(std::isfinite(gpu[i])) << what << ": element " << i;
    EXPECT_LT(relative_error(gpu, cpu), tol) << what;
  }
  // A poisoned buffer that nothing wrote.
  void expect_unwritten(const cuda::DeviceBuffer<float>& d, const std::string& what) {
    const std::vector<float> host = down(d);
    for (size_t i = 0; i < host.size(); ++i) ASSERT_TRUE(std::isnan(host[i])) << what << ": element " << i;
  }
  std::unique_ptr<cuda::Stream> stream;  // made after the device check
};

struct Shape {
  int M, B, T, C, H, V, D;
};
const Shape kShapes[] = {{2, 3, 5, 8, 2, 11, 12}, {1, 1, 1, 4, 1, 3, 5}, {3, 2, 33, 48, 3, 70, 100},
                         {2, 4, 32, 64, 4, 64, 256}, {1, 2, 128, 64, 2, 37, 40}};

// The embedding fused into the first layer norm (encoded written as the CPU op adds
// it), and its backward from the sorted positions.
TEST_F(Gpu, Embedding) {
  for (const Shape& s : kShapes) {
    const int64_t rows = int64_t(s.M) * s.B * s.T;
    auto tokens = random_tokens(rows, s.V, 1);
    for (int64_t i = 0; i < rows; i += 3) tokens[i] = s.V - 1;  // one token far more frequent than the rest
    std::vector<int32_t> token_rows(rows), token_starts(size_t(s.M) * (s.V + 1));
    cuda::sort_positions_by_token(token_rows.data(), token_starts.data(), tokens.data(), s.M, s.B * s.T, s.V);
    const auto wte = random_vector<float>(size_t(s.M) * s.V * s.C, 2), wpe = random_vector<float>(size_t(s.M) * s.T * s.C, 3);
    const auto w = random_vector<float>(size_t(s.M) * s.C, 5), b = random_vector<float>(size_t(s.M) * s.C, 6);
    const auto dout = random_vector<float>(rows * s.C, 4);
    std::vector<float> encoded(rows * s.C), out(encoded.size()), mean(rows), rstd(rows);
    std::vector<float> dwte(wte.size()), dwpe(wpe.size());  // the CPU ops add to zeros
    auto d_tokens = up(tokens), d_token_rows = up(token_rows), d_token_starts = up(token_starts);
    auto d_wte = up(wte), d_wpe = up(wpe), d_w = up(w), d_b = up(b), d_dout = up(dout);
    auto d_encoded = poisoned(encoded.size()), d_out = poisoned(out.size()), d_mean = poisoned(rows),
         d_rstd = poisoned(rows), d_dwte = poisoned(dwte.size()), d_dwpe = poisoned(dwpe.size());
    cuda::embedding_layernorm_forward(d_out.data(), d_mean.data(), d_rstd.data(), d_encoded.data(), d_tokens.data(),
                                      d_wte.data(), d_wpe.data(), int64_t(s.T) * s.C, d_w.data(), d_b.data(), s.M,
                                      s.B, s.T, s.C, s.V, stream->get());
    cuda::embedding_backward(d_dwte.data(), d_dwpe.data(), d_dout.data(), d_token_rows.data(), d_token_starts.data(),
                             s.M, s.B, s.T, s.C, s.V, stream->get());
    cpu::embedding_forward(encoded.data(), tokens.data(), wte.data(), wpe.data(), int64_t(s.T) * s.C, s.M, s.B, s.T,
                           s.C, s.V);
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), encoded.data(), w.data(), b.data(), s.M, s.B * s.T,
                           s.C);
    cpu::embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), s.M, s.B, s.T, s.C, s.V);
    EXPECT_EQ(down(d_encoded), encoded);  // one addition per element: equal to the bit
    expect_close(down(d_out), out, kFp32, "out");
    expect_close(down(d_rstd), rstd, kFp32, "rstd");
    expect_close(down(d_dwte), dwte, kFp32, "dwte");
    expect_close(down(d_dwpe), dwpe, kFp32, "dwpe");
  }
}

// The norm after a linear layer's bias and residual (rows of several means), and its
// backward: the input's gradient alone and added to a gradient there, the parameters'.
TEST_F(Gpu, LayerNorm) {
  for (const Shape& s : kShapes) {
    const int N = s.B * s.T, C = s.C;
    const int64_t n = int64_t(s.M) * N * C;
    auto x = random_vector<float>(n, 11, 3.0);
    for (int64_t i = 0; i < n; ++i) x[i] += static_cast<float>(i / C % 5);
    const auto residual = random_vector<float>(n, 16), inp_bias = random_vector<float>(size_t(s.M) * C, 17);
    const auto w = random_vector<float>(size_t(s.M) * C, 12), b = random_vector<float>(size_t(s.M) * C, 13);
    const auto dout = random_vector<float>(n, 14);
    std::vector<float> inp(n), out(n), mean(size_t(s.M) * N), rstd(mean.size());
    for (int64_t i = 0; i < n; ++i) {
      inp[i] = x[i] + inp_bias[i / (int64_t(N) * C) * C + i % C];
      inp[i] += residual[i];
    }
    auto dinp = random_vector<float>(n, 15);  // the input's gradient adds to it, the parameters' are written
    std::vector<float> dw(w.size()), db(b.size());
    auto d_x = up(x), d_res = up(residual), d_inp_bias = up(inp_bias), d_w = up(w), d_b = up(b), d_dout = up(dout),
         d_dinp = up(dinp);
    auto d_out = poisoned(n), d_mean = poisoned(mean.size()), d_rstd = poisoned(rstd.size());
    auto d_dw = poisoned(dw.size()), d_db = poisoned(db.size());
    cuda::add_layernorm_forward(d_out.data(), d_mean.data(), d_rstd.data(), d_x.data(), d_inp_bias.data(),
                                d_res.data(), d_w.data(), d_b.data(), s.M, N, C, stream->get());
    auto d_scratch = poisoned(static_cast<size_t>(2 * cuda::column_sum_partials(s.M, N, C)));
    cuda::ColumnSums sums(d_scratch.data(), static_cast<int64_t>(d_scratch.size()));
    cuda::layernorm_backward_input(d_dinp.data(), d_dinp.data(), d_dout.data(), d_x.data(), d_w.data(),
                                   d_mean.data(), d_rstd.data(), s.M, N, C, stream->get());
    cuda::layernorm_backward_params(d_dw.data(), d_db.data(), sums, d_dout.data(), d_x.data(), d_mean.data(),
                                    d_rstd.data(), s.M, N, C, stream->get());
    sums.finish(stream->get());
    auto d_dinp_alone = poisoned(n);  // with nothing to add to
    cuda::layernorm_backward_input(d_dinp_alone.data(), nullptr, d_dout.data(), d_x.data(), d_w.data(), d_mean.data(),
                                   d_rstd.data(), s.M, N, C, stream->get());
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), s.M, N, C);
    std::vector<float> dinp_alone(n, 0.0f), dw_again(w.size()), db_again(b.size());
    cpu::layernorm_backward(dinp_alone.data(), dw_again.data(), db_again.data(), dout.data(), inp.data(), w.data(),
                            mean.data(), rstd.data(), s.M, N, C);
    cpu::layernorm_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), mean.data(),
                            rstd.data(), s.M, N, C);
    EXPECT_EQ(down(d_x), inp);  // the same two additions per element: equal to the bit
    expect_close(down(d_dinp_alone), dinp_alone, kFp32, "dinp alone");
    expect_close(down(d_out), out, kFp32, "out");
    expect_close(down(d_rstd), rstd, kFp32, "rstd");
    expect_close(down(d_dinp), dinp, kFp32, "dinp");
    expect_close(down(d_dw), dw, kFp32, "dweight");
    expect_close(down(d_db), db, kFp32, "dbias");
  }
}

TEST_F(Gpu, MatmulInBothPrecisions) {
  for (const bool tf32 : {false, true}) {
    cuda::CublasHandle handle(stream->get(), tf32);
    const double tol = tf32 ? 3e-3 : kFp32;
    for (const Shape& s : kShapes) {
      const int N = s.B * s.T, C = s.C, OC = s.D;
      const auto inp = random_vector<float>(size_t(s.M) * N * C, 21), w = random_vector<float>(size_t(s.M) * OC * C, 22);
      const auto dout = random_vector<float>(size_t(s.M) * N * OC, 23);
      std::vector<float> out(dout.size()), dinp(inp.size()), dw(w.size());
      auto d_inp = up(inp), d_w = up(w), d_dout = up(dout);
      auto d_out = poisoned(out.size()), d_dinp = poisoned(dinp.size()), d_dw = poisoned(dw.size());
      cuda::matmul_forward(handle.get(), d_out.data(), d_inp.data(), d_w.data(), s.M, N, C, OC);
      auto d_scratch = poisoned(static_cast<size_t>(cuda::matmul_backward_partials(s.M, N, C, OC)));
      cuda::ColumnSums sums(d_scratch.data(), static_cast<int64_t>(d_scratch.size()));
      cuda::matmul_backward_input(handle.get(), d_dinp.data(), d_dout.data(), d_w.data(), s.M, N, C, OC);
      cuda::matmul_backward_weight(handle.get(), d_dw.data(), sums, d_dout.data(), d_inp.data(), s.M, N, C, OC);
      sums.finish(stream->get());
      cpu::matmul_forward(out.data(), inp.data(), w.data(), static_cast<const float*>(nullptr), s.M, N, C, OC);
      cpu::matmul_backward(dinp.data(), dw.data(), static_cast<float*>(nullptr), dout.data(), inp.data(), w.data(),
                           s.M, N, C, OC);
      expect_close(down(d_out), out, tol, tf32 ? "tf32 out" : "out");
      expect_close(down(d_dinp), dinp, tol, "dinp");
      expect_close(down(d_dw), dw, tol, "dweight");
    }
  }
}

// The MLP's products with the activation fused, on the kernel shapes (the own kernel)
// and on three that cuBLAS and an epilogue kernel take (many outputs one way or the
// other; a long reduction).
std::vector<Shape> shapes_and(std::initializer_list<Shape> more) {
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.insert(shapes.end(), more);
  return shapes;
}
std::vector<Shape> mlp_product_shapes() {
  return shapes_and({{1, 40, 100, 48, 1, 1, 300}, {1, 40, 100, 300, 1, 1, 48}, {2, 3, 5, 600, 1, 1, 9}});
}

// pre = inp W1^T + b1 and post = act(pre) forward; dpre = (dout W2) act'(pre) backward;
// for ReLU also with pre not kept, the backward taking post.
TEST_F(Gpu, MatmulActivationEpilogues) {
  cuda::CublasHandle handle(stream->get(), false);
  for (const Shape& s : mlp_product_shapes()) {
    const int N = s.B * s.T, C = s.C, D = s.D;
    const int64_t n = int64_t(s.M) * N * D;
    const auto inp = random_vector<float>(size_t(s.M) * N * C, 71), w1 = random_vector<float>(size_t(s.M) * D * C, 72);
    const auto b1 = random_vector<float>(size_t(s.M) * D, 73), w2 = random_vector<float>(size_t(s.M) * C * D, 74);
    const auto dout = random_vector<float>(size_t(s.M) * N * C, 75);
    auto d_inp = up(inp), d_w1 = up(w1), d_b1 = up(b1), d_w2 = up(w2), d_dout = up(dout);
    for (const auto& [act, keep_pre] : {std::pair{cuda::Act::relu, false}, std::pair{cuda::Act::relu, true},
                                       std::pair{cuda::Act::gelu, true}}) {
      SCOPED_TRACE(keep_pre ? "pre kept" : "pre not kept");
      const Activation cpu_act = act == cuda::Act::relu ? Activation::relu : Activation::gelu;
      auto d_pre = poisoned(n), d_post = poisoned(n), d_dpre = poisoned(n);
      cuda::matmul_forward_activation(handle.get(), keep_pre ? d_pre.data() : nullptr, d_post.data(), d_inp.data(),
                                      d_w1.data(), d_b1.data(), s.M, N, C, D, act);
      cuda::matmul_backward_input_activation(handle.get(), d_dpre.data(), d_dout.data(), d_w2.data(),
                                             keep_pre ? d_pre.data() : d_post.data(), s.M, N, D, C, act);
      std::vector<float> pre(n), post(n), dpost(n), dpre(n);
      cpu::matmul_forward(pre.data(), inp.data(), w1.data(), b1.data(), s.M, N, C, D);
      cpu::activation_forward(post.data(), pre.data(), n, cpu_act);
      std::vector<float> dw2(w2.size());  // computed beside dpost, unused
      cpu::matmul_backward(dpost.data(), dw2.data(), static_cast<float*>(nullptr), dout.data(), post.data(), w2.data(),
                           s.M, N, D, C);
      cpu::activation_backward(dpre.data(), dpost.data(), pre.data(), n, cpu_act);
      if (keep_pre) expect_close(down(d_pre), pre, kFp32, "pre");
      else expect_unwritten(d_pre, "pre");
      expect_close(down(d_post), post, kFp32, "post");
      expect_close(down(d_dpre), dpre, kFp32, "dpre");
    }
  }
}

// The products that close a layer with the row op after them in their epilogue (the
// own kernel where a row has at most 64 outputs) and, on the last two shapes, cuBLAS and
// the op's kernel apart (rows of 80 and 90 outputs; a reduction of 300): a sublayer's
// product + bias + residual and the norm after it, the logits and their cross-entropy,
// and an input gradient through the norm whose output it reaches.
TEST_F(Gpu, MatmulRowEpilogues) {
  cuda::CublasHandle handle(stream->get(), false);
  for (const Shape& s : shapes_and({{1, 2, 5, 80, 1, 90, 300}, {2, 3, 7, 40, 1, 20, 300}})) {
    const int N = s.B * s.T, C = s.C;
    const int64_t n = int64_t(s.M) * N * C;
    for (const int K : {C, s.D}) {  // as the attention's projection, as the MLP's second product
      SCOPED_TRACE("C " + std::to_string(C) + ", K " + std::to_string(K));
      const auto inp = random_vector<float>(size_t(s.M) * N * K, 81), w = random_vector<float>(size_t(s.M) * C * K, 82);
      const auto bias = random_vector<float>(size_t(s.M) * C, 83), residual = random_vector<float>(n, 84, 3.0);
      const auto norm_w = random_vector<float>(size_t(s.M) * C, 85), norm_b = random_vector<float>(size_t(s.M) * C, 86);
      auto d_inp = up(inp), d_w = up(w), d_bias = up(bias), d_residual = up(residual), d_norm_w = up(norm_w),
           d_norm_b = up(norm_b);
      auto d_resid = poisoned(n), d_out = poisoned(n), d_mean = poisoned(size_t(s.M) * N),
           d_rstd = poisoned(size_t(s.M) * N);
      cuda::run_row_product(handle.get(),
                            cuda::add_layernorm_product(d_out.data(), d_mean.data(), d_rstd.data(), d_resid.data(),
                                                        d_inp.data(), d_w.data(), d_bias.data(), d_residual.data(),
                                                        d_norm_w.data(), d_norm_b.data(), N, K, C),
                            s.M);
      std::vector<float> resid(n), out(n), mean(size_t(s.M) * N), rstd(mean.size());
      cpu::matmul_forward(resid.data(), inp.data(), w.data(), bias.data(), s.M, N, K, C);
      for (int64_t i = 0; i < n; ++i) resid[i] += residual[i];
      cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), resid.data(), norm_w.data(), norm_b.data(), s.M, N,
                             C);
      expect_close(down(d_resid), resid, kFp32, "resid");
      expect_close(down(d_out), out, kFp32, "norm");
      expect_close(down(d_mean), mean, kFp32, "mean");
      expect_close(down(d_rstd), rstd, kFp32, "rstd");

      // Backward: dnorm = dout W (dout [N, K] as the QKV's or the MLP's input gradient
      // reaching the norm), dinp = dinp_in + the norm's input gradient, or alone and
      // with the norm's parameter gradients.
      const auto dout = random_vector<float>(size_t(s.M) * N * K, 87), dinp_in = random_vector<float>(n, 88);
      auto d_dout = up(dout), d_dinp_in = up(dinp_in);
      std::vector<float> dnorm(n), dw_unused(w.size());
      cpu::matmul_backward(dnorm.data(), dw_unused.data(), static_cast<float*>(nullptr), dout.data(),
                           std::vector<float>(n).data(), w.data(), s.M, N, C, K);
      for (const bool add : {true, false}) {
        auto d_dnorm = poisoned(n), d_dinp = poisoned(n), d_dnorm_w = poisoned(norm_w.size()),
             d_dnorm_b = poisoned(norm_w.size());
        auto d_scratch = poisoned(static_cast<size_t>(2 * cuda::column_sum_partials(s.M, N, C)));
        cuda::ColumnSums sums(d_scratch.data(), static_cast<int64_t>(d_scratch.size()));
        cuda::RowProduct product = cuda::backward_input_layernorm_product(
            d_dnorm.data(), d_dinp.data(), add ? d_dinp_in.data() : nullptr, d_dout.data(), d_w.data(),
            d_resid.data(), d_norm_w.data(), d_mean.data(), d_rstd.data(), N, C, K);
        if (!add) product.dnorm_w = d_dnorm_w.data(), product.dnorm_b = d_dnorm_b.data(), product.sums = &sums;
        cuda::run_row_product(handle.get(), product, s.M);
        sums.finish(stream->get());
        std::vector<float> dinp = add ? dinp_in : std::vector<float>(n, 0.0f);
        std::vector<float> dnorm_w(norm_w.size(), 0.0f), dnorm_b(norm_w.size(), 0.0f);
        cpu::layernorm_backward(dinp.data(), dnorm_w.data(), dnorm_b.data(), dnorm.data(), resid.data(),
                                norm_w.data(), mean.data(), rstd.data(), s.M, N, C);
        expect_close(down(d_dnorm), dnorm, kFp32, "dnorm");
        expect_close(down(d_dinp), dinp, kFp32, add ? "dinp added" : "dinp alone");
        if (!add) {
          expect_close(down(d_dnorm_w), dnorm_w, kFp32, "the norm's weight gradient");
          expect_close(down(d_dnorm_b), dnorm_b, kFp32, "the norm's bias gradient");
        }
      }
    }
    // The head: logits [N, V] from a final norm's [N, C], and their cross-entropy.
    const auto lnf = random_vector<float>(n, 89), head = random_vector<float>(size_t(s.M) * s.V * C, 90);
    const auto targets = random_tokens(size_t(s.M) * N, s.V, 91);
    std::vector<float> logits(size_t(s.M) * N * s.V), losses(s.M), dlogits(logits.size());
    cpu::matmul_forward(logits.data(), lnf.data(), head.data(), static_cast<const float*>(nullptr), s.M, N, C, s.V);
    cpu::crossentropy_forward_backward(losses.data(), dlogits.data(), logits.data(), targets.data(), s.M, N, s.V);
    auto d_lnf = up(lnf), d_head = up(head);
    auto d_targets = up(targets);
    for (const bool backward : {false, true}) {
      auto d_logits = poisoned(logits.size()), d_rows = poisoned(size_t(s.M) * N), d_losses = poisoned(s.M);
      cuda::run_row_product(handle.get(),
                            cuda::crossentropy_product(d_rows.data(), d_logits.data(), d_lnf.data(), d_head.data(),
                                                       d_targets.data(), N, C, s.V, backward),
                            s.M);
      cuda::mean_loss_per_model(d_losses.data(), d_rows.data(), s.M, N, stream->get());
      expect_close(down(d_losses), losses, kFp32, "losses");
      expect_close(down(d_logits), backward ? dlogits : logits, kFp32, backward ? "dlogits" : "logits");
    }
  }
}

// The MLP sublayer each way (one kernel where d_model <= 64 and d_mlp <= 256; on the
// last two shapes, d_mlp 300 and d_model 80, the products apart), against the CPU ops:
// forward from ln2 = norm(resid_mid) to the next norm, backward from the gradient at
// its output to the gradient at resid_mid; with ReLU also without pre kept, and with
// the kernel's products on the tensor cores (a TF32 tolerance).
TEST_F(Gpu, MlpSublayer) {
  cuda::CublasHandle handle(stream->get(), false);
  for (const Shape& s : shapes_and({{2, 3, 7, 40, 1, 20, 300}, {1, 2, 5, 80, 1, 90, 100}})) {
    SCOPED_TRACE("C " + std::to_string(s.C) + ", D " + std::to_string(s.D));
    const int M = s.M, N = s.B * s.T, C = s.C, D = s.D;
    const int64_t n = int64_t(M) * N * C, h = int64_t(M) * N * D;
    const auto resid_mid = random_vector<float>(n, 101, 3.0), ln2_w = random_vector<float>(size_t(M) * C, 102);
    const auto ln2_b = random_vector<float>(size_t(M) * C, 103), fc_w = random_vector<float>(size_t(M) * D * C, 104);
    const auto fc_b = random_vector<float>(size_t(M) * D, 105), out_w = random_vector<float>(size_t(M) * C * D, 106);
    const auto out_b = random_vector<float>(size_t(M) * C, 107), next_w = random_vector<float>(size_t(M) * C, 108);
    const auto next_b = random_vector<float>(size_t(M) * C, 109), dresid = random_vector<float>(n, 110);
    std::vector<float> ln2(n), ln2_mean(size_t(M) * N), ln2_rstd(ln2_mean.size());
    cpu::layernorm_forward(ln2.data(), ln2_mean.data(), ln2_rstd.data(), resid_mid.data(), ln2_w.data(), ln2_b.data(),
                           M, N, C);
    auto d_resid_mid = up(resid_mid), d_ln2_w = up(ln2_w), d_fc_w = up(fc_w), d_fc_b = up(fc_b), d_out_w = up(out_w),
         d_out_b = up(out_b), d_next_w = up(next_w), d_next_b = up(next_b), d_dresid = up(dresid), d_ln2 = up(ln2),
         d_ln2_mean = up(ln2_mean), d_ln2_rstd = up(ln2_rstd);
    auto d_pre = poisoned(h), d_post = poisoned(h), d_resid_out = poisoned(n), d_next = poisoned(n),
         d_next_mean = poisoned(size_t(M) * N), d_next_rstd = poisoned(size_t(M) * N), d_dpre = poisoned(h),
         d_dln2 = poisoned(n), d_dresid_mid = poisoned(n);
    struct Case {
      cuda::Act act;
      bool keep_pre, tf32;
    };
    for (const Case& k : {Case{cuda::Act::relu, false, false}, Case{cuda::Act::relu, true, false},
                          Case{cuda::Act::gelu, true, false}, Case{cuda::Act::gelu, true, true}}) {
      const auto [act, keep_pre, tf32] = k;
      SCOPED_TRACE(std::string(keep_pre ? "pre kept" : "pre not kept, the backward taking post") +
                   (tf32 ? ", the MLP's products in TF32" : ""));
      const double tol = tf32 ? kTf32 : kFp32;
      const Activation cpu_act = act == cuda::Act::relu ? Activation::relu : Activation::gelu;
      cuda::MlpSublayer mlp{};
      mlp.ln2 = d_ln2.data(), mlp.fc_w = d_fc_w.data(), mlp.fc_b = d_fc_b.data(), mlp.out_w = d_out_w.data();
      mlp.out_b = d_out_b.data(), mlp.resid_mid = d_resid_mid.data(), mlp.next_w = d_next_w.data();
      mlp.next_b = d_next_b.data(), mlp.pre = d_pre.data(), mlp.post = d_post.data();
      mlp.resid_out = d_resid_out.data(), mlp.next_ln = d_next.data(), mlp.next_mean = d_next_mean.data();
      mlp.next_rstd = d_next_rstd.data(), mlp.dresid_out = d_dresid.data(), mlp.ln2_w = d_ln2_w.data();
      mlp.ln2_mean = d_ln2_mean.data(), mlp.ln2_rstd = d_ln2_rstd.data(), mlp.dpre = d_dpre.data();
      mlp.dln2 = d_dln2.data(), mlp.dresid_mid = d_dresid_mid.data(), mlp.N = N, mlp.C = C, mlp.D = D, mlp.act = act;
      mlp.tf32 = tf32;
      if (!keep_pre) mlp.pre = nullptr;
      cuda::mlp_forward(handle.get(), mlp, M);
      if (!keep_pre) mlp.pre = d_post.data();
      cuda::mlp_backward(handle.get(), mlp, M);

      std::vector<float> pre(h), post(h), resid_out(n), next(n), next_mean(size_t(M) * N), next_rstd(next_mean.size());
      cpu::matmul_forward(pre.data(), ln2.data(), fc_w.data(), fc_b.data(), M, N, C, D);
      cpu::activation_forward(post.data(), pre.data(), h, cpu_act);
      cpu::matmul_forward(resid_out.data(), post.data(), out_w.data(), out_b.data(), M, N, D, C);
      for (int64_t i = 0; i < n; ++i) resid_out[i] += resid_mid[i];
      cpu::layernorm_forward(next.data(), next_mean.data(), next_rstd.data(), resid_out.data(), next_w.data(),
                             next_b.data(), M, N, C);
      std::vector<float> dpost(h), dpre(h), dln2(n), dresid_mid = dresid, unused_dw(out_w.size()),
                         unused_dnorm(size_t(M) * C);
      cpu::matmul_backward(dpost.data(), unused_dw.data(), static_cast<float*>(nullptr), dresid.data(),
                           std::vector<float>(h).data(), out_w.data(), M, N, D, C);
      cpu::activation_backward(dpre.data(), dpost.data(), pre.data(), h, cpu_act);
      cpu::matmul_backward(dln2.data(), unused_dw.data(), static_cast<float*>(nullptr), dpre.data(),
                           std::vector<float>(n).data(), fc_w.data(), M, N, C, D);
      cpu::layernorm_backward(dresid_mid.data(), unused_dnorm.data(), std::vector<float>(unused_dnorm.size()).data(),
                              dln2.data(), resid_mid.data(), ln2_w.data(), ln2_mean.data(), ln2_rstd.data(), M, N, C);
      if (keep_pre) expect_close(down(d_pre), pre, tol, "pre");
      else expect_unwritten(d_pre, "pre");  // the first case: nothing wrote it yet
      expect_close(down(d_post), post, tol, "post");
      expect_close(down(d_resid_out), resid_out, tol, "resid_out");
      expect_close(down(d_next), next, tol, "next norm");
      expect_close(down(d_next_rstd), next_rstd, tol, "next rstd");
      expect_close(down(d_dpre), dpre, tol, "dpre");
      expect_close(down(d_dln2), dln2, tol, "dln2");
      expect_close(down(d_dresid_mid), dresid_mid, tol, "dresid_mid");
    }
  }
}

TEST_F(Gpu, BiasActivationEpilogue) {
  for (const Shape& s : kShapes) {
    const int N = s.B * s.T, D = s.D;
    const int64_t n = int64_t(s.M) * N * D;
    const auto x = random_vector<float>(n, 31, 2.0), bias = random_vector<float>(size_t(s.M) * D, 32);
    const auto dpost = random_vector<float>(n, 34);
    auto d_bias = up(bias);
    for (cuda::Act act : {cuda::Act::relu, cuda::Act::gelu}) {
      const Activation cpu_act = act == cuda::Act::relu ? Activation::relu : Activation::gelu;
      auto d_pre = up(x);
      auto d_post = poisoned(n), d_dpre = poisoned(n);
      std::vector<float> dbias(bias.size());
      auto d_dbias = poisoned(dbias.size()), d_dpost = up(dpost);
      cuda::bias_activation_forward(d_pre.data(), d_post.data(), d_bias.data(), s.M, N, D, act, stream->get());
      auto d_scratch = poisoned(static_cast<size_t>(cuda::column_sum_partials(s.M, N, D)));
      cuda::ColumnSums sums(d_scratch.data(), static_cast<int64_t>(d_scratch.size()));
      cuda::bias_activation_backward(d_dpre.data(), d_dbias.data(), sums, d_dpost.data(), d_pre.data(), s.M, N, D, act,
                                     stream->get());
      sums.finish(stream->get());
      std::vector<float> pre(n), post(n), dpre(n);
      for (int64_t i = 0; i < n; ++i) pre[i] = x[i] + bias[i / (int64_t(N) * D) * D + i % D];
      cpu::activation_forward(post.data(), pre.data(), n, cpu_act);
      cpu::activation_backward(dpre.data(), dpost.data(), pre.data(), n, cpu_act);
      for (int m = 0; m < s.M; ++m)
        for (int d = 0; d < D; ++d) {
          double sum = 0;
          for (int r = 0; r < N; ++r) sum += dpre[(int64_t(m) * N + r) * D + d];
          dbias[m * D + d] = static_cast<float>(sum);
        }
      expect_close(down(d_pre), pre, 1e-7, "pre");
      expect_close(down(d_post), post, kFp32, "post");
      expect_close(down(d_dpre), dpre, kFp32, "dpre");
      expect_close(down(d_dbias), dbias, kFp32, "dbias");
    }
  }
}

// Many column sums of many shapes through one ColumnSums: more jobs than one stage-2
// launch carries, one and two outputs, every sum equal to its own.
TEST_F(Gpu, ColumnSumsOfManyOpsInOneFinish) {
  struct Sum {
    int M, N, C;
    std::vector<float> dout;
  };
  std::vector<Sum> ops;
  for (int k = 0; k < 150; ++k) {
    const int M = 1 + k % 3, N = 1 + (k * 37) % 300, C = 1 + (k * 53) % 97;
    ops.push_back({M, N, C, random_vector<float>(size_t(M) * N * C, 200 + k)});
  }
  int64_t room = 0;
  for (const Sum& o : ops) room += cuda::column_sum_partials(o.M, o.N, o.C);
  auto d_scratch = poisoned(static_cast<size_t>(room));
  cuda::ColumnSums sums(d_scratch.data(), room);
  std::vector<cuda::DeviceBuffer<float>> d_dout, d_dbias;
  for (const Sum& o : ops) {
    d_dout.push_back(up(o.dout));
    d_dbias.push_back(poisoned(size_t(o.M) * o.C));
    cuda::bias_activation_backward(nullptr, d_dbias.back().data(), sums, d_dout.back().data(), nullptr, o.M, o.N, o.C,
                                   cuda::Act::none, stream->get());
  }
  EXPECT_THROW(sums.add(d_dbias[0].data(), nullptr, 1, 1, 1), std::logic_error);  // the room is used up
  sums.finish(stream->get());
  for (size_t k = 0; k < ops.size(); ++k) {
    const Sum& o = ops[k];
    std::vector<float> expect(size_t(o.M) * o.C);
    for (int m = 0; m < o.M; ++m)
      for (int c = 0; c < o.C; ++c) {
        double sum = 0;
        for (int r = 0; r < o.N; ++r) sum += o.dout[(int64_t(m) * o.N + r) * o.C + c];
        expect[size_t(m) * o.C + c] = static_cast<float>(sum);
      }
    expect_close(down(d_dbias[k]), expect, kFp32, "column sum " + std::to_string(k));
  }
}

// qkv [M,B,T,3C] with each model's QKV bias [M,3C] added.
std::vector<float> plus_qkv_bias(std::vector<float> qkv, const std::vector<float>& bias, const Shape& s) {
  const int64_t per_model = int64_t(s.B) * s.T * 3 * s.C;
  for (int64_t i = 0; i < int64_t(qkv.size()); ++i) qkv[i] += bias[i / per_model * 3 * s.C + i % (3 * s.C)];
  return qkv;
}

// Each query's log-sum-exp of its scaled scores over the keys up to it, in float64:
// [M,B,H,T] from qkv [M,B,T,3C] (bias added).
std::vector<float> reference_lse(const std::vector<float>& qkv, const Shape& s) {
  const int hd = s.C / s.H;
  const double scale = 1.0 / std::sqrt(double(hd));
  std::vector<float> lse(size_t(s.M) * s.B * s.H * s.T);
  for (int64_t seq = 0; seq < int64_t(s.M) * s.B; ++seq)
    for (int h = 0; h < s.H; ++h)
      for (int t = 0; t < s.T; ++t) {
        std::vector<double> scores(t + 1);
        for (int t2 = 0; t2 <= t; ++t2) {
          double dot = 0;
          for (int i = 0; i < hd; ++i)
            dot += double(qkv[(seq * s.T + t) * 3 * s.C + h * hd + i]) *
                   qkv[(seq * s.T + t2) * 3 * s.C + s.C + h * hd + i];
          scores[t2] = dot * scale;
        }
        const double top = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (const double x : scores) sum += std::exp(x - top);
        lse[(seq * s.H + h) * s.T + t] = static_cast<float>(top + std::log(sum));
      }
  return lse;
}

// With and without the QKV bias, which both kernels add as they load (qkv stays as it
// is); the shapes, and a sequence of seven chunks of 32, the last cut short.
TEST_F(Gpu, Attention) {
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({1, 1, 200, 32, 1, 5, 5});
  for (const Shape& s : shapes) for (const bool with_bias : {false, true}) {
    const int64_t rows = int64_t(s.M) * s.B * s.T;
    const auto raw = random_vector<float>(rows * 3 * s.C, 41), dout = random_vector<float>(rows * s.C, 42);
    const auto bias = random_vector<float>(size_t(s.M) * 3 * s.C, 43);
    const std::vector<float> qkv = with_bias ? plus_qkv_bias(raw, bias, s) : raw;
    std::vector<float> out(rows * s.C), att(size_t(s.M) * s.B * s.H * s.T * s.T), dqkv(qkv.size());
    auto d_qkv = up(raw), d_bias = up(bias), d_dout = up(dout);
    auto d_out = poisoned(out.size()), d_att = poisoned(att.size()), d_dqkv = poisoned(dqkv.size());
    cuda::attention_forward(d_out.data(), d_att.data(), d_qkv.data(), with_bias ? d_bias.data() : nullptr, s.M, s.B,
                            s.T, s.C, s.H, stream->get());
    EXPECT_EQ(down(d_qkv), raw);
    cuda::attention_backward(d_dqkv.data(), d_dout.data(), d_out.data(), d_qkv.data(),
                             with_bias ? d_bias.data() : nullptr, d_att.data(), s.M, s.B, s.T, s.C, s.H, stream->get());
    cpu::attention_forward(out.data(), att.data(), qkv.data(), s.M, s.B, s.T, s.C, s.H);
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), s.M, s.B, s.T, s.C, s.H);
    expect_close(down(d_out), out, kFp32, "out");
    expect_close(down(d_att), att, kFp32, "att");
    expect_close(down(d_dqkv), dqkv, kFp32, "dqkv");
  }
}

// The flash attention against the CPU ops, with and without the QKV bias, in TF32 (a
// TF32 tolerance) and float32, on the shapes whose head width is a multiple of 8 (the
// others' 4 does not fit), one query, 17 at head width 8, one of head width 64 (TF32
// only) and T = 40, and T = 200 at head width 32, whose forward fits and whose
// backward (200 x 200 score gradients of a head) does not.
TEST_F(Gpu, AttentionFlash) {
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({2, 3, 1, 16, 2, 5, 5});
  shapes.push_back({1, 2, 17, 24, 3, 5, 5});
  shapes.push_back({2, 2, 40, 128, 2, 5, 5});
  shapes.push_back({1, 1, 200, 32, 1, 5, 5});
  int forwards = 0, backwards = 0, recomputed = 0;
  for (const Shape& s : shapes) for (const bool tf32 : {true, false}) for (const bool with_bias : {false, true}) {
    SCOPED_TRACE("T " + std::to_string(s.T) + ", C " + std::to_string(s.C) + ", H " + std::to_string(s.H) +
                 (tf32 ? ", tf32" : ", float32"));
    const int hd = s.C / s.H;
    const bool forward_fits = cuda::attention_flash_fits(s.T, s.C, s.H, false, tf32);
    const bool backward_fits = cuda::attention_flash_fits(s.T, s.C, s.H, true, tf32);
    EXPECT_EQ(forward_fits, hd % 8 == 0 && hd <= (tf32 ? 64 : 32));
    EXPECT_EQ(backward_fits, forward_fits && s.T != 200);
    if (!forward_fits) continue;
    const int64_t rows = int64_t(s.M) * s.B * s.T;
    const auto raw = random_vector<float>(rows * 3 * s.C, 51), dout = random_vector<float>(rows * s.C, 52);
    const auto bias = random_vector<float>(size_t(s.M) * 3 * s.C, 53);
    const std::vector<float> qkv = with_bias ? plus_qkv_bias(raw, bias, s) : raw;
    std::vector<float> out(rows * s.C), att(size_t(s.M) * s.B * s.H * s.T * s.T), dqkv(qkv.size());
    cpu::attention_forward(out.data(), att.data(), qkv.data(), s.M, s.B, s.T, s.C, s.H);
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), s.M, s.B, s.T, s.C, s.H);
    auto d_qkv = up(raw), d_bias = up(bias), d_dout = up(dout);
    auto d_out = poisoned(out.size()), d_att = poisoned(att.size()), d_dqkv = poisoned(dqkv.size());
    const float* b = with_bias ? d_bias.data() : nullptr;
    const double tol = tf32 ? kTf32 : kFp32;
    cuda::attention_forward_flash(d_out.data(), d_att.data(), nullptr, d_qkv.data(), b, s.M, s.B, s.T, s.C, s.H, tf32,
                                  stream->get());
    EXPECT_EQ(down(d_qkv), raw);
    expect_close(down(d_out), out, tol, "out");
    expect_close(down(d_att), att, tol, "att");
    const auto got_att = down(d_att);
    for (int64_t head = 0; head < int64_t(s.M) * s.B * s.H; ++head)  // exact zeros above the diagonal
      for (int t = 0; t < s.T; ++t)
        for (int t2 = t + 1; t2 < s.T; ++t2) ASSERT_EQ(got_att[(head * s.T + t) * s.T + t2], 0.0f);
    ++forwards;
    if (!backward_fits) continue;
    cuda::attention_backward_flash(d_dqkv.data(), d_dout.data(), d_out.data(), d_qkv.data(), b, d_att.data(), nullptr,
                                   s.M, s.B, s.T, s.C, s.H, tf32, stream->get());
    expect_close(down(d_dqkv), dqkv, tol, "dqkv");
    ++backwards;
    // One pass, keeping nothing but out, or each query's log-sum-exp, from which the TF32
    // backward forms the probabilities again (head width up to 32)
    const bool recomputes = cuda::attention_flash_recomputes(s.T, s.C, s.H, tf32);
    EXPECT_EQ(recomputes, tf32 && hd <= 32);
    auto d_out_once = poisoned(out.size()), d_lse = poisoned(size_t(s.M) * s.B * s.H * s.T);
    auto d_out_lse = poisoned(out.size()), d_dqkv_again = poisoned(dqkv.size());
    cuda::attention_forward_flash(d_out_once.data(), nullptr, nullptr, d_qkv.data(), b, s.M, s.B, s.T, s.C, s.H, tf32,
                                  stream->get());
    expect_close(down(d_out_once), out, tol, "out, one pass");
    if (!recomputes) continue;
    cuda::attention_forward_flash(d_out_lse.data(), nullptr, d_lse.data(), d_qkv.data(), b, s.M, s.B, s.T, s.C, s.H,
                                  tf32, stream->get());
    expect_close(down(d_out_lse), out, tol, "out, one pass keeping lse");
    expect_close(down(d_lse), reference_lse(qkv, s), tol, "lse");
    cuda::attention_backward_flash(d_dqkv_again.data(), d_dout.data(), d_out_lse.data(), d_qkv.data(), b, nullptr,
                                   d_lse.data(), s.M, s.B, s.T, s.C, s.H, tf32, stream->get());
    expect_close(down(d_dqkv_again), dqkv, tol, "dqkv, the probabilities formed again");
    ++recomputed;
  }
  EXPECT_EQ(forwards, 2 * (7 + 6));   // with and without the bias: TF32 three of kShapes and the four added,
  EXPECT_EQ(backwards, 2 * (6 + 5));  // float32 all but T = 40; backward all but T = 200
  EXPECT_EQ(recomputed, 2 * 5);       // TF32 where the backward runs, but at head width 64
}

// The MLP sublayer with the row products a step runs beside it (in its kernel where all
// fit; apart on the last three shapes: d_mlp 300, d_model 80, a vocabulary of 90),
// against the CPU ops: forward, the attention's projection and ln2 before it and the
// head after it (logits, loss, the gradient at the layer's output); backward, the
// layer above's QKV input gradient before it and the attention's projection's input
// gradient after it; and forward again with the next layer's QKV product after it.
TEST_F(Gpu, MlpSublayerWithRowStages) {
  cuda::CublasHandle handle(stream->get(), false);
  for (const Shape& s : shapes_and({{2, 3, 7, 40, 1, 20, 300}, {1, 2, 5, 80, 1, 9, 100}, {2, 2, 6, 24, 1, 90, 40}})) {
    SCOPED_TRACE("C " + std::to_string(s.C) + ", D " + std::to_string(s.D) + ", V " + std::to_string(s.V));
    const int M = s.M, N = s.B * s.T, C = s.C, D = s.D, V = s.V;
    const int64_t n = int64_t(M) * N * C, h = int64_t(M) * N * D, rows = int64_t(M) * N;
    auto weights = [&](size_t size, uint32_t seed, double scale = 1.0) {
      return random_vector<float>(size_t(M) * size, seed, scale);
    };
    const auto atty = random_vector<float>(n, 131), residual = random_vector<float>(n, 132, 3.0);
    const auto proj_w = weights(size_t(C) * C, 133, 0.3), proj_b = weights(C, 134), ln2_w = weights(C, 135);
    const auto ln2_b = weights(C, 136), fc_w = weights(size_t(D) * C, 137, 0.3), fc_b = weights(D, 138);
    const auto out_w = weights(size_t(C) * D, 139, 0.1), out_b = weights(C, 140), next_w = weights(C, 141);
    const auto next_b = weights(C, 142), head_w = weights(size_t(V) * C, 143, 0.3), qkv_w = weights(3 * C * C, 144, 0.3);
    const auto targets = random_tokens(size_t(rows), V, 145);
    const auto dqkv = random_vector<float>(3 * n, 146), dresid_mid_above = random_vector<float>(n, 147);

    // The CPU ops composed.
    std::vector<float> resid_mid(n), ln2(n), ln2_mean(rows), ln2_rstd(rows), pre(h), post(h), resid_out(n), next(n);
    std::vector<float> next_mean(rows), next_rstd(rows), logits(rows * V), dlogits(logits.size()), losses(M);
    cpu::matmul_forward(resid_mid.data(), atty.data(), proj_w.data(), proj_b.data(), M, N, C, C);
    for (int64_t i = 0; i < n; ++i) resid_mid[i] += residual[i];
    cpu::layernorm_forward(ln2.data(), ln2_mean.data(), ln2_rstd.data(), resid_mid.data(), ln2_w.data(), ln2_b.data(),
                           M, N, C);
    cpu::matmul_forward(pre.data(), ln2.data(), fc_w.data(), fc_b.data(), M, N, C, D);
    cpu::activation_forward(post.data(), pre.data(), h, Activation::gelu);
    cpu::matmul_forward(resid_out.data(), post.data(), out_w.data(), out_b.data(), M, N, D, C);
    for (int64_t i = 0; i < n; ++i) resid_out[i] += resid_mid[i];
    cpu::layernorm_forward(next.data(), next_mean.data(), next_rstd.data(), resid_out.data(), next_w.data(),
                           next_b.data(), M, N, C);
    cpu::matmul_forward(logits.data(), next.data(), head_w.data(), static_cast<const float*>(nullptr), M, N, C, V);
    cpu::crossentropy_forward_backward(losses.data(), dlogits.data(), logits.data(), targets.data(), M, N, V);
    std::vector<float> dnext(n), dresid_top(n, 0.0f), dln1(n), dresid_out = dresid_mid_above;
    std::vector<float> dw_unused(std::max({head_w.size(), qkv_w.size(), out_w.size()})), dn_unused(size_t(M) * C);
    std::vector<float> db_unused(dn_unused.size());
    // the head's gradient at the layer's output, then (as the layer above's first norm,
    // the same statistics) the QKV input gradient reaching it
    cpu::matmul_backward(dnext.data(), dw_unused.data(), static_cast<float*>(nullptr), dlogits.data(),
                         std::vector<float>(n).data(), head_w.data(), M, N, C, V);
    cpu::layernorm_backward(dresid_top.data(), dn_unused.data(), db_unused.data(), dnext.data(), resid_out.data(),
                            next_w.data(), next_mean.data(), next_rstd.data(), M, N, C);
    cpu::matmul_backward(dln1.data(), dw_unused.data(), static_cast<float*>(nullptr), dqkv.data(),
                         std::vector<float>(n).data(), qkv_w.data(), M, N, C, 3 * C);
    cpu::layernorm_backward(dresid_out.data(), dn_unused.data(), db_unused.data(), dln1.data(), resid_out.data(),
                            next_w.data(), next_mean.data(), next_rstd.data(), M, N, C);
    std::vector<float> dpost(h), dpre(h), dln2(n), dresid_mid = dresid_out;
    cpu::matmul_backward(dpost.data(), dw_unused.data(), static_cast<float*>(nullptr), dresid_out.data(),
                         std::vector<float>(h).data(), out_w.data(), M, N, D, C);
    cpu::activation_backward(dpre.data(), dpost.data(), pre.data(), h, Activation::gelu);
    cpu::matmul_backward(dln2.data(), dw_unused.data(), static_cast<float*>(nullptr), dpre.data(),
                         std::vector<float>(n).data(), fc_w.data(), M, N, C, D);
    cpu::layernorm_backward(dresid_mid.data(), dn_unused.data(), db_unused.data(), dln2.data(), resid_mid.data(),
                            ln2_w.data(), ln2_mean.data(), ln2_rstd.data(), M, N, C);
    std::vector<float> datty(n);
    cpu::matmul_backward(datty.data(), dw_unused.data(), static_cast<float*>(nullptr), dresid_mid.data(),
                         std::vector<float>(n).data(), proj_w.data(), M, N, C, C);

    auto d_atty = up(atty), d_residual = up(residual), d_proj_w = up(proj_w), d_proj_b = up(proj_b);
    auto d_ln2_w = up(ln2_w), d_ln2_b = up(ln2_b), d_fc_w = up(fc_w), d_fc_b = up(fc_b), d_out_w = up(out_w);
    auto d_out_b = up(out_b), d_next_w = up(next_w), d_next_b = up(next_b), d_head_w = up(head_w);
    auto d_qkv_w = up(qkv_w), d_dqkv = up(dqkv), d_dresid_mid_above = up(dresid_mid_above);
    auto d_targets = up(targets);
    auto d_resid_mid = poisoned(n), d_ln2 = poisoned(n), d_ln2_mean = poisoned(rows), d_ln2_rstd = poisoned(rows);
    auto d_pre = poisoned(h), d_post = poisoned(h), d_resid_out = poisoned(n), d_next = poisoned(n);
    auto d_next_mean = poisoned(rows), d_next_rstd = poisoned(rows), d_logits = poisoned(rows * V);
    auto d_row_loss = poisoned(rows), d_losses = poisoned(M), d_dnext = poisoned(n), d_dresid_top = poisoned(n);
    auto d_dln1 = poisoned(n), d_dresid_out = poisoned(n), d_dpre = poisoned(h), d_dln2 = poisoned(n);
    auto d_dresid_mid = poisoned(n), d_datty = poisoned(n);
    const cuda::RowProduct proj = cuda::add_layernorm_product(
        d_ln2.data(), d_ln2_mean.data(), d_ln2_rstd.data(), d_resid_mid.data(), d_atty.data(), d_proj_w.data(),
        d_proj_b.data(), d_residual.data(), d_ln2_w.data(), d_ln2_b.data(), N, C, C);
    const cuda::RowProduct head[] = {
        cuda::crossentropy_product(d_row_loss.data(), d_logits.data(), d_next.data(), d_head_w.data(),
                                   d_targets.data(), N, C, V, true),
        cuda::backward_input_layernorm_product(d_dnext.data(), d_dresid_top.data(), nullptr, d_logits.data(),
                                               d_head_w.data(), d_resid_out.data(), d_next_w.data(),
                                               d_next_mean.data(), d_next_rstd.data(), N, C, V)};
    const cuda::RowProduct qkv_input = cuda::backward_input_layernorm_product(
        d_dln1.data(), d_dresid_out.data(), d_dresid_mid_above.data(), d_dqkv.data(), d_qkv_w.data(),
        d_resid_out.data(), d_next_w.data(), d_next_mean.data(), d_next_rstd.data(), N, C, 3 * C);
    const cuda::RowProduct proj_input =
        cuda::backward_input_product(d_datty.data(), d_dresid_mid.data(), d_proj_w.data(), N, C, C);
    cuda::MlpSublayer mlp{};
    mlp.ln2 = d_ln2.data(), mlp.fc_w = d_fc_w.data(), mlp.fc_b = d_fc_b.data(), mlp.out_w = d_out_w.data();
    mlp.out_b = d_out_b.data(), mlp.resid_mid = d_resid_mid.data(), mlp.next_w = d_next_w.data();
    mlp.next_b = d_next_b.data(), mlp.pre = d_pre.data(), mlp.post = d_post.data();
    mlp.resid_out = d_resid_out.data(), mlp.next_ln = d_next.data(), mlp.next_mean = d_next_mean.data();
    mlp.next_rstd = d_next_rstd.data(), mlp.ln2_w = d_ln2_w.data(), mlp.ln2_mean = d_ln2_mean.data();
    mlp.ln2_rstd = d_ln2_rstd.data(), mlp.N = N, mlp.C = C, mlp.D = D, mlp.act = cuda::Act::gelu;
    mlp.before = &proj, mlp.after = head, mlp.after_count = 2;
    cuda::mlp_forward(handle.get(), mlp, M);
    mlp.dresid_out = d_dresid_out.data(), mlp.dpre = d_dpre.data(), mlp.dln2 = d_dln2.data();
    mlp.dresid_mid = d_dresid_mid.data(), mlp.before = &qkv_input, mlp.after = &proj_input, mlp.after_count = 1;
    cuda::mlp_backward(handle.get(), mlp, M);
    cuda::mean_loss_per_model(d_losses.data(), d_row_loss.data(), M, N, stream->get());

    expect_close(down(d_resid_mid), resid_mid, kFp32, "resid_mid");
    expect_close(down(d_ln2), ln2, kFp32, "ln2");
    expect_close(down(d_ln2_rstd), ln2_rstd, kFp32, "ln2 rstd");
    expect_close(down(d_post), post, kFp32, "post");
    expect_close(down(d_next), next, kFp32, "next norm");
    expect_close(down(d_losses), losses, kFp32, "losses");
    expect_close(down(d_logits), dlogits, kFp32, "dlogits");
    expect_close(down(d_dnext), dnext, kFp32, "dlnf");
    expect_close(down(d_dresid_top), dresid_top, kFp32, "dresid_top");
    expect_close(down(d_dln1), dln1, kFp32, "dln1");
    expect_close(down(d_dresid_out), dresid_out, kFp32, "dresid_out");
    expect_close(down(d_dpre), dpre, kFp32, "dpre");
    expect_close(down(d_dresid_mid), dresid_mid, kFp32, "dresid_mid");
    expect_close(down(d_datty), datty, kFp32, "datty");

    // forward again with the next layer's QKV product after the MLP in place of the head
    auto d_next_qkv = poisoned(3 * n);
    const cuda::RowProduct next_qkv =
        cuda::linear_product(d_next_qkv.data(), d_next.data(), d_qkv_w.data(), N, C, 3 * C);
    mlp.before = &proj, mlp.after = &next_qkv, mlp.after_count = 1;
    cuda::mlp_forward(handle.get(), mlp, M);
    std::vector<float> next_qkv_cpu(3 * n);
    cpu::matmul_forward<float>(next_qkv_cpu.data(), next.data(), qkv_w.data(), nullptr, M, N, C, 3 * C);
    expect_close(down(d_next_qkv), next_qkv_cpu, kFp32, "the next layer's qkv");
  }
}

// Row products in places the MLP's kernel does not take them are refused before any
// launch.
TEST_F(Gpu, MlpRefusesStagesOutOfPlace) {
  cuda::CublasHandle handle(stream->get(), false);
  const cuda::RowProduct input = cuda::backward_input_product(nullptr, nullptr, nullptr, 32, 8, 8);
  const cuda::RowProduct loss = cuda::crossentropy_product(nullptr, nullptr, nullptr, nullptr, nullptr, 32, 8, 8, true);
  cuda::MlpSublayer mlp{};
  mlp.N = 32, mlp.C = 8, mlp.D = 16, mlp.act = cuda::Act::gelu;
  mlp.after = &input, mlp.after_count = 1;
  EXPECT_THROW(cuda::mlp_forward(handle.get(), mlp, 1), std::invalid_argument);
  mlp.after = &loss;
  EXPECT_THROW(cuda::mlp_backward(handle.get(), mlp, 1), std::invalid_argument);
  mlp.after = &input, mlp.after_count = 2;
  EXPECT_THROW(cuda::mlp_backward(handle.get(), mlp, 1), std::invalid_argument);
  const cuda::RowProduct linear[] = {cuda::linear_product(nullptr, nullptr, nullptr, 32, 8, 8), loss};
  mlp.after = linear, mlp.after_count = 2;  // a linear product only alone
  EXPECT_THROW(cuda::mlp_forward(handle.get(), mlp, 1), std::invalid_argument);
  mlp.after_count = 1;
  EXPECT_THROW(cuda::mlp_backward(handle.get(), mlp, 1), std::invalid_argument);
}

// The attention with the products at its ends (one kernel each way where a sequence is
// one chunk, else cuBLAS and the kernels apart; the two shapes added have an odd head
// width and operands over 48 KiB): qkv written without the bias, out, att and dqkv
// against the CPU ops composed; without the QKV bias, with it, and with it and the
// first layer's norm of the embedding formed there too (encoded, the norm, mean, rstd);
// and that last in TF32 (the attention on the tensor cores where it fits, the products
// in cuBLAS).
TEST_F(Gpu, AttentionWithProducts) {
  cuda::CublasHandle fp32_handle(stream->get(), false), tf32_handle(stream->get(), true);
  for (const Shape& s : shapes_and({{2, 2, 17, 30, 2, 5, 5}, {1, 2, 32, 96, 3, 5, 5}}))
    for (const int variant : {0, 1, 2, 3}) {
      const bool with_bias = variant > 0, embed = variant >= 2, tf32 = variant == 3;
      // TF32 rounds q and k by up to 2^-11 each; with scores of a few units, as these
      // weights make, the softmax's gradient carries that into dqkv (3.5e-3 at worst on
      // the emulator, the products there in float32)
      const double tol = tf32 ? 1e-2 : kFp32;
      const cuda::CublasHandle& handle = tf32 ? tf32_handle : fp32_handle;
      SCOPED_TRACE("T " + std::to_string(s.T) + ", C " + std::to_string(s.C) + ", H " + std::to_string(s.H) +
                   (with_bias ? ", bias" : "") + (embed ? ", embedding" : "") + (tf32 ? ", tf32" : ""));
      const int M = s.M, N = s.B * s.T, C = s.C;
      const int64_t n = int64_t(M) * N * C, probs = int64_t(M) * s.B * s.H * s.T * s.T, rows = int64_t(M) * N;
      const auto tokens = random_tokens(size_t(rows), s.V, 126);
      const auto wte = random_vector<float>(size_t(M) * s.V * C, 127), wpe = random_vector<float>(size_t(M) * s.T * C, 128);
      const auto norm_w = random_vector<float>(size_t(M) * C, 129), norm_b = random_vector<float>(size_t(M) * C, 130);
      std::vector<float> ln = random_vector<float>(n, 121), encoded(n), mean(rows), rstd(rows);
      if (embed) {
        cpu::embedding_forward(encoded.data(), tokens.data(), wte.data(), wpe.data(), int64_t(s.T) * C, M, s.B, s.T,
                               C, s.V);
        cpu::layernorm_forward(ln.data(), mean.data(), rstd.data(), encoded.data(), norm_w.data(), norm_b.data(), M,
                               N, C);
      }
      const auto qkv_w = random_vector<float>(size_t(M) * 3 * C * C, 122, 0.3);
      const auto qkv_b = random_vector<float>(size_t(M) * 3 * C, 123);
      const auto proj_w = random_vector<float>(size_t(M) * C * C, 124, 0.3), dproj = random_vector<float>(n, 125);
      auto d_qkv_w = up(qkv_w), d_qkv_b = up(qkv_b), d_proj_w = up(proj_w), d_dproj = up(dproj);
      auto d_wte = up(wte), d_wpe = up(wpe), d_norm_w = up(norm_w), d_norm_b = up(norm_b);
      auto d_tokens = up(tokens);
      auto d_ln = embed ? poisoned(n) : up(ln), d_encoded = poisoned(n), d_mean = poisoned(rows),
           d_rstd = poisoned(rows);
      auto d_qkv = poisoned(3 * n), d_att = poisoned(probs), d_out = poisoned(n), d_datty = poisoned(n),
           d_dqkv = poisoned(3 * n), d_lse = poisoned(probs / s.T);
      const cuda::EmbeddingNorm embedding{d_ln.data(), d_mean.data(), d_rstd.data(), d_encoded.data(),
                                          d_tokens.data(), d_wte.data(), d_wpe.data(), int64_t(s.T) * C,
                                          d_norm_w.data(), d_norm_b.data(), s.V};
      cuda::AttentionWithProducts a{};
      a.ln = d_ln.data(), a.qkv_w = d_qkv_w.data(), a.qkv_b = with_bias ? d_qkv_b.data() : nullptr;
      a.proj_w = d_proj_w.data(), a.dproj = d_dproj.data(), a.qkv = d_qkv.data(), a.att = d_att.data();
      a.out = d_out.data(), a.datty = d_datty.data(), a.dqkv = d_dqkv.data();
      a.embedding = embed ? &embedding : nullptr, a.B = s.B, a.T = s.T, a.C = C, a.H = s.H, a.tf32 = tf32;
      a.lse = d_lse.data(), a.for_backward = true;
      const bool flash = cuda::attention_flash_fits(s.T, C, s.H, false, tf32);
      const bool keeps_lse = flash && cuda::attention_flash_recomputes(s.T, C, s.H, tf32);
      cuda::attention_forward_with_products(handle.get(), a, M);
      cuda::attention_backward_with_products(handle.get(), a, M);

      std::vector<float> raw(3 * n), out(n), att(probs), datty(n), dqkv(3 * n), unused_dw(proj_w.size());
      cpu::matmul_forward<float>(raw.data(), ln.data(), qkv_w.data(), nullptr, M, N, C, 3 * C);
      std::vector<float> qkv = raw;
      if (with_bias)
        for (int64_t i = 0; i < 3 * n; ++i) qkv[i] += qkv_b[i / (int64_t(N) * 3 * C) * 3 * C + i % (3 * C)];
      cpu::attention_forward(out.data(), att.data(), qkv.data(), M, s.B, s.T, C, s.H);
      cpu::matmul_backward(datty.data(), unused_dw.data(), static_cast<float*>(nullptr), dproj.data(),
                           std::vector<float>(n).data(), proj_w.data(), M, N, C, C);
      cpu::attention_backward(dqkv.data(), datty.data(), qkv.data(), att.data(), M, s.B, s.T, C, s.H);
      if (embed) {
        expect_close(down(d_encoded), encoded, kFp32, "encoded");
        expect_close(down(d_ln), ln, kFp32, "norm");
        expect_close(down(d_mean), mean, kFp32, "mean");
        expect_close(down(d_rstd), rstd, kFp32, "rstd");
      }
      expect_close(down(d_qkv), raw, tol, "qkv");
      expect_close(down(d_out), out, tol, "out");
      // what the forward keeps for the backward
      auto expect_kept = [&](const cuda::DeviceBuffer<float>& d_att_kept, const std::string& what) {
        if (!keeps_lse) return expect_close(down(d_att_kept), att, tol, "att" + what);
        expect_unwritten(d_att_kept, "att" + what);
        expect_close(down(d_lse), reference_lse(qkv, s), tol, "lse" + what);
      };
      expect_kept(d_att, "");
      expect_close(down(d_dqkv), dqkv, tol, "dqkv");
      // With dproj null, the backward takes datty as it is (formed by the MLP's kernel).
      auto d_formed = up(datty), d_dqkv_formed = poisoned(3 * n);
      cuda::AttentionWithProducts formed = a;
      formed.dproj = nullptr, formed.datty = d_formed.data(), formed.dqkv = d_dqkv_formed.data();
      cuda::attention_backward_with_products(handle.get(), formed, M);
      expect_close(down(d_dqkv_formed), dqkv, tol, "dqkv from a formed datty");
      if (!embed) {  // with ln null, the forward takes qkv as it is (formed by the MLP's kernel)
        auto d_qkv_formed = up(raw), d_out_formed = poisoned(n), d_att_formed = poisoned(probs);
        cuda::AttentionWithProducts formed_qkv = a;
        formed_qkv.ln = nullptr, formed_qkv.qkv = d_qkv_formed.data(), formed_qkv.out = d_out_formed.data();
        formed_qkv.att = d_att_formed.data();
        cuda::attention_forward_with_products(handle.get(), formed_qkv, M);
        expect_close(down(d_out_formed), out, tol, "out from a formed qkv");
        expect_kept(d_att_formed, " from a formed qkv");
      }
      // A forward with no backward after it keeps nothing where flash attention runs.
      auto d_out_only = poisoned(n), d_att_only = poisoned(probs), d_lse_only = poisoned(probs / s.T);
      cuda::AttentionWithProducts forward_only = a;
      forward_only.out = d_out_only.data(), forward_only.att = d_att_only.data(), forward_only.lse = d_lse_only.data();
      forward_only.for_backward = false;
      cuda::attention_forward_with_products(handle.get(), forward_only, M);
      expect_close(down(d_out_only), out, tol, "out, forward only");
      if (flash) expect_unwritten(d_att_only, "att, forward only");
      expect_unwritten(d_lse_only, "lse, forward only");
    }
}

// Random weights of one block for M models, and the CPU ops' forward through it: the
// embedding (first) or a random residual stream in, and the final norm after.
struct BlockCase {
  BlockCase(const Shape& s, bool first, Activation activation) : act(activation) {
    const int M = s.M, N = s.B * s.T, C = s.C, D = s.D;
    const int64_t rows = int64_t(M) * N;
    uint32_t seed = first ? 60 : 90;
    auto weights = [&](size_t n, double scale) { return random_vector<float>(size_t(M) * n, ++seed, scale); };
    tokens = random_tokens(rows, s.V, ++seed);
    wte = weights(size_t(s.V) * C, 1.0), wpe = weights(size_t(s.T) * C, 1.0);
    ln1_w = weights(C, 1.0), ln1_b = weights(C, 1.0), qkv_w = weights(3 * C * C, 0.3), qkv_b = weights(3 * C, 1.0);
    proj_w = weights(C * C, 0.3), proj_b = weights(C, 1.0), ln2_w = weights(C, 1.0), ln2_b = weights(C, 1.0);
    fc_w = weights(D * C, 0.3), fc_b = weights(D, 1.0), out_w = weights(C * D, 0.1), out_b = weights(C, 1.0);
    lnf_w = weights(C, 1.0), lnf_b = weights(C, 1.0), lm_head = weights(size_t(s.V) * C, 0.3);
    targets = random_tokens(rows, s.V, ++seed);
    const size_t nc = rows * C, nd = rows * D;
    ln1.resize(nc), ln1_mean.resize(rows), ln1_rstd.resize(rows), qkv.resize(3 * nc);
    att.resize(size_t(M) * s.B * s.H * s.T * s.T), atty.resize(nc), resid_mid.resize(nc), ln2.resize(nc);
    ln2_mean.resize(rows), ln2_rstd.resize(rows), pre.resize(nd), post.resize(nd), resid_out.resize(nc);
    lnf.resize(nc), lnf_mean.resize(rows), lnf_rstd.resize(rows);
    if (first) {
      x.resize(nc);
      cpu::embedding_forward(x.data(), tokens.data(), wte.data(), wpe.data(), int64_t(s.T) * C, M, s.B, s.T, C, s.V);
    } else {
      x = random_vector<float>(nc, ++seed, 2.0);
    }
    std::vector<float> proj(nc), mlp(nc);
    cpu::layernorm_forward(ln1.data(), ln1_mean.data(), ln1_rstd.data(), x.data(), ln1_w.data(), ln1_b.data(), M, N, C);
    cpu::matmul_forward(qkv.data(), ln1.data(), qkv_w.data(), qkv_b.data(), M, N, C, 3 * C);
    cpu::attention_forward(atty.data(), att.data(), qkv.data(), M, s.B, s.T, C, s.H);
    cpu::matmul_forward(proj.data(), atty.data(), proj_w.data(), proj_b.data(), M, N, C, C);
    cpu::residual_forward(resid_mid.data(), x.data(), proj.data(), int64_t(nc));
    cpu::layernorm_forward(ln2.data(), ln2_mean.data(), ln2_rstd.data(), resid_mid.data(), ln2_w.data(), ln2_b.data(),
                           M, N, C);
    cpu::matmul_forward(pre.data(), ln2.data(), fc_w.data(), fc_b.data(), M, N, C, D);
    cpu::activation_forward(post.data(), pre.data(), int64_t(nd), act);
    cpu::matmul_forward(mlp.data(), post.data(), out_w.data(), out_b.data(), M, N, D, C);
    cpu::residual_forward(resid_out.data(), resid_mid.data(), mlp.data(), int64_t(nc));
    cpu::layernorm_forward(lnf.data(), lnf_mean.data(), lnf_rstd.data(), resid_out.data(), lnf_w.data(),
                           lnf_b.data(), M, N, C);
    // the head: logits, the mean losses and the gradients back to the last layer's output
    logits.resize(rows * s.V), dlogits.resize(logits.size()), losses.resize(M), dlnf.resize(nc);
    dresid_top.assign(nc, 0.0f);
    cpu::matmul_forward<float>(logits.data(), lnf.data(), lm_head.data(), nullptr, M, N, C, s.V);
    cpu::crossentropy_forward_backward(losses.data(), dlogits.data(), logits.data(), targets.data(), M, N, s.V);
    std::vector<float> scratch(lm_head.size()), dw(lnf_w.size()), db(lnf_b.size());
    cpu::matmul_backward<float>(dlnf.data(), scratch.data(), nullptr, dlogits.data(), lnf.data(), lm_head.data(), M,
                                N, C, s.V);
    cpu::layernorm_backward(dresid_top.data(), dw.data(), db.data(), dlnf.data(), resid_out.data(), lnf_w.data(),
                            lnf_mean.data(), lnf_rstd.data(), M, N, C);
  }
  cuda::Act cuda_act() const { return act == Activation::relu ? cuda::Act::relu : cuda::Act::gelu; }

  Activation act;
  std::vector<int32_t> tokens, targets;
  std::vector<float> wte, wpe, ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b,
      lnf_w, lnf_b, lm_head;
  std::vector<float> x, ln1, ln1_mean, ln1_rstd, qkv, att, atty, resid_mid, ln2, ln2_mean, ln2_rstd, pre, post,
      resid_out, lnf, lnf_mean, lnf_rstd, logits, dlogits, losses, dlnf, dresid_top;
};

// The fused forward kernel against the CPU ops composed: the first layer (embedding
// in) and a last one (residual in, final norm and head out, with the head's backward
// or without), every buffer it writes. The seed experiment's shape must fit, with its
// head; the others run where they fit.
TEST_F(Gpu, FusedBlockForward) {
  ASSERT_TRUE(cuda::block_forward_fits(32, 64, 4, 256, 64)) << "the seed experiment's block does not fit";
  cuda::prepare_block_kernels();
  for (const Shape& s : kShapes) for (const int layer : {0, 1, 2}) {
    const bool first = layer == 0, head_backward = layer == 2;  // layer 1: the head without backward
    if (!cuda::block_forward_fits(s.T, s.C, s.H, s.D, first ? 0 : s.V)) continue;
    SCOPED_TRACE("T " + std::to_string(s.T) + ", C " + std::to_string(s.C) + ", layer " + std::to_string(layer));
    const BlockCase k(s, first, first ? Activation::gelu : Activation::relu);
    const int64_t rows = int64_t(s.M) * s.B * s.T, nc = rows * s.C, nd = rows * s.D;
    auto d_tokens = up(k.tokens);
    auto d_wte = up(k.wte), d_wpe = up(k.wpe), d_x = up(k.x), d_ln1_w = up(k.ln1_w), d_ln1_b = up(k.ln1_b),
         d_qkv_w = up(k.qkv_w), d_qkv_b = up(k.qkv_b), d_proj_w = up(k.proj_w), d_proj_b = up(k.proj_b),
         d_ln2_w = up(k.ln2_w), d_ln2_b = up(k.ln2_b), d_fc_w = up(k.fc_w), d_fc_b = up(k.fc_b),
         d_out_w = up(k.out_w), d_out_b = up(k.out_b), d_lnf_w = up(k.lnf_w), d_lnf_b = up(k.lnf_b),
         d_lm_head = up(k.lm_head);
    auto d_targets = up(k.targets);
    auto d_logits = poisoned(k.logits.size()), d_row_loss = poisoned(rows), d_dlnf = poisoned(nc),
         d_dresid_top = poisoned(nc);
    auto d_encoded = poisoned(nc), d_ln1 = poisoned(nc), d_ln1_mean = poisoned(rows), d_ln1_rstd = poisoned(rows),
         d_qkv = poisoned(3 * nc), d_att = poisoned(k.att.size()), d_atty = poisoned(nc),
         d_resid_mid = poisoned(nc), d_ln2 = poisoned(nc), d_ln2_mean = poisoned(rows), d_ln2_rstd = poisoned(rows),
         d_pre = poisoned(nd), d_post = poisoned(nd), d_resid_out = poisoned(nc), d_lnf = poisoned(nc),
         d_lnf_mean = poisoned(rows), d_lnf_rstd = poisoned(rows);
    cuda::BlockForward f{};
    f.resid_in = first ? nullptr : d_x.data();
    f.encoded = d_encoded.data(), f.tokens = d_tokens.data(), f.wte = d_wte.data(), f.pos = d_wpe.data();
    f.pos_model_stride = int64_t(s.T) * s.C;
    f.ln1_w = d_ln1_w.data(), f.ln1_b = d_ln1_b.data(), f.qkv_w = d_qkv_w.data(), f.qkv_b = d_qkv_b.data();
    f.proj_w = d_proj_w.data(), f.proj_b = d_proj_b.data(), f.ln2_w = d_ln2_w.data(), f.ln2_b = d_ln2_b.data();
    f.fc_w = d_fc_w.data(), f.fc_b = d_fc_b.data(), f.out_w = d_out_w.data(), f.out_b = d_out_b.data();
    f.ln1 = d_ln1.data(), f.ln1_mean = d_ln1_mean.data(), f.ln1_rstd = d_ln1_rstd.data(), f.qkv = d_qkv.data();
    f.att = d_att.data(), f.atty = d_atty.data(), f.resid_mid = d_resid_mid.data(), f.ln2 = d_ln2.data();
    f.ln2_mean = d_ln2_mean.data(), f.ln2_rstd = d_ln2_rstd.data(), f.pre = d_pre.data(), f.post = d_post.data();
    f.resid_out = d_resid_out.data();
    if (!first) {
      f.lnf_w = d_lnf_w.data(), f.lnf_b = d_lnf_b.data(), f.lnf = d_lnf.data(), f.lnf_mean = d_lnf_mean.data();
      f.lnf_rstd = d_lnf_rstd.data();
      f.lm_head = d_lm_head.data(), f.targets = d_targets.data(), f.logits = d_logits.data();
      f.row_loss = d_row_loss.data(), f.backward = head_backward;
      if (head_backward) f.dlnf = d_dlnf.data(), f.dresid_top = d_dresid_top.data();
    }
    f.B = s.B, f.T = s.T, f.C = s.C, f.H = s.H, f.D = s.D, f.V = s.V;
    f.scale = cuda::attention_scale(s.C / s.H);
    f.act = k.cuda_act();
    cuda::block_forward(f, s.M, stream->get());
    if (first) {
      EXPECT_EQ(down(d_encoded), k.x);  // one addition per element: equal to the bit
    }
    expect_close(down(d_ln1), k.ln1, kFp32, "ln1");
    expect_close(down(d_ln1_rstd), k.ln1_rstd, kFp32, "ln1 rstd");
    expect_close(down(d_qkv), k.qkv, kFp32, "qkv");
    expect_close(down(d_att), k.att, kFp32, "att");
    expect_close(down(d_atty), k.atty, kFp32, "atty");
    expect_close(down(d_resid_mid), k.resid_mid, kFp32, "resid_mid");
    expect_close(down(d_ln2), k.ln2, kFp32, "ln2");
    expect_close(down(d_ln2_mean), k.ln2_mean, kFp32, "ln2 mean");
    expect_close(down(d_pre), k.pre, kFp32, "pre");
    expect_close(down(d_post), k.post, kFp32, "post");
    expect_close(down(d_resid_out), k.resid_out, kFp32, "resid_out");
    if (first) continue;
    expect_close(down(d_lnf), k.lnf, kFp32, "lnf");
    expect_close(down(d_lnf_rstd), k.lnf_rstd, kFp32, "lnf rstd");
    const auto row_loss = down(d_row_loss);
    for (int m = 0; m < s.M; ++m) {
      double sum = 0;
      for (int n = 0; n < s.B * s.T; ++n) sum += row_loss[size_t(m) * s.B * s.T + n];
      EXPECT_NEAR(sum / (s.B * s.T), k.losses[m], kFp32 * k.losses[m]) << "mean loss of model " << m;
    }
    if (!head_backward) {
      expect_close(down(d_logits), k.logits, kFp32, "logits");
      continue;
    }
    expect_close(down(d_logits), k.dlogits, kFp32, "dlogits");
    expect_close(down(d_dlnf), k.dlnf, kFp32, "dlnf");
    expect_close(down(d_dresid_top), k.dresid_top, kFp32, "dresid_top");
  }
}

// The fused backward kernel against the CPU ops' backward through the same block from
// the CPU forward's activations: every gradient it writes, and each sequence's share
// of the bias and norm gradients.
TEST_F(Gpu, FusedBlockBackward) {
  ASSERT_TRUE(cuda::block_backward_fits(32, 64, 4, 256)) << "the seed experiment's block does not fit";
  cuda::prepare_block_kernels();
  for (const Shape& s : kShapes) for (const Activation act : {Activation::gelu, Activation::relu}) {
    if (!cuda::block_backward_fits(s.T, s.C, s.H, s.D)) continue;
    SCOPED_TRACE("T " + std::to_string(s.T) + ", C " + std::to_string(s.C));
    const BlockCase k(s, false, act);
    const int M = s.M, N = s.B * s.T, C = s.C, D = s.D;
    const int64_t rows = int64_t(M) * N, nc = rows * C, nd = rows * D;
    const auto dresid_out = random_vector<float>(nc, 120);
    // CPU: the chain of input gradients (the weight gradients go to scratch)
    std::vector<float> dpost(nd), dpre(nd), dln2(nc), dresid_mid = dresid_out, datty(nc), dqkv(3 * nc), dln1(nc);
    std::vector<float> scratch(size_t(M) * std::max(3 * C * C, D * C)), dw(size_t(M) * C), db(size_t(M) * C);
    cpu::matmul_backward<float>(dpost.data(), scratch.data(), nullptr, dresid_out.data(), k.post.data(),
                                k.out_w.data(), M, N, D, C);
    cpu::activation_backward(dpre.data(), dpost.data(), k.pre.data(), nd, act);
    cpu::matmul_backward<float>(dln2.data(), scratch.data(), nullptr, dpre.data(), k.ln2.data(), k.fc_w.data(), M, N,
                                C, D);
    cpu::layernorm_backward(dresid_mid.data(), dw.data(), db.data(), dln2.data(), k.resid_mid.data(),
                            k.ln2_w.data(), k.ln2_mean.data(), k.ln2_rstd.data(), M, N, C);
    cpu::matmul_backward<float>(datty.data(), scratch.data(), nullptr, dresid_mid.data(), k.atty.data(),
                                k.proj_w.data(), M, N, C, C);
    cpu::attention_backward(dqkv.data(), datty.data(), k.qkv.data(), k.att.data(), M, s.B, s.T, C, s.H);
    cpu::matmul_backward<float>(dln1.data(), scratch.data(), nullptr, dqkv.data(), k.ln1.data(), k.qkv_w.data(), M,
                                N, C, 3 * C);
    std::vector<float> dresid_in = dresid_mid;
    cpu::layernorm_backward(dresid_in.data(), dw.data(), db.data(), dln1.data(), k.x.data(), k.ln1_w.data(),
                            k.ln1_mean.data(), k.ln1_rstd.data(), M, N, C);
    // GPU, from the CPU forward's activations
    auto d_dresid_out = up(dresid_out), d_x = up(k.x), d_ln1_mean = up(k.ln1_mean), d_ln1_rstd = up(k.ln1_rstd),
         d_qkv = up(k.qkv), d_att = up(k.att), d_resid_mid = up(k.resid_mid), d_ln2_mean = up(k.ln2_mean),
         d_ln2_rstd = up(k.ln2_rstd), d_pre = up(k.pre), d_ln1_w = up(k.ln1_w), d_qkv_w = up(k.qkv_w),
         d_proj_w = up(k.proj_w), d_ln2_w = up(k.ln2_w), d_fc_w = up(k.fc_w), d_out_w = up(k.out_w);
    auto d_dpre = poisoned(nd), d_dln2 = poisoned(nc), d_dresid_mid = poisoned(nc), d_dqkv = poisoned(3 * nc),
         d_dln1 = poisoned(nc), d_dresid_in = poisoned(nc);
    cuda::BlockBackward b{};
    b.dresid_out = d_dresid_out.data(), b.resid_in = d_x.data(), b.ln1_mean = d_ln1_mean.data();
    b.ln1_rstd = d_ln1_rstd.data(), b.qkv = d_qkv.data(), b.att = d_att.data(), b.resid_mid = d_resid_mid.data();
    b.ln2_mean = d_ln2_mean.data(), b.ln2_rstd = d_ln2_rstd.data(), b.pre = d_pre.data(), b.ln1_w = d_ln1_w.data();
    b.qkv_w = d_qkv_w.data(), b.proj_w = d_proj_w.data(), b.ln2_w = d_ln2_w.data(), b.fc_w = d_fc_w.data();
    b.out_w = d_out_w.data();
    b.dpre = d_dpre.data(), b.dln2 = d_dln2.data(), b.dresid_mid = d_dresid_mid.data(), b.dqkv = d_dqkv.data();
    b.dln1 = d_dln1.data(), b.dresid_in = d_dresid_in.data();
    b.B = s.B, b.T = s.T, b.C = C, b.H = s.H, b.D = D, b.scale = cuda::attention_scale(C / s.H), b.act = k.cuda_act();
    const int sequences = M * s.B;
    auto d_out_b_shares = poisoned(size_t(sequences) * C), d_fc_b_shares = poisoned(size_t(sequences) * D),
         d_proj_b_shares = poisoned(size_t(sequences) * C), d_qkv_b_shares = poisoned(size_t(sequences) * 3 * C),
         d_ln2_w_shares = poisoned(size_t(sequences) * C), d_ln2_b_shares = poisoned(size_t(sequences) * C),
         d_ln1_w_shares = poisoned(size_t(sequences) * C), d_ln1_b_shares = poisoned(size_t(sequences) * C);
    b.sums = {d_out_b_shares.data(), d_fc_b_shares.data(), d_ln2_w_shares.data(), d_ln2_b_shares.data(),
              d_proj_b_shares.data(), d_qkv_b_shares.data(), d_ln1_w_shares.data(), d_ln1_b_shares.data()};
    cuda::block_backward(b, M, stream->get());
    expect_close(down(d_dpre), dpre, kFp32, "dpre");
    expect_close(down(d_dln2), dln2, kFp32, "dln2");
    expect_close(down(d_dresid_mid), dresid_mid, kFp32, "dresid_mid");
    expect_close(down(d_dqkv), dqkv, kFp32, "dqkv");
    expect_close(down(d_dln1), dln1, kFp32, "dln1");
    expect_close(down(d_dresid_in), dresid_in, kFp32, "dresid_in");
    // each sequence's share of the bias and norm gradients
    auto sequence_sums = [&](const std::vector<float>& v, int columns) {
      std::vector<float> out(size_t(sequences) * columns);
      for (int q = 0; q < sequences; ++q)
        for (int c = 0; c < columns; ++c) {
          double sum = 0;
          for (int t = 0; t < s.T; ++t) sum += v[(int64_t(q) * s.T + t) * columns + c];
          out[size_t(q) * columns + c] = static_cast<float>(sum);
        }
      return out;
    };
    auto norm_sequence_sums = [&](const std::vector<float>& dout, const std::vector<float>& inp,
                                  const std::vector<float>& weight, const std::vector<float>& mean,
                                  const std::vector<float>& rstd) {
      std::vector<float> dweight(size_t(sequences) * C, 0.0f), dbias(dweight.size(), 0.0f), dinp(size_t(s.T) * C);
      for (int q = 0; q < sequences; ++q) {
        const int64_t row = int64_t(q) * s.T;
        cpu::layernorm_backward(dinp.data(), dweight.data() + int64_t(q) * C, dbias.data() + int64_t(q) * C,
                                dout.data() + row * C, inp.data() + row * C, weight.data() + int64_t(q / s.B) * C,
                                mean.data() + row, rstd.data() + row, 1, s.T, C);
      }
      return std::make_pair(dweight, dbias);
    };
    expect_close(down(d_out_b_shares), sequence_sums(dresid_out, C), kFp32, "out_b shares");
    expect_close(down(d_fc_b_shares), sequence_sums(dpre, D), kFp32, "fc_b shares");
    expect_close(down(d_proj_b_shares), sequence_sums(dresid_mid, C), kFp32, "proj_b shares");
    expect_close(down(d_qkv_b_shares), sequence_sums(dqkv, 3 * C), kFp32, "qkv_b shares");
    const auto [ln2_w, ln2_b] = norm_sequence_sums(dln2, k.resid_mid, k.ln2_w, k.ln2_mean, k.ln2_rstd);
    expect_close(down(d_ln2_w_shares), ln2_w, kFp32, "ln2_w shares");
    expect_close(down(d_ln2_b_shares), ln2_b, kFp32, "ln2_b shares");
    const auto [ln1_w, ln1_b] = norm_sequence_sums(dln1, k.x, k.ln1_w, k.ln1_mean, k.ln1_rstd);
    expect_close(down(d_ln1_w_shares), ln1_w, kFp32, "ln1_w shares");
    expect_close(down(d_ln1_b_shares), ln1_b, kFp32, "ln1_b shares");
  }
}

TEST_F(Gpu, CrossEntropy) {
  for (const Shape& s : kShapes) {
    const int N = s.B * s.T;
    const auto logits = random_vector<float>(size_t(s.M) * N * s.V, 51, 3.0);
    const auto targets = random_tokens(size_t(s.M) * N, s.V, 52);
    std::vector<float> losses(s.M), dlogits(logits.size());
    cpu::crossentropy_forward_backward(losses.data(), dlogits.data(), logits.data(), targets.data(), s.M, N, s.V);
    for (const bool backward : {false, true}) {
      auto d_logits = up(logits);
      auto d_targets = up(targets);
      auto d_losses = poisoned(s.M), d_rows = poisoned(size_t(s.M) * N);
      cuda::crossentropy_forward_backward(d_rows.data(), d_logits.data(), d_targets.data(), s.M, N, s.V, backward,
                                          stream->get());
      cuda::mean_loss_per_model(d_losses.data(), d_rows.data(), s.M, N, stream->get());
      expect_close(down(d_losses), losses, kFp32, "losses");
      if (backward) expect_close(down(d_logits), dlogits, kFp32, "dlogits");
      else EXPECT_EQ(down(d_logits), logits);  // forward only: the logits stay
    }
  }
}

// cuBLAS handles come back from the pool: the one given back last is the next taken
// (its workspace with it), bound to the new stream; handles alive together differ.
TEST_F(Gpu, CublasHandlesComeBackFromThePool) {
  cuda::Stream other;
  cublasHandle_t released = nullptr;
  {
    cuda::CublasHandle first(other.get(), true);
    released = first.get();
  }
  cuda::CublasHandle again(stream->get(), false), more(stream->get(), false);
  EXPECT_EQ(again.get(), released);
  EXPECT_NE(more.get(), again.get());
  cudaStream_t bound = nullptr;
  ASSERT_EQ(cublasGetStream(again.get(), &bound), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(bound, stream->get());
}

TEST_F(Gpu, NormsClippingAndAdamW) {
  ModelConfig c;
  c.vocab = 13, c.seq_len = 7, c.d_model = 12, c.heads = 3, c.d_mlp = 200, c.layers = 2;  // fc weights: 2 pieces
  for (const int M : {1, 3}) {
    const ParamLayout layout(c, M);
    auto params = random_vector<float>(layout.total(), 61), grads = random_vector<float>(layout.total(), 62, 0.3);
    auto m1 = random_vector<float>(layout.total(), 63, 0.1), v1 = random_vector<float>(layout.total(), 64, 0.1);
    for (float& x : v1) x = x * x;
    std::vector<cuda::ParamSegment> segments;
    for (const auto& t : layout.tensors())
      for (int m = 0; m < M; ++m) segments.push_back({layout.offset(t, m), t.numel, m, t.decay ? 1 : 0});
    const double lr = 2e-3, clip = 1.0, wd = 0.1;
    const int64_t step = 5;
    const double bc1 = 1 - std::pow(0.9, step), bc2 = 1 - std::pow(0.999, step);
    const cuda::OptimizerStep h{float(lr / bc1), float(1 / std::sqrt(bc2)), float(1 - lr * wd), 0.9f, 0.999f, 1e-8f,
                                clip};
    const std::vector<float> losses(M, 1.5f);
    auto d_params = up(params), d_grads = up(grads), d_m = up(m1), d_v = up(v1), d_losses = up(losses);
    const auto pieces = cuda::norm_pieces(segments);
    auto d_pieces = up(pieces);
    auto d_step = up(std::vector<cuda::OptimizerStep>{h});
    cuda::DeviceBuffer<double> partials(pieces.size());
    auto norms = poisoned(M), scales = poisoned(M);
    cuda::DeviceBuffer<int> finite(1);
    auto blocks_done = up(std::vector<unsigned>{0});
    cuda::PinnedBuffer<float> report_losses(M), report_norms(M);  // the host's copies, written by the kernel
    cuda::PinnedBuffer<int> report_finite(1);
    std::fill_n(report_losses.data(), M, std::nanf("")), std::fill_n(report_norms.data(), M, std::nanf(""));
    report_finite[0] = -1;
    for (int repeat = 0; repeat < 2; ++repeat)  // the second launch finds the counter zero again
      cuda::grad_norms(partials.data(), blocks_done.data(), norms.data(), scales.data(), finite.data(), d_grads.data(),
                       d_pieces.data(), int(pieces.size()), d_losses.data(), M, d_step.data(),
                       {report_losses.data(), report_norms.data(), report_finite.data(), nullptr}, stream->get());
    cuda::adamw_update(d_params.data(), d_grads.data(), d_m.data(), d_v.data(), d_pieces.data(), int(pieces.size()),
                       scales.data(), finite.data(), d_step.data(), stream->get());
    EXPECT_EQ(down(finite)[0], 1);
    EXPECT_EQ(down(blocks_done)[0], 0u);
    const auto gpu_norms = down(norms);  // (down() waits for the stream)
    EXPECT_EQ(std::vector<float>(report_norms.data(), report_norms.data() + M), gpu_norms);
    EXPECT_EQ(std::vector<float>(report_losses.data(), report_losses.data() + M), losses);
    EXPECT_EQ(report_finite[0], 1);
    for (int m = 0; m < M; ++m) {
      double sq = 0;
      for (const auto& t : layout.tensors()) sq += cpu::sum_squares(grads.data() + layout.offset(t, m), t.numel);
      const double norm = std::sqrt(sq), scale = std::min(1.0, clip / (norm + 1e-6));
      EXPECT_NEAR(gpu_norms[m], norm, 1e-5 * norm);
      for (const auto& t : layout.tensors()) {
        const int64_t at = layout.offset(t, m);
        cpu::adamw_update(params.data() + at, grads.data() + at, m1.data() + at, v1.data() + at, t.numel, scale,
                          {lr, 0.9, 0.999, 1e-8, t.decay ? wd : 0.0, step});
      }
    }
    expect_close(down(d_params), params, kFp32, "params");
    expect_close(down(d_m), m1, kFp32, "exp_avg");
    expect_close(down(d_v), v1, kFp32, "exp_avg_sq");
  }
}

// Host parts of the launchers, run without a device.
TEST(CudaHost, NormPiecesCoverEverySegmentInOrder) {
  const std::vector<cuda::ParamSegment> segments = {{0, 5000, 0, 1}, {5056, 1, 1, 0}, {6000, 2048, 0, 0}, {9000, 0, 1, 1}};
  const auto pieces = cuda::norm_pieces(segments);
  size_t k = 0;
  for (const auto& seg : segments)
    for (int64_t at = 0; at < seg.numel; at += pieces[k++].numel) {
      ASSERT_LT(k, pieces.size());
      EXPECT_EQ(pieces[k].offset, seg.offset + at);
      EXPECT_GT(pieces[k].numel, 0);
      EXPECT_LE(pieces[k].numel, 2048);
      EXPECT_EQ(pieces[k].model, seg.model);
      EXPECT_EQ(pieces[k].decay, seg.decay);
    }
  EXPECT_EQ(k, pieces.size());
  EXPECT_EQ(pieces.size(), 3u + 1u + 1u);
}

TEST(CudaHost, ColumnSumsHandOutAlignedRoomAndRefuseMore) {
  std::vector<float> scratch(1000);  // add() only hands out places in it
  const int64_t room = cuda::column_sum_partials(2, 70, 5);
  EXPECT_EQ(room % 64, 0);
  EXPECT_GE(room, 2 * 3 * 5);  // 70 rows: 3 chunks
  cuda::ColumnSums sums(scratch.data(), 2 * room);
  float out = 0;
  EXPECT_EQ(sums.add(&out, nullptr, 2, 3, 5), scratch.data());
  EXPECT_EQ(sums.add(&out, nullptr, 2, 3, 5), scratch.data() + room);
  EXPECT_THROW(sums.add(&out, nullptr, 1, 1, 1), std::logic_error);
}

TEST(CudaHost, PositionsSortedByTokenAreStableAndComplete) {
  const std::vector<int32_t> tokens = {2, 0, 2, 1, 2, /* model 1 */ 3, 3, 0, 3, 3};
  std::vector<int32_t> rows(10, -1), starts(2 * 5, -1);
  cuda::sort_positions_by_token(rows.data(), starts.data(), tokens.data(), 2, 5, 4);
  EXPECT_EQ(rows, (std::vector<int32_t>{1, 3, 0, 2, 4, /* model 1 */ 2, 0, 1, 3, 4}));
  EXPECT_EQ(starts, (std::vector<int32_t>{0, 1, 2, 5, 5, /* model 1 */ 0, 1, 1, 1, 5}));
  const std::vector<int32_t> outside = {0, 4};
  EXPECT_THROW(cuda::sort_positions_by_token(rows.data(), starts.data(), outside.data(), 1, 2, 4), std::out_of_range);
}

RunConfig small_run(int models) {
  RunConfig c;
  c.model = {0, 16, 32, 4, 48, 2, Activation::gelu, PosEncoding::learned};
  c.data.test_samples = 64;
  c.models = models;
  for (int m = 0; m < models; ++m) c.seeds.push_back(7 + m);
  c.samples = 512;
  c.batch = 16;
  c.steps = 100;
  c.optim.warmup = 10;
  c.optim.lr = 3e-3;
  return c;
}

// What a GPU backend's steps from the CPU backend's initial weights come to, against the
// CPU's: the first step's gradients and norms, the worst relative loss difference over
// the steps, the parameters after them, the test losses.
struct Divergence {
  testing::TensorError gradient_tensor;  // the first step's gradients: the worst tensor
  double grad_norms = 0, losses = 0, params = 0, test_losses = 0;
};
Divergence steps_against_cpu(const RunConfig& c, Precision precision, CudaFusion fusion) {
  const DataSource source = open_data(c.data);
  RunConfig run = c;
  run.model.vocab = run.data.vocab = source.vocab();
  const DataSplits splits = make_splits(source, run);
  BatchSampler sampler(run, splits);
  auto cpu = make_backend(Device::cpu, run), gpu = make_backend(Device::cuda, run, precision, fusion);
  const ParamLayout layout(run.model, run.models);
  TrainState init{std::vector<float>(layout.total()), std::vector<float>(layout.total()),
                  std::vector<float>(layout.total()), 0};
  std::vector<uint64_t> seeds(run.seeds.begin(), run.seeds.end());
  init_parameters(layout, run.model, seeds, init.params.data());
  cpu->set_state(init);
  gpu->set_state(init);
  const size_t n = size_t(run.models) * run.batch * run.model.seq_len;
  std::vector<int32_t> in(n), tg(n);
  Divergence d;
  for (int64_t step = 0; step < run.steps; ++step) {
    sampler.fill(step, in.data(), tg.data());
    const double lr = learning_rate(run.optim, step, run.steps);
    const StepStats a = cpu->step(in.data(), tg.data(), lr), b = gpu->step(in.data(), tg.data(), lr);
    EXPECT_TRUE(b.finite) << "step " << step;
    if (step == 0) {
      d.gradient_tensor = testing::worst_tensor_error(layout, run.models, gpu->gradients(), cpu->gradients());
      for (int m = 0; m < run.models; ++m)
        d.grad_norms = std::max(d.grad_norms, std::abs(b.grad_norm[m] - a.grad_norm[m]) / a.grad_norm[m]);
    }
    for (int m = 0; m < run.models; ++m) d.losses = std::max(d.losses, std::abs(b.loss[m] - a.loss[m]) / a.loss[m]);
  }
  d.params = relative_error(gpu->state().params, cpu->state().params);
  const auto test_cpu = cpu->evaluate(splits.test.tokens.data(), splits.test.count());
  const auto test_gpu = gpu->evaluate(splits.test.tokens.data(), splits.test.count());
  for (int m = 0; m < run.models; ++m)
    d.test_losses = std::max(d.test_losses, std::abs(test_gpu[m] - test_cpu[m]) / test_cpu[m]);
  return d;
}

// Every way of grouping the work into kernels (this shape fits each). Each tensor's first
// gradient to 1e-5 (on the host emulator the worst is 2.9e-7 to 3.3e-7).
TEST_F(Gpu, WholeStepsFollowTheCpuBackend) {
  for (const auto& [models, fusion] : {std::pair{1, CudaFusion::blocks}, std::pair{3, CudaFusion::blocks},
                                       std::pair{3, CudaFusion::sublayers}, std::pair{2, CudaFusion::ops}}) {
    SCOPED_TRACE(to_string(fusion) + ", " + std::to_string(models) + " models");
    const Divergence d = steps_against_cpu(small_run(models), Precision::fp32, fusion);
    EXPECT_LT(d.gradient_tensor.error, 1e-5) << "one whole step's gradients, worst " << d.gradient_tensor.tensor;
    EXPECT_LT(d.grad_norms, 1e-5);
    EXPECT_LT(d.losses, 1e-4) << "100-step loss trajectory";
    EXPECT_LT(d.params, 1e-3);
    EXPECT_LT(d.test_losses, 1e-3);
  }
}

// In TF32 (cuBLAS's products and the attention on the tensor cores, the head width of 8
// fitting attention_flash.cu, and the MLP kernel's two products) the steps stay near the
// float32 CPU backend's: 20 steps, by sublayers and by op. Each tensor's first gradient
// to 5e-3, as emulated_cuda_training checks: on the host emulator the worst is 4.8e-4 to
// 7.9e-4, and 1.3e-2 with a wrong channel in the recomputed scores (the all-gradient
// norm then only 1.1e-3).
TEST_F(Gpu, Tf32StepsStayNearTheCpuBackend) {
  for (const CudaFusion fusion : {CudaFusion::sublayers, CudaFusion::ops}) {
    SCOPED_TRACE(to_string(fusion));
    RunConfig c = small_run(2);
    c.steps = 20;
    const Divergence d = steps_against_cpu(c, Precision::tf32, fusion);
    EXPECT_LT(d.gradient_tensor.error, 5e-3) << "one whole step's gradients, worst " << d.gradient_tensor.tensor;
    EXPECT_LT(d.grad_norms, 1e-2);
    EXPECT_LT(d.losses, 1e-3) << "20-step loss trajectory";
    EXPECT_LT(d.test_losses, 1e-2);
  }
}

TEST_F(Gpu, TwoRunsGiveIdenticalCheckpoints) {
  TempDir a, b;
  for (const TempDir* dir : {&a, &b}) {
    TrainOptions o;
    o.config = small_run(2);
    o.config.steps = 30;
    o.device = Device::cuda;
    o.out_dir = dir->path();
    train(o, {});
  }
  for (int m = 0; m < 2; ++m) {
    EXPECT_EQ(read_file(model_file(a.path(), m)), read_file(model_file(b.path(), m)));
    EXPECT_EQ(read_file(optimizer_file(a.path(), m)), read_file(optimizer_file(b.path(), m)));
  }
}

// Two models of one small layer, from the same weights on two backends (the second's
// kernels launched as `second`).
std::pair<std::unique_ptr<TrainBackend>, std::unique_ptr<TrainBackend>> twin_backends(
    const RunConfig& c, TrainState* init, CudaFusion fusion = CudaFusion::sublayers,
    CudaLaunch second = CudaLaunch::ordered) {
  const ParamLayout layout(c.model, c.models);
  *init = {random_vector<float>(layout.total(), 81, 0.05), std::vector<float>(layout.total()),
           std::vector<float>(layout.total()), 0};
  auto a = make_backend(Device::cuda, c, Precision::fp32, fusion),
       b = make_backend(Device::cuda, c, Precision::fp32, fusion, second);
  a->set_state(*init);
  b->set_state(*init);
  return {std::move(a), std::move(b)};
}

RunConfig tiny_run() {
  RunConfig c;
  c.model = {64, 8, 16, 2, 24, 1, Activation::relu, PosEncoding::learned};
  c.models = 2;
  c.seeds = {1, 2};
  c.batch = 3;
  return c;
}

// Queued runs (more steps than one run holds, so that both halves of the queue serve)
// are the same steps as one at a time: the same reports and, bit for bit, the same state.
TEST_F(Gpu, QueuedStepsEqualStepsOneAtATime) {
  const RunConfig c = tiny_run();
  TrainState init;
  auto [queued, single] = twin_backends(c, &init);
  const int n = 70;
  const size_t per_step = size_t(c.models) * c.batch * c.model.seq_len;
  const auto inputs = random_tokens(per_step * n, 64, 82), targets = random_tokens(per_step * n, 64, 83);
  std::vector<double> lr(n);
  for (int k = 0; k < n; ++k) lr[k] = 1e-3 * (1 + k % 5);
  const std::vector<StepStats> done = queued->steps(inputs.data(), targets.data(), lr.data(), n);
  ASSERT_EQ(done.size(), size_t(n));
  for (int k = 0; k < n; ++k) {
    const StepStats one = single->step(inputs.data() + k * per_step, targets.data() + k * per_step, lr[k]);
    ASSERT_TRUE(done[k].finite) << "step " << k;
    EXPECT_EQ(done[k].loss, one.loss) << "step " << k;
    EXPECT_EQ(done[k].grad_norm, one.grad_norm) << "step " << k;
  }
  const TrainState a = queued->state(), b = single->state();
  EXPECT_EQ(a.step, n);
  EXPECT_EQ(b.step, n);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.exp_avg, b.exp_avg);
  EXPECT_EQ(a.exp_avg_sq, b.exp_avg_sq);
}

// Kernels that launch early and wait for the ones before them compute what they compute
// in stream order: the same queued steps, bit for bit, with each grouping of the work.
TEST_F(Gpu, ChainedLaunchesComputeWhatOrderedOnesDo) {
  for (const CudaFusion fusion : {CudaFusion::sublayers, CudaFusion::ops}) {
    SCOPED_TRACE(to_string(fusion));
    const RunConfig c = tiny_run();
    TrainState init;
    auto [ordered, chained] = twin_backends(c, &init, fusion, CudaLaunch::chained);
    const int n = 20;
    const size_t per_step = size_t(c.models) * c.batch * c.model.seq_len;
    const auto inputs = random_tokens(per_step * n, 64, 84), targets = random_tokens(per_step * n, 64, 85);
    const std::vector<double> lr(n, 2e-3);
    const std::vector<StepStats> a = ordered->steps(inputs.data(), targets.data(), lr.data(), n);
    const std::vector<StepStats> b = chained->steps(inputs.data(), targets.data(), lr.data(), n);
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k) {
      EXPECT_EQ(a[k].loss, b[k].loss) << "step " << k;
      EXPECT_EQ(a[k].grad_norm, b[k].grad_norm) << "step " << k;
    }
    const TrainState x = ordered->state(), y = chained->state();
    EXPECT_EQ(x.params, y.params);
    EXPECT_EQ(x.exp_avg, y.exp_avg);
    EXPECT_EQ(x.exp_avg_sq, y.exp_avg_sq);
  }
}

// A launch chains only inside a capture with chaining on, on compute capability 9.0 and
// up, right after one kernel: not first, not after a fill, not where two streams join.
TEST_F(Gpu, LaunchesChainRightAfterOneKernelOnly) {
  int device = 0, major = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  const bool hopper = major >= 9;
  cuda::DeviceBuffer<float> x(64);
  const cudaStream_t s = stream->get();
  cuda::Stream other;
  cuda::Event forked(cudaEventDisableTiming), joined(cudaEventDisableTiming);
  auto kernel_on = [&](cudaStream_t on) { cuda::activation_backward(x.data(), x.data(), 64, cuda::Act::relu, on); };
  const cuda::ChainedLaunches on(true);
  EXPECT_FALSE(cuda::chains_launches(s)) << "not capturing";
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_FALSE(cuda::chains_launches(s)) << "first node";
  ASSERT_EQ(cudaMemsetAsync(x.data(), 0, 64 * sizeof(float), s), cudaSuccess);
  EXPECT_FALSE(cuda::chains_launches(s)) << "after a fill";
  kernel_on(s);
  EXPECT_EQ(cuda::chains_launches(s), hopper) << "after a kernel";
  {
    const cuda::ChainedLaunches off(false);
    EXPECT_FALSE(cuda::chains_launches(s)) << "chaining off";
  }
  EXPECT_EQ(cuda::chains_launches(s), hopper) << "chaining on again";
  forked.record(s);
  forked.make_wait(other.get());
  kernel_on(other.get());
  EXPECT_EQ(cuda::chains_launches(other.get()), hopper) << "after a kernel on the stream forked from";
  joined.record(other.get());
  kernel_on(s);
  joined.make_wait(s);
  EXPECT_FALSE(cuda::chains_launches(s)) << "where two streams join";
  kernel_on(s);  // the join's node
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphDestroy(graph), cudaSuccess);
}

// A run stops at its first step that is not finite: the steps after it in the same run
// update nothing, and the fault is that step's. Token 5's embedding row in model 0 is
// near float's largest value, so a batch that holds token 5 overflows in the layer norm
// and gives NaNs (the parameters finite, the fault names a gradient), while the others
// train normally.
TEST_F(Gpu, QueuedRunStopsAtItsFirstNonFiniteStep) {
  const RunConfig c = tiny_run();
  TrainState init;
  auto [queued, single] = twin_backends(c, &init);
  const ParamLayout layout(c.model, c.models);
  float* token5 = init.params.data() + layout.offset(layout.at("wte"), 0) + 5 * c.model.d_model;
  std::fill(token5, token5 + c.model.d_model, 3e38f);
  queued->set_state(init);
  single->set_state(init);
  const int n = 5, bad = 2;
  const size_t per_step = size_t(c.models) * c.batch * c.model.seq_len;
  std::vector<int32_t> inputs = random_tokens(per_step * n, 58, 84), targets = random_tokens(per_step * n, 64, 85);
  for (int32_t& t : inputs) t += 6;  // no token 5 ...
  inputs[bad * per_step + 3] = 5;    // ... but in one sequence of the bad step
  const std::vector<double> lr(n, 1e-3);
  const std::vector<StepStats> done = queued->steps(inputs.data(), targets.data(), lr.data(), n);
  ASSERT_EQ(done.size(), size_t(bad + 1));
  EXPECT_TRUE(done[0].finite && done[1].finite);
  EXPECT_FALSE(done[bad].finite);
  EXPECT_NE(done[bad].fault.find("the loss of model 0"), std::string::npos) << done[bad].fault;
  EXPECT_NE(done[bad].fault.find("the gradient of its"), std::string::npos) << done[bad].fault;
  for (int k = 0; k < bad; ++k) single->step(inputs.data() + k * per_step, targets.data() + k * per_step, lr[k]);
  const TrainState a = queued->state(), b = single->state();
  EXPECT_EQ(a.step, bad);
  EXPECT_EQ(a.params, b.params);
  EXPECT_EQ(a.exp_avg, b.exp_avg);
  EXPECT_EQ(a.exp_avg_sq, b.exp_avg_sq);
  // The same steps one at a time stop at the same step, with the same description.
  const StepStats one = single->step(inputs.data() + bad * per_step, targets.data() + bad * per_step, lr[bad]);
  EXPECT_FALSE(one.finite);
  EXPECT_EQ(one.fault, done[bad].fault);
}

// The training loop hands the GPU all the steps up to the next checkpoint at once; a
// step that is not finite inside such a run stops training there, as on the CPU.
TEST_F(Gpu, TrainingStopsInsideAQueuedRunAndKeepsTheCheckpoint) {
  TempDir dir;
  TrainOptions o;
  o.config = small_run(2);
  o.device = Device::cuda;
  o.out_dir = dir.path();
  testing::expect_nan_stops_resumed_training(o, "blocks.1.mlp.fc.weight");
}

TEST_F(Gpu, NonFiniteStepsUpdateNothingAndNameTheTensor) {
  RunConfig c = small_run(2);
  c.model.vocab = c.data.vocab = 64;
  auto gpu = make_backend(Device::cuda, c);
  const ParamLayout layout(c.model, 2);
  TrainState s{random_vector<float>(layout.total(), 71, 0.02), std::vector<float>(layout.total()),
               std::vector<float>(layout.total()), 3};
  s.params[layout.offset(layout.at("blocks.1.attn.qkv.weight"), 1) + 5] = NAN;
  gpu->set_state(s);
  const auto tokens = random_tokens(size_t(2) * c.batch * c.model.seq_len, 64, 72);
  const StepStats r = gpu->step(tokens.data(), tokens.data(), 1e-3);
  EXPECT_FALSE(r.finite);
  EXPECT_NE(r.fault.find("model 1"), std::string::npos) << r.fault;
  EXPECT_NE(r.fault.find("blocks.1.attn.qkv.weight"), std::string::npos) << r.fault;
  const TrainState after = gpu->state();
  EXPECT_EQ(after.step, 3);
  EXPECT_EQ(after.exp_avg, s.exp_avg);
  for (size_t i = 0; i < s.params.size(); ++i)
    if (!std::isnan(s.params[i])) {
      ASSERT_EQ(after.params[i], s.params[i]);
    }
}

}  // namespace
}  // namespace univ
