// Every CPU op: forward against a plain float64 reference, backward against float64
// central finite differences, and the float instantiation against the double one.
// Inputs are random; accumulating outputs start from random values, not zeros.
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.hpp"
#include "univ/cpu/ops.hpp"

namespace univ::cpu {
namespace {

using testing::dot;
using testing::numeric_gradient;
using testing::random_tokens;
using testing::random_vector;
using testing::relative_error;

constexpr double kGradTol = 1e-7;   // float64 central differences, h = 1e-5
constexpr double kFloatTol = 2e-6;  // float32 against float64

template <class To>
std::vector<To> cast(const std::vector<double>& v) {
  return std::vector<To>(v.begin(), v.end());
}

// Gradient of sum(out * weight) that an accumulating backward added to `after`, which started as `before`.
std::vector<double> added(const std::vector<double>& after, const std::vector<double>& before) {
  std::vector<double> d(after.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = after[i] - before[i];
  return d;
}

struct EmbeddingShape {
  int M, B, T, C, V;
};

class EmbeddingOp : public ::testing::TestWithParam<EmbeddingShape> {};

TEST_P(EmbeddingOp, ForwardAndBackward) {
  const auto [M, B, T, C, V] = GetParam();
  const auto tokens = random_tokens(size_t(M) * B * T, V, 1);
  auto wte = random_vector<double>(size_t(M) * V * C, 2);
  auto wpe = random_vector<double>(size_t(M) * T * C, 3);
  const auto weight = random_vector<double>(size_t(M) * B * T * C, 4);
  std::vector<double> out(weight.size(), NAN);
  auto loss = [&] {
    embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), int64_t(T) * C, M, B, T, C, V);
    return dot(out, weight);
  };
  loss();
  for (int m = 0; m < M; ++m)
    for (int i = 0; i < B * T; ++i)
      for (int c = 0; c < C; ++c) {
        const int64_t row = int64_t(m) * B * T + i;
        EXPECT_EQ(out[row * C + c], wte[(int64_t(m) * V + tokens[row]) * C + c] + wpe[(int64_t(m) * T + i % T) * C + c]);
      }
  const auto dwte0 = random_vector<double>(wte.size(), 5), dwpe0 = random_vector<double>(wpe.size(), 6);
  auto dwte = dwte0, dwpe = dwpe0;
  embedding_backward(dwte.data(), dwpe.data(), weight.data(), tokens.data(), M, B, T, C, V);
  EXPECT_LT(relative_error(added(dwte, dwte0), numeric_gradient(wte, loss)), kGradTol);
  EXPECT_LT(relative_error(added(dwpe, dwpe0), numeric_gradient(wpe, loss)), kGradTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmbeddingOp,
                         ::testing::Values(EmbeddingShape{2, 3, 5, 7, 11}, EmbeddingShape{1, 1, 1, 4, 3},
                                           EmbeddingShape{3, 2, 4, 6, 5}));

TEST(CpuOps, SinusoidalPositionsAreSharedAcrossModels) {
  const int T = 6, C = 8, M = 2, B = 1, V = 3;
  std::vector<double> table(T * C);
  sinusoidal_positions(table.data(), T, C);
  EXPECT_DOUBLE_EQ(table[0 * C + 0], 0.0);                              // sin(0)
  EXPECT_DOUBLE_EQ(table[0 * C + 1], 1.0);                              // cos(0)
  EXPECT_NEAR(table[3 * C + 2], std::sin(3 / std::pow(10000.0, 2.0 / C)), 1e-15);
  const auto tokens = random_tokens(M * B * T, V, 7);
  const auto wte = random_vector<double>(M * V * C, 8);
  std::vector<double> out(M * B * T * C);
  embedding_forward(out.data(), tokens.data(), wte.data(), table.data(), 0, M, B, T, C, V);
  for (int m = 0; m < M; ++m)
    for (int t = 0; t < T; ++t)
      EXPECT_EQ(out[(m * T + t) * C + 5], wte[(m * V + tokens[m * T + t]) * C + 5] + table[t * C + 5]);
}

struct RowsShape {
  int M, N, C;
};

class LayerNormOp : public ::testing::TestWithParam<RowsShape> {};

TEST_P(LayerNormOp, ForwardAndBackward) {
  const auto [M, N, C] = GetParam();
  auto inp = random_vector<double>(size_t(M) * N * C, 11, 3.0);
  for (size_t i = 0; i < inp.size(); ++i) inp[i] += 5.0 * (i / C % 3);  // rows with large means
  auto w = random_vector<double>(size_t(M) * C, 12), b = random_vector<double>(size_t(M) * C, 13);
  const auto weight = random_vector<double>(inp.size(), 14);
  std::vector<double> out(inp.size(), NAN), mean(size_t(M) * N, NAN), rstd(size_t(M) * N, NAN);
  auto loss = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), M, N, C);
    return dot(out, weight);
  };
  loss();
  for (int64_t row = 0; row < int64_t(M) * N; ++row) {
    double mu = 0, var = 0;
    for (int c = 0; c < C; ++c) mu += inp[row * C + c] / C;
    for (int c = 0; c < C; ++c) var += (inp[row * C + c] - mu) * (inp[row * C + c] - mu) / C;
    const int64_t m = row / N;
    for (int c = 0; c < C; ++c)
      EXPECT_NEAR(out[row * C + c], (inp[row * C + c] - mu) / std::sqrt(var + 1e-5) * w[m * C + c] + b[m * C + c],
                  1e-12);
  }
  const auto dinp0 = random_vector<double>(inp.size(), 15), dw0 = random_vector<double>(w.size(), 16),
             db0 = random_vector<double>(b.size(), 17);
  auto dinp = dinp0, dw = dw0, db = db0;
  layernorm_backward(dinp.data(), dw.data(), db.data(), weight.data(), inp.data(), w.data(), mean.data(), rstd.data(),
                     M, N, C);
  EXPECT_LT(relative_error(added(dinp, dinp0), numeric_gradient(inp, loss)), kGradTol);
  EXPECT_LT(relative_error(added(dw, dw0), numeric_gradient(w, loss)), kGradTol);
  EXPECT_LT(relative_error(added(db, db0), numeric_gradient(b, loss)), kGradTol);

  std::vector<float> out_f(inp.size()), mean_f(mean.size()), rstd_f(rstd.size());
  layernorm_forward(out_f.data(), mean_f.data(), rstd_f.data(), cast<float>(inp).data(), cast<float>(w).data(),
                    cast<float>(b).data(), M, N, C);
  loss();
  EXPECT_LT(relative_error(out_f, out), kFloatTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, LayerNormOp,
                         ::testing::Values(RowsShape{2, 7, 13}, RowsShape{1, 1, 4}, RowsShape{3, 5, 33}));

struct MatmulShape {
  int M, N, C, OC;
  bool bias;
};

class MatmulOp : public ::testing::TestWithParam<MatmulShape> {};

TEST_P(MatmulOp, ForwardAndBackward) {
  const auto [M, N, C, OC, has_bias] = GetParam();
  auto inp = random_vector<double>(size_t(M) * N * C, 21);
  auto w = random_vector<double>(size_t(M) * OC * C, 22), b = random_vector<double>(size_t(M) * OC, 23);
  const auto weight = random_vector<double>(size_t(M) * N * OC, 24);
  std::vector<double> out(weight.size(), NAN);
  auto loss = [&] {
    matmul_forward(out.data(), inp.data(), w.data(), has_bias ? b.data() : nullptr, M, N, C, OC);
    return dot(out, weight);
  };
  loss();
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n)
      for (int o = 0; o < OC; ++o) {
        double ref = has_bias ? b[m * OC + o] : 0.0;
        for (int c = 0; c < C; ++c) ref += inp[(int64_t(m) * N + n) * C + c] * w[(int64_t(m) * OC + o) * C + c];
        EXPECT_NEAR(out[(int64_t(m) * N + n) * OC + o], ref, 1e-12);
      }
  std::vector<double> dinp(inp.size(), NAN);  // overwritten
  const auto dw0 = random_vector<double>(w.size(), 25), db0 = random_vector<double>(b.size(), 26);
  auto dw = dw0, db = db0;
  matmul_backward(dinp.data(), dw.data(), has_bias ? db.data() : nullptr, weight.data(), inp.data(), w.data(), M, N, C,
                  OC);
  EXPECT_LT(relative_error(dinp, numeric_gradient(inp, loss)), kGradTol);
  EXPECT_LT(relative_error(added(dw, dw0), numeric_gradient(w, loss)), kGradTol);
  if (has_bias) EXPECT_LT(relative_error(added(db, db0), numeric_gradient(b, loss)), kGradTol);
  else EXPECT_EQ(db, db0);

  std::vector<float> out_f(out.size());
  matmul_forward(out_f.data(), cast<float>(inp).data(), cast<float>(w).data(),
                 has_bias ? cast<float>(b).data() : nullptr, M, N, C, OC);
  loss();
  EXPECT_LT(relative_error(out_f, out), kFloatTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MatmulOp,
                         ::testing::Values(MatmulShape{2, 5, 7, 3, true}, MatmulShape{1, 1, 1, 1, true},
                                           MatmulShape{3, 9, 4, 11, false}, MatmulShape{2, 33, 17, 65, true}));

struct AttentionShape {
  int M, B, T, C, H;
};

class AttentionOp : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(AttentionOp, ForwardAndBackward) {
  const auto [M, B, T, C, H] = GetParam();
  const int hd = C / H;
  auto qkv = random_vector<double>(size_t(M) * B * T * 3 * C, 31);
  const auto weight = random_vector<double>(size_t(M) * B * T * C, 32);
  std::vector<double> out(weight.size(), NAN), att(size_t(M) * B * H * T * T, NAN);
  auto loss = [&] {
    attention_forward(out.data(), att.data(), qkv.data(), M, B, T, C, H);
    return dot(out, weight);
  };
  loss();
  // Reference: softmax(q k^T / sqrt(hd) masked to t2 <= t) v, head by head.
  for (int s = 0; s < M * B; ++s)
    for (int h = 0; h < H; ++h)
      for (int t = 0; t < T; ++t) {
        std::vector<double> p(T, 0.0);
        double mx = -1e300, z = 0;
        for (int t2 = 0; t2 <= t; ++t2) {
          for (int i = 0; i < hd; ++i)
            p[t2] += qkv[(int64_t(s) * T + t) * 3 * C + h * hd + i] * qkv[(int64_t(s) * T + t2) * 3 * C + C + h * hd + i];
          p[t2] /= std::sqrt(double(hd));
          mx = std::max(mx, p[t2]);
        }
        for (int t2 = 0; t2 <= t; ++t2) z += p[t2] = std::exp(p[t2] - mx);
        for (int t2 = 0; t2 < T; ++t2)
          EXPECT_NEAR(att[((int64_t(s) * H + h) * T + t) * T + t2], t2 <= t ? p[t2] / z : 0.0, 1e-12);
        for (int i = 0; i < hd; ++i) {
          double ref = 0;
          for (int t2 = 0; t2 <= t; ++t2) ref += p[t2] / z * qkv[(int64_t(s) * T + t2) * 3 * C + 2 * C + h * hd + i];
          EXPECT_NEAR(out[(int64_t(s) * T + t) * C + h * hd + i], ref, 1e-12);
        }
      }
  std::vector<double> dqkv(qkv.size(), NAN);
  attention_backward(dqkv.data(), weight.data(), qkv.data(), att.data(), M, B, T, C, H);
  EXPECT_LT(relative_error(dqkv, numeric_gradient(qkv, loss)), kGradTol);

  std::vector<float> out_f(out.size()), att_f(att.size());
  attention_forward(out_f.data(), att_f.data(), cast<float>(qkv).data(), M, B, T, C, H);
  loss();
  EXPECT_LT(relative_error(out_f, out), kFloatTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionOp,
                         ::testing::Values(AttentionShape{2, 2, 5, 8, 2}, AttentionShape{1, 1, 1, 4, 1},
                                           AttentionShape{3, 1, 7, 6, 3}, AttentionShape{1, 2, 9, 12, 1}));

class ActivationOp : public ::testing::TestWithParam<Activation> {};

TEST_P(ActivationOp, ForwardAndBackward) {
  const Activation act = GetParam();
  auto inp = random_vector<double>(257, 41, 2.0);
  const auto weight = random_vector<double>(inp.size(), 42);
  std::vector<double> out(inp.size(), NAN);
  auto loss = [&] {
    activation_forward(out.data(), inp.data(), int64_t(inp.size()), act);
    return dot(out, weight);
  };
  loss();
  for (size_t i = 0; i < inp.size(); ++i) {
    const double x = inp[i];
    const double ref = act == Activation::relu ? std::max(x, 0.0) : 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    EXPECT_NEAR(out[i], ref, 1e-15);
  }
  std::vector<double> dinp(inp.size(), NAN);
  activation_backward(dinp.data(), weight.data(), inp.data(), int64_t(inp.size()), act);
  EXPECT_LT(relative_error(dinp, numeric_gradient(inp, loss)), kGradTol);

  std::vector<float> out_f(inp.size());
  activation_forward(out_f.data(), cast<float>(inp).data(), int64_t(inp.size()), act);
  EXPECT_LT(relative_error(out_f, out), kFloatTol);
}

INSTANTIATE_TEST_SUITE_P(Kinds, ActivationOp, ::testing::Values(Activation::relu, Activation::gelu));

TEST(CpuOps, ResidualAdds) {
  const auto a = random_vector<double>(100, 51), b = random_vector<double>(100, 52);
  std::vector<double> out(100, NAN);
  residual_forward(out.data(), a.data(), b.data(), 100);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(out[i], a[i] + b[i]);
}

struct CrossEntropyShape {
  int M, N, V;
};

class CrossEntropyOp : public ::testing::TestWithParam<CrossEntropyShape> {};

TEST_P(CrossEntropyOp, ForwardAndBackward) {
  const auto [M, N, V] = GetParam();
  auto logits = random_vector<double>(size_t(M) * N * V, 61, 3.0);
  const auto targets = random_tokens(size_t(M) * N, V, 62);
  const auto weight = random_vector<double>(M, 63);
  std::vector<double> losses(M, NAN);
  auto loss = [&] {
    crossentropy_forward_backward(losses.data(), static_cast<double*>(nullptr), logits.data(), targets.data(), M, N,
                                  V);
    return dot(losses, weight);
  };
  loss();
  for (int m = 0; m < M; ++m) {
    double ref = 0;
    for (int n = 0; n < N; ++n) {
      const double* x = logits.data() + (int64_t(m) * N + n) * V;
      double z = 0;
      for (int v = 0; v < V; ++v) z += std::exp(x[v]);
      ref -= (x[targets[int64_t(m) * N + n]] - std::log(z)) / N;
    }
    EXPECT_NEAR(losses[m], ref, 1e-12);
  }
  // The fused backward gives d(mean loss)/d logits; weight it per model to compare with sum(weight * loss).
  std::vector<double> dlogits(logits.size(), NAN);
  crossentropy_forward_backward(losses.data(), dlogits.data(), logits.data(), targets.data(), M, N, V);
  for (int m = 0; m < M; ++m)
    for (int64_t i = 0; i < int64_t(N) * V; ++i) dlogits[int64_t(m) * N * V + i] *= weight[m];
  EXPECT_LT(relative_error(dlogits, numeric_gradient(logits, loss)), kGradTol);

  std::vector<float> losses_f(M);
  crossentropy_forward_backward(losses_f.data(), static_cast<float*>(nullptr), cast<float>(logits).data(),
                                targets.data(), M, N, V);
  loss();
  EXPECT_LT(relative_error(losses_f, losses), kFloatTol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyOp,
                         ::testing::Values(CrossEntropyShape{2, 6, 11}, CrossEntropyShape{1, 1, 2},
                                           CrossEntropyShape{3, 5, 257}));

TEST(CpuOps, AdamWMatchesPyTorchFormula) {
  const int n = 1000;
  auto p = random_vector<double>(n, 71), m = random_vector<double>(n, 72, 0.1);
  auto v = random_vector<double>(n, 73, 0.01);
  for (auto& x : v) x = x * x;
  const auto g = random_vector<double>(n, 74);
  const AdamWStep h{3e-3, 0.9, 0.95, 1e-8, 0.1, 7};
  const double scale = 0.5;
  auto p_ref = p, m_ref = m, v_ref = v;
  for (int i = 0; i < n; ++i) {  // torch.optim.AdamW, single tensor, step 7
    const double gi = g[i] * scale;
    p_ref[i] *= 1 - h.lr * h.weight_decay;
    m_ref[i] = h.beta1 * m_ref[i] + (1 - h.beta1) * gi;
    v_ref[i] = h.beta2 * v_ref[i] + (1 - h.beta2) * gi * gi;
    const double bc1 = 1 - std::pow(h.beta1, 7), bc2 = 1 - std::pow(h.beta2, 7);
    p_ref[i] -= h.lr / bc1 * m_ref[i] / (std::sqrt(v_ref[i]) / std::sqrt(bc2) + h.eps);
  }
  adamw_update(p.data(), g.data(), m.data(), v.data(), n, scale, h);
  EXPECT_LT(relative_error(p, p_ref), 1e-15);
  EXPECT_LT(relative_error(m, m_ref), 1e-15);
  EXPECT_LT(relative_error(v, v_ref), 1e-15);
}

TEST(CpuOps, SumSquaresIsExactlyRepeatable) {
  const auto x = random_vector<float>(100003, 81);
  double ref = 0;
  for (float f : x) ref += double(f) * double(f);
  const double s = sum_squares(x.data(), int64_t(x.size()));
  EXPECT_NEAR(s, ref, 1e-9 * ref);
  EXPECT_EQ(s, sum_squares(x.data(), int64_t(x.size())));
}

}  // namespace
}  // namespace univ::cpu
