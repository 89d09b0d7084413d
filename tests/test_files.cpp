// File formats: safetensors round trip and corruption, .npy headers, checkpoint
// directories (round trip, consistency checks, crash recovery).
#include <gtest/gtest.h>

#include <cstring>

#include "test_util.hpp"
#include "univ/checkpoint.hpp"
#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/npy.hpp"
#include "univ/safetensors.hpp"

namespace univ {
namespace {

using testing::random_vector;
using testing::TempDir;
namespace fs = std::filesystem;

std::string_view bytes_of(const std::vector<float>& v) {
  return {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)};
}

TEST(Safetensors, RoundTrip) {
  const auto a = random_vector<float>(12, 1), b = random_vector<float>(5, 2);
  const std::string file =
      safetensors_bytes({{"a", "F32", {3, 4}, bytes_of(a)}, {"b", "F32", {5}, bytes_of(b)}}, {{"note", "hello"}});
  EXPECT_EQ(file.size() % 8, (8 + 0u + 17 * 4) % 8);  // the data starts 8-byte aligned
  const SafetensorsFile f(file, "mem");
  EXPECT_EQ(f.meta("note"), "hello");
  EXPECT_TRUE(f.has_checksum());
  std::vector<float> a2(12), b2(5);
  f.read_f32("a", {3, 4}, a2.data());
  f.read_f32("b", {5}, b2.data());
  EXPECT_EQ(a, a2);
  EXPECT_EQ(b, b2);
  EXPECT_THROW(f.read_f32("a", {4, 3}, a2.data()), UserError);
  EXPECT_THROW(f.read_f32("c", {1}, a2.data()), UserError);
}

TEST(Safetensors, EveryFlippedByteOrTruncationIsCaught) {
  const auto a = random_vector<float>(6, 3);
  const std::string file = safetensors_bytes({{"weights", "F32", {2, 3}, bytes_of(a)}}, {{"univ.step", "12"}});
  for (size_t i = 0; i < file.size(); ++i) {
    std::string bad = file;
    bad[i] ^= 0x04;
    EXPECT_THROW(SafetensorsFile(bad, "mem", true), UserError) << "byte " << i;
  }
  for (size_t n : {size_t(0), size_t(7), size_t(9), file.size() - 1})
    EXPECT_THROW(SafetensorsFile(file.substr(0, n), "mem"), UserError) << "length " << n;
  EXPECT_THROW(SafetensorsFile(file + "x", "mem"), UserError);
}

TEST(Safetensors, ReadsFilesWithoutOurChecksum) {
  // As written by other tools: no checksum, header padded with spaces.
  const std::string json = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string header = json + std::string((8 - json.size() % 8) % 8, ' ');
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  const float x[2] = {1.5f, -2.0f};
  file += header + std::string(reinterpret_cast<const char*>(x), 8);
  const SafetensorsFile f(file, "mem");
  EXPECT_FALSE(f.has_checksum());
  float y[2];
  f.read_f32("x", {2}, y);
  EXPECT_EQ(y[0], 1.5f);
  EXPECT_EQ(y[1], -2.0f);
}

TEST(Safetensors, NumbersOfTheWrongKindOrRangeAreRefused) {
  for (const std::string shape : {"[2e29]", "[1.5]", "[-1]", "[18446744073709551615]", "[\"2\"]"}) {
    const std::string json = R"({"x":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,8]}})";
    std::string file(8, '\0');
    for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
    file += json + std::string(8, '\0');
    EXPECT_THROW(SafetensorsFile(file, "mem"), UserError) << shape;
  }
}

TEST(Npy, HeadersOfAllVersionsAndBadOnes) {
  const std::string v1 = npy_bytes("<i4", {2, 3}, std::string(24, '\1'));
  EXPECT_EQ(v1.substr(0, 6), "\x93NUMPY");
  EXPECT_EQ((v1.size() - 24) % 64, 0u);
  const NpyHeader h = parse_npy_header(v1, "x");
  EXPECT_EQ(h.descr, "<i4");
  EXPECT_EQ(h.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_FALSE(h.fortran_order);
  // Version 2 has a 4-byte header length.
  const std::string dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }";
  std::string v2 = std::string("\x93NUMPY\x02\x00", 8);
  const uint32_t len = static_cast<uint32_t>(dict.size() + 1);
  v2.append(reinterpret_cast<const char*>(&len), 4);
  v2 += dict + "\n" + std::string(8, '\0');
  EXPECT_EQ(parse_npy_header(v2, "x").shape, (std::vector<int64_t>{1}));
  EXPECT_THROW(parse_npy_header("not npy at all", "x"), UserError);
  std::string fortran = v1;
  const size_t at = fortran.find("False");
  fortran.replace(at, 5, "True ");
  EXPECT_TRUE(parse_npy_header(fortran, "x").fortran_order);
  EXPECT_THROW(npy_integers(fortran, "x"), UserError);
  EXPECT_THROW(parse_npy_header(v1.substr(0, v1.size() - 1), "x"), UserError);
}

RunConfig checkpoint_run() {
  RunConfig c;
  c.model.vocab = 13;
  c.model.seq_len = 4;
  c.model.d_model = 8;
  c.model.heads = 2;
  c.model.d_mlp = 16;
  c.model.layers = 1;
  c.models = 2;
  c.seeds = {5, 9};
  c.samples = 64;
  c.batch = 8;
  return c;
}

TrainState random_state(const RunConfig& c, int64_t step, uint32_t seed) {
  const ParamLayout layout(c.model, c.models);
  return {random_vector<float>(layout.total(), seed), random_vector<float>(layout.total(), seed + 1),
          random_vector<float>(layout.total(), seed + 2), step};
}

TEST(Checkpoint, RoundTripAndPerModelFiles) {
  TempDir dir;
  const RunConfig c = checkpoint_run();
  const TrainState s = random_state(c, 17, 1);
  save_checkpoint(dir.path(), c, {{"source", "synthetic:markov"}}, s);
  EXPECT_FALSE(fs::exists(dir / "checkpoint.commit"));
  const LoadedCheckpoint back = load_checkpoint(dir.path());
  EXPECT_EQ(back.config, c);
  EXPECT_EQ(back.state.step, 17);
  // Padding between tensors is not stored: compare tensor by tensor.
  const ParamLayout layout(c.model, c.models);
  for (const auto& t : layout.tensors())
    for (int64_t i = 0; i < c.models * t.numel; ++i) {
      ASSERT_EQ(back.state.params[t.offset + i], s.params[t.offset + i]);
      ASSERT_EQ(back.state.exp_avg[t.offset + i], s.exp_avg[t.offset + i]);
      ASSERT_EQ(back.state.exp_avg_sq[t.offset + i], s.exp_avg_sq[t.offset + i]);
    }
  const ModelCheckpoint one = load_model(model_file(dir.path(), 1));
  EXPECT_EQ(one.model_index, 1);
  EXPECT_EQ(one.seed, 9u);
  EXPECT_EQ(one.step, 17);
  const ParamLayout single(c.model, 1);
  for (const auto& t : layout.tensors())
    for (int64_t i = 0; i < t.numel; ++i)
      ASSERT_EQ(one.params[single.at(t.name).offset + i], s.params[layout.offset(t, 1) + i]);
}

TEST(Checkpoint, InconsistentOrDamagedDirectoriesAreRefused) {
  TempDir a, b;
  const RunConfig c = checkpoint_run();
  save_checkpoint(a.path(), c, {}, random_state(c, 10, 1));
  save_checkpoint(b.path(), c, {}, random_state(c, 20, 4));
  EXPECT_THROW(load_checkpoint(a / "nothing-here"), UserError);
  // A model file from another step.
  fs::copy_file(model_file(b.path(), 1), model_file(a.path(), 1), fs::copy_options::overwrite_existing);
  EXPECT_THROW(load_checkpoint(a.path()), UserError);
  // A missing optimizer file.
  fs::remove(optimizer_file(b.path(), 0));
  EXPECT_THROW(load_checkpoint(b.path()), UserError);
  // Another configuration.
  TempDir d;
  RunConfig other = c;
  other.model.d_mlp = 32;
  save_checkpoint(d.path(), other, {}, random_state(other, 10, 1));
  fs::copy_file(model_file(d.path(), 1), model_file(a.path(), 1), fs::copy_options::overwrite_existing);
  EXPECT_THROW(load_checkpoint(a.path()), UserError);
  // A truncated file.
  TempDir e;
  save_checkpoint(e.path(), c, {}, random_state(c, 10, 1));
  fs::resize_file(model_file(e.path(), 0), fs::file_size(model_file(e.path(), 0)) - 3);
  EXPECT_THROW(load_checkpoint(e.path()), UserError);
}

TEST(Checkpoint, InterruptedSavesRollBackOrForward) {
  const RunConfig c = checkpoint_run();
  const TrainState old_state = random_state(c, 10, 1), new_state = random_state(c, 20, 7);
  TempDir staged, committed;
  for (const TempDir* dir : {&staged, &committed}) save_checkpoint(dir->path(), c, {}, old_state);
  // Crash before the commit marker: new files exist only as .tmp; the old checkpoint must win.
  {
    TempDir scratch;
    save_checkpoint(scratch.path(), c, {}, new_state);
    for (int m = 0; m < c.models; ++m) {
      fs::copy_file(model_file(scratch.path(), m), fs::path(model_file(staged.path(), m)) += ".tmp");
      fs::copy_file(model_file(scratch.path(), m), fs::path(model_file(committed.path(), m)) += ".tmp");
      fs::copy_file(optimizer_file(scratch.path(), m), fs::path(optimizer_file(committed.path(), m)) += ".tmp");
    }
  }
  recover_checkpoint(staged.path());
  EXPECT_EQ(load_checkpoint(staged.path()).state.step, 10);
  EXPECT_FALSE(fs::exists(fs::path(model_file(staged.path(), 0)) += ".tmp"));
  // Crash after the marker, halfway through the renames: the new checkpoint must win.
  std::vector<std::string> files;
  for (int m = 0; m < c.models; ++m) {
    files.push_back(model_file(committed.path(), m).filename().string());
    files.push_back(optimizer_file(committed.path(), m).filename().string());
  }
  write_file_durable(committed / "checkpoint.commit", nlohmann::json{{"step", 20}, {"files", files}}.dump());
  fs::rename(fs::path(model_file(committed.path(), 0)) += ".tmp", model_file(committed.path(), 0));
  EXPECT_THROW(load_checkpoint(committed.path()), UserError);  // mixed steps before recovery
  recover_checkpoint(committed.path());
  EXPECT_EQ(load_checkpoint(committed.path()).state.step, 20);
  EXPECT_FALSE(fs::exists(committed / "checkpoint.commit"));
}

}  // namespace
}  // namespace univ
