// Helpers shared by the tests: random data, finite differences, temp dirs (error norms:
// tensor_errors.hpp).
#pragma once
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <gtest/gtest.h>

#include "tensor_errors.hpp"  // relative_error
#include "univ/error.hpp"
#include "univ/train.hpp"

namespace univ::testing {

template <class F>
std::vector<F> random_vector(size_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<F> v(n);
  for (auto& x : v) x = static_cast<F>(normal(rng));
  return v;
}

inline std::vector<int32_t> random_tokens(size_t n, int vocab, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = pick(rng);
  return v;
}

// Central differences of f with respect to every element of x (perturbed in place).
inline std::vector<double> numeric_gradient(std::vector<double>& x, const std::function<double()>& f,
                                            double h = 1e-5) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = f();
    x[i] = saved - h;
    const double down = f();
    x[i] = saved;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

template <class F>
double dot(const std::vector<F>& a, const std::vector<F>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += double(a[i]) * double(b[i]);
  return s;
}

inline std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

// f() must throw a UserError whose message contains `fragment`.
inline void expect_user_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << fragment << "'";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// A fresh directory under the system temp dir, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "univ-test-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// A tiny pair of 2-layer models trained for 30 steps into `out`, for correlate tests.
inline TrainOptions tiny_run(const std::filesystem::path& out, int d_mlp = 24) {
  TrainOptions o;
  RunConfig& c = o.config;
  c.model.seq_len = 8;
  c.model.d_model = 16;
  c.model.heads = 2;
  c.model.d_mlp = d_mlp;
  c.model.layers = 2;
  c.data.test_samples = 300;
  c.models = 2;
  c.seeds = {1, 2};
  c.samples = 256;
  c.batch = 16;
  c.steps = 30;
  c.optim.lr = 3e-3;
  o.out_dir = out;
  return o;
}

}  // namespace univ::testing
