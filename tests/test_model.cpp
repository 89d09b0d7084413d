// The whole CPU model: gradients of every parameter against float64 finite
// differences, models side by side independent of each other, float against double.
#include <gtest/gtest.h>

#include "test_util.hpp"
#include "univ/cpu/model.hpp"
#include "univ/init.hpp"

namespace univ::cpu {
namespace {

using testing::numeric_gradient;
using testing::random_tokens;
using testing::random_vector;
using testing::relative_error;

ModelConfig tiny_config(Activation act, PosEncoding pos) {
  ModelConfig c;
  c.vocab = 11;
  c.seq_len = 5;
  c.d_model = 8;
  c.heads = 2;
  c.d_mlp = 12;
  c.layers = 2;
  c.activation = act;
  c.pos = pos;
  return c;
}

// GPT-2 init plus noise on everything, so that no parameter (LN weights, biases) sits at a special value.
template <class F>
void randomize(Model<F>& model, uint32_t seed) {
  std::vector<uint64_t> seeds;
  for (int m = 0; m < model.models(); ++m) seeds.push_back(seed + m);
  init_parameters(model.layout(), model.config(), seeds, model.params().data());
  const auto noise = random_vector<double>(model.params().size(), seed, 0.1);
  for (size_t i = 0; i < noise.size(); ++i) model.params()[i] += static_cast<F>(noise[i]);
}

class WholeModel : public ::testing::TestWithParam<std::tuple<Activation, PosEncoding>> {};

TEST_P(WholeModel, GradientMatchesFiniteDifferences) {
  const auto [act, pos] = GetParam();
  const ModelConfig c = tiny_config(act, pos);
  const int M = 2, B = 3;
  Model<double> model(c, M, B);
  randomize(model, 100);
  const auto inputs = random_tokens(size_t(M) * B * c.seq_len, c.vocab, 1);
  const auto targets = random_tokens(inputs.size(), c.vocab, 2);
  std::vector<double> losses(M);
  auto loss = [&] {
    model.forward(inputs.data(), targets.data(), B, losses.data(), false);
    return losses[0] + losses[1];
  };
  model.forward(inputs.data(), targets.data(), B, losses.data(), true);
  model.backward();
  const std::vector<double> analytic = model.grads();
  const std::vector<double> numeric = numeric_gradient(model.params(), loss);
  EXPECT_LT(relative_error(analytic, numeric), 1e-7);
  // Every tensor on its own, so that a small tensor's error cannot hide in the total.
  for (const auto& t : model.layout().tensors()) {
    const auto first = analytic.begin() + t.offset;
    const std::vector<double> a(first, first + M * t.numel), n(numeric.begin() + t.offset,
                                                               numeric.begin() + t.offset + M * t.numel);
    EXPECT_LT(relative_error(a, n), 1e-6) << t.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, WholeModel,
                         ::testing::Combine(::testing::Values(Activation::relu, Activation::gelu),
                                            ::testing::Values(PosEncoding::learned, PosEncoding::sinusoidal)));

TEST(Model, ModelsSideBySideEqualModelsAlone) {
  const ModelConfig c = tiny_config(Activation::gelu, PosEncoding::learned);
  const int M = 3, B = 2, T = c.seq_len;
  Model<double> together(c, M, B);
  randomize(together, 7);
  const auto inputs = random_tokens(size_t(M) * B * T, c.vocab, 3);
  const auto targets = random_tokens(inputs.size(), c.vocab, 4);
  std::vector<double> losses(M);
  together.forward(inputs.data(), targets.data(), B, losses.data(), true);
  together.backward();
  const ParamLayout& lt = together.layout();
  for (int m = 0; m < M; ++m) {
    Model<double> alone(c, 1, B);
    for (const auto& t : lt.tensors())
      std::copy_n(together.params().begin() + lt.offset(t, m), t.numel,
                  alone.params().begin() + alone.layout().at(t.name).offset);
    double loss = 0;
    alone.forward(inputs.data() + m * B * T, targets.data() + m * B * T, B, &loss, true);
    alone.backward();
    EXPECT_NEAR(loss, losses[m], 1e-14);
    for (const auto& t : lt.tensors())
      for (int64_t i = 0; i < t.numel; ++i)
        ASSERT_NEAR(alone.grads()[alone.layout().at(t.name).offset + i], together.grads()[lt.offset(t, m) + i], 1e-13)
            << t.name;
  }
}

TEST(Model, FloatForwardAndGradientsFollowDouble) {
  const ModelConfig c = tiny_config(Activation::relu, PosEncoding::learned);
  const int M = 2, B = 4;
  Model<double> md(c, M, B);
  randomize(md, 11);
  Model<float> mf(c, M, B);
  mf.params().assign(md.params().begin(), md.params().end());
  const auto inputs = random_tokens(size_t(M) * B * c.seq_len, c.vocab, 5);
  const auto targets = random_tokens(inputs.size(), c.vocab, 6);
  std::vector<double> ld(M);
  std::vector<float> lf(M);
  md.forward(inputs.data(), targets.data(), B, ld.data(), true);
  md.backward();
  mf.forward(inputs.data(), targets.data(), B, lf.data(), true);
  mf.backward();
  EXPECT_LT(relative_error(lf, ld), 1e-6);
  EXPECT_LT(relative_error(mf.grads(), md.grads()), 1e-4);
}

TEST(Model, SmallerBatchesReuseTheBuffers) {
  const ModelConfig c = tiny_config(Activation::relu, PosEncoding::sinusoidal);
  Model<double> big(c, 2, 4), small(c, 2, 1);
  randomize(big, 3);
  small.params() = big.params();
  const auto inputs = random_tokens(size_t(2) * c.seq_len, c.vocab, 9);
  const auto targets = random_tokens(inputs.size(), c.vocab, 10);
  double lb[2], ls[2];
  big.forward(inputs.data(), targets.data(), 1, lb, false);
  small.forward(inputs.data(), targets.data(), 1, ls, false);
  EXPECT_EQ(lb[0], ls[0]);
  EXPECT_EQ(lb[1], ls[1]);
  EXPECT_THROW(small.forward(inputs.data(), targets.data(), 2, ls, false), std::invalid_argument);
}

}  // namespace
}  // namespace univ::cpu
