// The CUDA training backend (host/cuda/backend.cpp and the training kernels, run on the
// host emulator) against the CPU backend, for machines without a GPU: losses, norms
// and gradients of whole steps (every tensor's in the first), the parameters after
// them, evaluation, and the forward-only network's activations, to 1e-5 (TF32 steps
// to TF32's tolerances); first the attention kernels alone against the CPU's
// attention, and the refusal of a sequence longer than they hold. The step graph
// replays in random orders its edges allow, so a missing edge between its streams
// shows as a wrong gradient.
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>

#include "emulator.hpp"
#include "report.hpp"
#include "tensor_errors.hpp"
#include "univ/backend.hpp"
#include "univ/cpu/model.hpp"
#include "univ/cpu/ops.hpp"
#include "univ/cuda/kernels.hpp"
#include "univ/data.hpp"
#include "univ/error.hpp"
#include "univ/init.hpp"
#include "univ/param_layout.hpp"
#include "univ/train.hpp"

namespace univ {
std::unique_ptr<TrainBackend> make_cuda_backend(const RunConfig& config, Precision precision, CudaFusion fusion,
                                                CudaLaunch launch);
}

namespace {

using namespace univ;
using emu::report;

using testing::relative_error;

struct Case {
  const char* name;
  int models, seq_len, d_model, heads, d_mlp, layers, batch, steps;
  Activation activation;
  PosEncoding pos;
  CudaFusion fusion;
  unsigned order_seed;  // 0: the graph in capture order
  Precision precision = Precision::fp32;
};

bool whole_steps(const Case& k) {
  std::printf("%s\n", k.name);
  emu::graph_order_seed = k.order_seed;
  RunConfig c;
  c.model = {0, k.seq_len, k.d_model, k.heads, k.d_mlp, k.layers, k.activation, k.pos};
  c.data.test_samples = 8;
  c.models = k.models;
  for (int m = 0; m < k.models; ++m) c.seeds.push_back(7 + m);
  c.samples = 64;
  c.batch = k.batch;
  c.steps = k.steps;
  c.optim.warmup = 1;
  c.optim.lr = 3e-3;
  const DataSource source = open_data(c.data);
  c.model.vocab = c.data.vocab = source.vocab();
  const DataSplits splits = make_splits(source, c);
  BatchSampler sampler(c, splits);
  auto cpu = make_backend(Device::cpu, c);
  auto gpu = make_cuda_backend(c, k.precision, k.fusion, CudaLaunch::ordered);
  const ParamLayout layout(c.model, k.models);
  TrainState init{std::vector<float>(layout.total()), std::vector<float>(layout.total()),
                  std::vector<float>(layout.total()), 0};
  init_parameters(layout, c.model, std::vector<uint64_t>(c.seeds.begin(), c.seeds.end()), init.params.data());
  cpu->set_state(init);
  gpu->set_state(init);
  const size_t n = size_t(k.models) * c.batch * c.model.seq_len;
  std::vector<int32_t> in(n), tg(n);
  // In TF32 (operands of 10 fraction bits) one step from the same parameters to 5e-3;
  // after updates Adam turns that noise into parameter differences of up to lr per
  // element, which the later steps feel: 5e-2. (GELU: ReLU's gates flip where TF32's
  // noise crosses zero, 1.6e-2 in one tensor's gradient at the seed's widths.)
  const bool tf32 = k.precision == Precision::tf32;
  const double first_tolerance = tf32 ? 5e-3 : emu::kTolerance, later_tolerance = tf32 ? 5e-2 : emu::kTolerance;
  bool ok = true;
  for (int64_t step = 0; step < k.steps; ++step) {
    sampler.fill(step, in.data(), tg.data());
    const double lr = learning_rate(c.optim, step, c.steps);
    const StepStats a = cpu->step(in.data(), tg.data(), lr), b = gpu->step(in.data(), tg.data(), lr);
    double loss = b.finite ? 0 : INFINITY, norm = loss;
    for (int m = 0; m < k.models; ++m) {
      loss = std::max(loss, std::abs(b.loss[m] - a.loss[m]) / a.loss[m]);
      norm = std::max(norm, std::abs(b.grad_norm[m] - a.grad_norm[m]) / a.grad_norm[m]);
    }
    std::printf(" step %ld\n", static_cast<long>(step));
    if (step == 0) {  // captured in the first step
      std::printf("  step graph: %zu nodes, the longest chain %d:", emu::last_graph.nodes,
                  emu::last_graph.longest_chain);
      for (const char* name : emu::last_graph.chain) std::printf(" %s", name);
      std::printf("\n");
    }
    const double tolerance = step == 0 ? first_tolerance : later_tolerance;
    ok &= report("losses", loss, tolerance);
    ok &= report("gradient norms", norm, tolerance);
    // From the same parameters, every tensor's gradient; after updates, the gradients
    // as a whole: Adam turns the rounding noise of gradients that are zero in exact
    // arithmetic (the key bias's: softmax ignores a constant per query) into parameter
    // differences of up to lr |g| / eps, which later single tensors feel.
    if (step == 0) {
      const testing::TensorError worst = testing::worst_tensor_error(layout, k.models, gpu->gradients(),
                                                                     cpu->gradients());
      std::printf("  worst tensor: %s\n", worst.tensor.c_str());
      ok &= report("gradients, worst tensor", worst.error, tolerance);
    } else
      ok &= report("gradients", relative_error(gpu->gradients(), cpu->gradients()), tolerance);
  }
  ok &= report("parameters after the steps", relative_error(gpu->state().params, cpu->state().params),
               later_tolerance);
  const auto expect = cpu->evaluate(splits.test.tokens.data(), splits.test.count());
  const auto got = gpu->evaluate(splits.test.tokens.data(), splits.test.count());
  double evaluation = 0;
  for (int m = 0; m < k.models; ++m) evaluation = std::max(evaluation, std::abs(got[m] - expect[m]) / expect[m]);
  ok &= report("evaluation losses", evaluation, later_tolerance);
  return ok;
}

bool forward_only(CudaFusion fusion) {
  std::printf("forward-only network, T 16, d 32, 4 heads, d_mlp 48, 2 layers, kernels by %s\n",
              to_string(fusion).c_str());
  RunConfig c;
  c.model = {37, 16, 32, 4, 48, 2, Activation::gelu, PosEncoding::learned};
  c.models = 1;
  c.seeds = {3};
  const int b = 3, T = c.model.seq_len, D = c.model.d_mlp, layers = c.model.layers;
  c.batch = b + 1;
  const ParamLayout layout(c.model, 1);
  std::vector<float> params(layout.total());
  init_parameters(layout, c.model, {3}, params.data());
  std::vector<int32_t> in(size_t(b) * T), tg(in.size());
  for (size_t i = 0; i < in.size(); ++i) in[i] = int32_t(i * 7 % 37), tg[i] = int32_t(i * 5 % 37);
  cpu::Model<float> model(c.model, 1, b);
  model.params() = params;
  float expect_loss = 0;
  model.forward(in.data(), tg.data(), b, &expect_loss, false);
  auto net = make_device_forward(c, params, fusion);
  const int64_t n = int64_t(b) * T - 3;  // not every token
  std::vector<float> scratch(size_t(n) * layers * D);
  net->start(in.data(), tg.data(), b, false, scratch.data(), n);
  bool refused = false;
  try {
    net->start(in.data(), tg.data(), b, false, scratch.data(), n);
  } catch (const std::logic_error&) {
    refused = true;
  }
  net->finish();
  bool ok = report("a second start before finish() refused", refused ? 0.0 : INFINITY);
  for (const bool post : {false, true}) {
    std::vector<float> got(size_t(n) * layers * D, NAN), expect(got.size());
    const double loss = net->run(in.data(), tg.data(), b, post, got.data(), n);
    for (int l = 0; l < layers; ++l) {
      const float* acts = post ? model.mlp_post(l) : model.mlp_pre(l);
      for (int64_t t = 0; t < n; ++t)
        for (int d = 0; d < D; ++d) expect[(t * layers + l) * D + d] = acts[t * D + d];
    }
    ok &= report(post ? "post activations" : "pre activations", relative_error(got, expect));
    ok &= report("loss", std::abs(loss - expect_loss) / expect_loss);
  }
  return ok;
}

std::vector<float> random_floats(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// The attention kernels alone against the CPU ops, with and without the QKV bias, at
// the sequence lengths that exercise their paths: one query, whole heads in 256-thread
// blocks (T < 64) and 1024-thread ones (66, 128), chunks cut short (200), one-row and
// four-row tiles.
bool attention_ops() {
  struct Shape {
    int M, B, T, C, H;
  };
  const Shape shapes[] = {{2, 3, 5, 8, 2}, {1, 1, 1, 4, 1}, {3, 2, 33, 48, 3}, {1, 1, 66, 30, 2}, {1, 2, 128, 64, 2},
                        {1, 1, 200, 32, 1}};
  cuda::prepare_attention_kernels();
  cuda::prepare_mlp_kernels();
  bool ok = true;
  for (const Shape& s : shapes)
    for (const bool with_bias : {false, true}) {
      std::printf("attention, %d models, B %d, T %d, C %d, %d heads, %s\n", s.M, s.B, s.T, s.C, s.H,
                  with_bias ? "QKV bias" : "no bias");
      const int64_t rows = int64_t(s.M) * s.B * s.T;
      const auto raw = random_floats(rows * 3 * s.C, 1), dout = random_floats(rows * s.C, 2);
      const auto bias = random_floats(size_t(s.M) * 3 * s.C, 3);
      std::vector<float> qkv = raw;
      if (with_bias)
        for (int64_t i = 0; i < rows * 3 * s.C; ++i) qkv[i] += bias[i / (int64_t(s.B) * s.T * 3 * s.C) * 3 * s.C + i % (3 * s.C)];
      const size_t att_size = size_t(s.M) * s.B * s.H * s.T * s.T;
      std::vector<float> out(rows * s.C), att(att_size), dqkv(qkv.size());
      std::vector<float> got_qkv = raw, got_out(out.size(), NAN), got_att(att_size, NAN), got_dqkv(qkv.size(), NAN);
      const float* b = with_bias ? bias.data() : nullptr;
      cuda::attention_forward(got_out.data(), got_att.data(), got_qkv.data(), b, s.M, s.B, s.T, s.C, s.H, nullptr);
      cuda::attention_backward(got_dqkv.data(), dout.data(), got_out.data(), got_qkv.data(), b, got_att.data(), s.M,
                               s.B, s.T, s.C, s.H, nullptr);
      cpu::attention_forward(out.data(), att.data(), qkv.data(), s.M, s.B, s.T, s.C, s.H);
      cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), s.M, s.B, s.T, s.C, s.H);
      ok &= report("qkv left as it was", got_qkv == raw ? 0.0 : INFINITY);
      ok &= report("out", relative_error(got_out, out));
      ok &= report("probabilities", relative_error(got_att, att));
      ok &= report("dqkv", relative_error(got_dqkv, dqkv));
    }
  return ok;
}

// One position past the longest sequence the attention's shared memory holds is
// refused with a clear error.
bool longest_sequence() {
  RunConfig c;
  const int longest = cuda::attention_max_seq_len(32);
  c.model = {37, longest + 1, 32, 1, 8, 1, Activation::relu, PosEncoding::learned};
  c.models = 1;
  c.seeds = {1};
  c.batch = 1;
  std::printf("a sequence of %d positions at head width 32\n", longest + 1);
  bool refused = false;
  try {
    make_cuda_backend(c, Precision::fp32, CudaFusion::sublayers, CudaLaunch::ordered);
  } catch (const UserError& e) {
    std::printf("  %s\n", e.what());
    refused = true;
  }
  return report("refused", refused ? 0.0 : INFINITY);
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const Case cases[] = {
      {"1 model, T 16, d 32, 4 heads, d_mlp 48, 2 layers, GELU, learned positions, fused blocks", 1, 16, 32, 4, 48,
       2, 3, 3, Activation::gelu, PosEncoding::learned, CudaFusion::blocks, 0},
      {"3 models, T 16, d 32, 4 heads, d_mlp 48, 2 layers, ReLU, sinusoidal positions, fused blocks", 3, 16, 32, 4,
       48, 2, 2, 2, Activation::relu, PosEncoding::sinusoidal, CudaFusion::blocks, 1},
      {"2 models, T 13, d 30, 3 heads (width 10), d_mlp 22, 2 layers, GELU, fused blocks", 2, 13, 30, 3, 22, 2, 2, 2,
       Activation::gelu, PosEncoding::learned, CudaFusion::blocks, 3},
      {"2 models, T 66, d 30, 2 heads (width 15), d_mlp 20, 1 layer (4-row attention tiles), sublayers", 2, 66, 30,
       2, 20, 1, 1, 2, Activation::gelu, PosEncoding::learned, CudaFusion::sublayers, 2},
      {"2 models, T 32, d 64, 4 heads, d_mlp 256, 2 layers (the seed's widths), ReLU, sublayers", 2, 32, 64, 4, 256,
       2, 2, 2, Activation::relu, PosEncoding::learned, CudaFusion::sublayers, 5},
      {"2 models, T 32, d 64, 4 heads, d_mlp 256, 2 layers (the seed's widths), ReLU, a launch per op", 2, 32, 64, 4,
       256, 2, 2, 2, Activation::relu, PosEncoding::learned, CudaFusion::ops, 6},
      {"1 model, T 100, d 8, 4 heads (width 2), d_mlp 8, 1 layer, fused forward, per-op backward (its block does "
       "not fit)", 1, 100, 8, 4, 8, 1, 2, 2, Activation::relu, PosEncoding::learned, CudaFusion::blocks, 4},
      {"TF32: 2 models, T 32, d 64, 4 heads, d_mlp 256, 2 layers (the seed's widths), GELU, sublayers", 2, 32, 64, 4,
       256, 2, 2, 2, Activation::gelu, PosEncoding::learned, CudaFusion::sublayers, 7, Precision::tf32},
      {"TF32: 2 models, T 32, d 64, 4 heads, d_mlp 256, 2 layers (the seed's widths), GELU, a launch per op", 2, 32,
       64, 4, 256, 2, 2, 2, Activation::gelu, PosEncoding::learned, CudaFusion::ops, 8, Precision::tf32},
      {"TF32: 1 model, T 72, d 64, 2 heads (width 32), d_mlp 96, 1 layer, GELU, sublayers", 1, 72, 64, 2, 96, 1, 2, 2,
       Activation::gelu, PosEncoding::learned, CudaFusion::sublayers, 9, Precision::tf32},
  };
  bool ok = attention_ops();
  ok &= longest_sequence();
  for (const Case& k : cases) ok &= whole_steps(k);
  for (const CudaFusion fusion : {CudaFusion::sublayers, CudaFusion::ops, CudaFusion::blocks})
    ok &= forward_only(fusion);
  std::printf("%s\n", ok ? "the emulated CUDA backend follows the CPU backend" : "FAILED");
  return ok ? 0 : 1;
}
