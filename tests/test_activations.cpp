// Activation files from elsewhere: float16/bfloat16 decoding, .npy and safetensors
// matrices, layer maps, and statistics equal to those of the checkpoints' own pass.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "test_util.hpp"
#include "univ/activations.hpp"
#include "univ/analysis.hpp"
#include "univ/cpu/model.hpp"
#include "univ/error.hpp"
#include "univ/npy.hpp"
#include "univ/safetensors.hpp"
#include "univ/train.hpp"

namespace univ {
namespace {

using testing::expect_user_error;
using testing::TempDir;
namespace fs = std::filesystem;

TEST(Activations, HalfAndBfloat16Decode) {
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0xC000), -2.0f);
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(half_to_float(0x03FF), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(half_to_float(0x8000), -0.0f);
  EXPECT_TRUE(std::isinf(half_to_float(0x7C00)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7E00)));
  EXPECT_EQ(bfloat16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(bfloat16_to_float(0xC040), -3.0f);
  // Every finite half converts exactly: back to half by rounding gives the same bits.
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    const int e = f == 0 ? 0 : std::ilogb(f);
    const float step = std::ldexp(1.0f, std::max(e, -14) - 10);
    ASSERT_EQ(std::fmod(f, step), 0.0f) << h;
  }
}

uint16_t to_half(float f) {  // exact for the values used below (small integers and halves)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  if ((bits & 0x7fffffffu) == 0) return static_cast<uint16_t>(sign);
  const int exponent = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exponent << 10) | ((bits >> 13) & 0x3ff));
}

TEST(Activations, MatricesFromNpyAndSafetensorsOfEveryDtype) {
  TempDir dir;
  const int64_t rows = 5, cols = 6;
  std::vector<float> f(rows * cols);
  for (size_t i = 0; i < f.size(); ++i) f[i] = 0.5f * static_cast<float>(i) - 7.0f;
  std::vector<uint16_t> h(f.size()), b(f.size());
  for (size_t i = 0; i < f.size(); ++i) {
    h[i] = to_half(f[i]);
    uint32_t bits;
    std::memcpy(&bits, &f[i], 4);
    b[i] = static_cast<uint16_t>(bits >> 16);  // exact: these floats have 8 significant bits at most
  }
  const std::string_view fb(reinterpret_cast<const char*>(f.data()), f.size() * 4),
      hb(reinterpret_cast<const char*>(h.data()), h.size() * 2), bb(reinterpret_cast<const char*>(b.data()), b.size() * 2);
  write_file_durable(dir / "f32.npy", npy_bytes("<f4", {rows, cols}, fb));
  write_file_durable(dir / "f16.npy", npy_bytes("<f2", {rows, cols}, hb));
  write_file_durable(dir / "many.safetensors",
                     safetensors_bytes({{"x16", "F16", {rows, cols}, hb}, {"xb", "BF16", {rows, cols}, bb}}, {}));
  write_file_durable(dir / "one.safetensors", safetensors_bytes({{"acts", "F32", {rows, cols}, fb}}, {}));
  for (const std::string spec : {"f32.npy", "f16.npy", "many.safetensors:x16", "many.safetensors:xb", "one.safetensors"}) {
    const ActivationMatrix m((dir / spec).string());
    ASSERT_EQ(m.rows(), rows);
    ASSERT_EQ(m.cols(), cols);
    std::vector<float> out(2 * 3, NAN);
    m.read(2, 2, 1, 3, out.data(), 3);  // rows 2-3, columns 1-3
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < 3; ++c) EXPECT_EQ(out[r * 3 + c], f[(2 + r) * cols + 1 + c]) << spec;
  }
  EXPECT_THROW(ActivationMatrix((dir / "many.safetensors").string()), UserError);  // which tensor?
  EXPECT_THROW(ActivationMatrix((dir / "many.safetensors:nope").string()), UserError);
}

TEST(Activations, BadFilesAndLayerMaps) {
  TempDir dir;
  const std::vector<float> f(12, 1.0f);
  const std::string_view fb(reinterpret_cast<const char*>(f.data()), 48);
  write_file_durable(dir / "ok.npy", npy_bytes("<f4", {4, 3}, fb));
  write_file_durable(dir / "short.npy", npy_bytes("<f4", {3, 3}, fb.substr(0, 36)));
  write_file_durable(dir / "ints.npy", npy_bytes("<i4", {4, 3}, fb));
  write_file_durable(dir / "flat.npy", npy_bytes("<f4", {12}, fb));
  std::string truncated = npy_bytes("<f4", {4, 3}, fb);
  write_file_durable(dir / "truncated.npy", truncated.substr(0, truncated.size() - 4));
  std::string fortran = npy_bytes("<f4", {4, 3}, fb);
  fortran.replace(fortran.find("False"), 5, "True ");
  write_file_durable(dir / "fortran.npy", fortran);
  const auto p = [&](const char* name) { return (dir / name).string(); };
  expect_user_error([&] { ActivationMatrix m(p("ints.npy")); }, "must be float32, float16 or bfloat16, not <i4");
  expect_user_error([&] { ActivationMatrix m(p("flat.npy")); }, "[tokens, neurons]");
  expect_user_error([&] { ActivationMatrix m(p("truncated.npy")); }, "truncated");
  expect_user_error([&] { ActivationMatrix m(p("fortran.npy")); }, "Fortran-ordered");
  expect_user_error([&] { ActivationMatrix m(p("missing.npy")); }, "No such file");
  expect_user_error([&] { open_activation_model("a=" + p("ok.npy"), {2, 2}); }, "the layer map (--layers) 4");
  expect_user_error([&] { open_activation_model("a=" + p("ok.npy"), {1, 2}); }, "equally wide");
  expect_user_error([&] { open_activation_model(p("ok.npy"), {}); }, "NAME=FILE");
  expect_user_error([&] { open_activation_model("a=" + p("ok.npy") + "," + p("short.npy"), {}); }, "holds 3 tokens");
  expect_user_error([&] { parse_layer_sizes("2x"); }, "--layers");
  EXPECT_EQ(parse_layer_sizes("3x4"), (std::vector<int>{4, 4, 4}));
  EXPECT_EQ(parse_layer_sizes("5,5"), (std::vector<int>{5, 5}));
  const std::vector<ActivationModel> models{open_activation_model("a=" + p("ok.npy"), {}),
                                            open_activation_model("b=" + p("short.npy"), {})};
  expect_user_error([&] { stream_activation_statistics(models, {}, 2, {}); }, "b 3");
}

TEST(Activations, FilesGiveTheStatisticsOfTheModelsOwnPass) {
  TempDir dir;
  TrainOptions o;
  RunConfig& c = o.config;
  c.model.seq_len = 8;
  c.model.d_model = 16;
  c.model.heads = 2;
  c.model.d_mlp = 24;
  c.model.layers = 2;
  c.data.test_samples = 200;
  c.seeds = {1, 2};
  c.samples = 128;
  c.batch = 16;
  c.steps = 10;
  o.out_dir = dir / "run";
  train(o, {});
  const auto models = load_models({dir / "run"});
  const HeldOutTokens tokens = held_out_tokens(models[0], std::nullopt, 0, {});
  const StreamResult own = stream_statistics(models, tokens, Site::post, 200, {});  // the batch of the dump below
  // Dump each model's post activations: model 0 as one float32 file, model 1 as one file per layer.
  std::vector<std::string> args;
  for (int m = 0; m < 2; ++m) {
    cpu::Model<float> net(models[m].checkpoint.run.model, 1, 200);
    net.params() = models[m].checkpoint.params;
    std::vector<int32_t> in(1600), tg(1600);
    split_inputs_targets(tokens.sequences.tokens.data(), 200, 8, in.data(), tg.data());
    float loss;
    net.forward(in.data(), tg.data(), 200, &loss, false);
    std::vector<float> all(1600 * 48);
    for (int l = 0; l < 2; ++l)
      for (int64_t t = 0; t < 1600; ++t)
        std::copy_n(net.mlp_post(l) + t * 24, 24, all.data() + t * 48 + l * 24);
    if (m == 0) {
      write_file_durable(dir / "a.npy",
                         npy_bytes("<f4", {1600, 48}, {reinterpret_cast<const char*>(all.data()), all.size() * 4}));
      args.push_back("a=" + (dir / "a.npy").string());
    } else {
      std::string spec = "b=";
      for (int l = 0; l < 2; ++l) {
        const std::string name = "b" + std::to_string(l) + ".safetensors";
        write_file_durable(dir / name, safetensors_bytes({{"acts", "F32", {1600, 24},
                                                           {reinterpret_cast<const char*>(net.mlp_post(l)), 1600 * 96}}},
                                                         {}));
        spec += (l ? "," : "") + (dir / name).string();
      }
      args.push_back(spec);
    }
  }
  const std::vector<ActivationModel> files{open_activation_model(args[0], {24, 24}), open_activation_model(args[1], {})};
  const StreamResult read = stream_activation_statistics(files, {}, 500, {});
  EXPECT_EQ(read.stats.count(), 1600);
  EXPECT_EQ(read.bytes_read, 2.0 * 1600 * 48 * 4);
  const auto a = correlation_matrix(read.stats, 0, 1), b = correlation_matrix(own.stats, 0, 1);
  for (size_t k = 0; k < a.size(); ++k) ASSERT_NEAR(a[k], b[k], 1e-9);
}

}  // namespace
}  // namespace univ
