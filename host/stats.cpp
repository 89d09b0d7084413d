// Correlation statistics: pairwise merges and files.
#include "univ/stats.hpp"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "univ/error.hpp"
#include "univ/fileio.hpp"
#include "univ/json_number.hpp"
#include "univ/safetensors.hpp"

namespace univ {

CorrelationStats::CorrelationStats(std::vector<NeuronShape> shapes) : shapes_(std::move(shapes)) {
  const int K = models();
  for (int m = 0; m < K; ++m) {
    means_.emplace_back(shapes_[m].neurons(), 0.0);
    within_.emplace_back();
    for (int l = 0; l < shapes_[m].layers; ++l)
      within_[m].emplace_back(size_t(shapes_[m].width) * shapes_[m].width, 0.0);
  }
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j) cross_.emplace_back(size_t(shapes_[i].neurons() * shapes_[j].neurons()), 0.0);
}

int CorrelationStats::pair_index(int i, int j) const {
  // Pairs (i < j) in row order: (0,1), (0,2), ..., (0,K-1), (1,2), ...
  const int K = models();
  return i * K - i * (i + 1) / 2 + (j - i - 1);
}

std::vector<double> CorrelationStats::cross_rows(int i, int j) const {
  if (i < j) return cross(i, j);
  const std::vector<double>& stored = cross(j, i);
  const int64_t rows = shapes_[i].neurons(), cols = shapes_[j].neurons();
  std::vector<double> out(stored.size());
  // In tiles that stay in cache: element by element, one side is read a cache line per value.
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t c = c0; c < std::min(c0 + kTile, cols); ++c)
        for (int64_t r = r0; r < std::min(r0 + kTile, rows); ++r) out[r * cols + c] = stored[c * rows + r];
  return out;
}

std::vector<double> CorrelationStats::variance_sums(int m) const {
  const int D = shapes_[m].width;
  std::vector<double> v(shapes_[m].neurons());
  for (int l = 0; l < shapes_[m].layers; ++l)
    for (int k = 0; k < D; ++k) v[size_t(l) * D + k] = within_[m][l][size_t(k) * D + k];
  return v;
}

void CorrelationStats::merge_block(std::vector<double>& master, const std::vector<double>& other,
                                   const double* delta_a, const double* delta_b, int64_t rows, int64_t cols,
                                   double factor) const {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    double* out = master.data() + r * cols;
    const double* in = other.data() + r * cols;
    const double da = delta_a[r] * factor;
    for (int64_t c = 0; c < cols; ++c) out[c] += in[c] + da * delta_b[c];
  }
}

void CorrelationStats::merge(const CorrelationStats& other) {
  if (other.shapes_ != shapes_) throw UserError("cannot merge statistics of different models or neuron counts");
  if (other.count_ == 0) return;
  if (count_ == 0) {
    *this = other;
    return;
  }
  // Chan et al.: C = C_a + C_b + delta delta^T * n_a n_b / n, with delta = mean_b - mean_a.
  const double na = static_cast<double>(count_), nb = static_cast<double>(other.count_), n = na + nb;
  const double factor = na * nb / n;
  std::vector<std::vector<double>> delta(models());
  for (int m = 0; m < models(); ++m) {
    delta[m].resize(means_[m].size());
    for (size_t k = 0; k < delta[m].size(); ++k) delta[m][k] = other.means_[m][k] - means_[m][k];
  }
  for (int i = 0; i < models(); ++i)
    for (int j = i + 1; j < models(); ++j)
      merge_block(cross_[pair_index(i, j)], other.cross_[pair_index(i, j)], delta[i].data(), delta[j].data(),
                  shapes_[i].neurons(), shapes_[j].neurons(), factor);
  for (int m = 0; m < models(); ++m) {
    const int D = shapes_[m].width;
    for (int l = 0; l < shapes_[m].layers; ++l)
      merge_block(within_[m][l], other.within_[m][l], delta[m].data() + size_t(l) * D,
                  delta[m].data() + size_t(l) * D, D, D, factor);
  }
  for (int m = 0; m < models(); ++m)
    for (size_t k = 0; k < means_[m].size(); ++k) means_[m][k] += delta[m][k] * (nb / n);
  count_ += other.count_;
}

namespace {

constexpr const char* kStatsFormat = "univ.stats.v1";

std::string_view double_bytes(const std::vector<double>& v) {
  return {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(double)};
}

// A float64 tensor whose dtype and shape were checked.
void read_f64(const SafetensorsFile& f, const std::string& name, std::vector<double>& out) {
  const std::string_view d = f.data(name);
  out.resize(d.size() / sizeof(double));
  if (!d.empty()) std::memcpy(out.data(), d.data(), d.size());
}

}  // namespace

void CorrelationStats::save(const std::filesystem::path& file, const std::map<std::string, std::string>& metadata) const {
  write_file_atomic(file, bytes(metadata));
}

std::string CorrelationStats::bytes(const std::map<std::string, std::string>& metadata) const {
  std::vector<TensorBytes> tensors;
  const std::vector<int64_t> count{count_};
  tensors.push_back({"count", "I64", {1}, {reinterpret_cast<const char*>(count.data()), sizeof(int64_t)}});
  for (int m = 0; m < models(); ++m) {
    tensors.push_back({"mean." + std::to_string(m), "F64", {shapes_[m].neurons()}, double_bytes(means_[m])});
    for (int l = 0; l < shapes_[m].layers; ++l)
      tensors.push_back({"within." + std::to_string(m) + "." + std::to_string(l), "F64",
                         {shapes_[m].width, shapes_[m].width}, double_bytes(within_[m][l])});
  }
  for (int i = 0; i < models(); ++i)
    for (int j = i + 1; j < models(); ++j)
      tensors.push_back({"cross." + std::to_string(i) + "." + std::to_string(j), "F64",
                         {shapes_[i].neurons(), shapes_[j].neurons()}, double_bytes(cross_[pair_index(i, j)])});
  auto meta = metadata;
  meta["format"] = kStatsFormat;
  nlohmann::json shapes = nlohmann::json::array();
  for (const auto& s : shapes_) shapes.push_back({{"layers", s.layers}, {"width", s.width}});
  meta["univ.shapes"] = shapes.dump();
  return safetensors_bytes(tensors, meta);
}

CorrelationStats CorrelationStats::load(const std::filesystem::path& file, std::map<std::string, std::string>* metadata) {
  return parse(read_file(file), file.string(), metadata);
}

CorrelationStats CorrelationStats::parse(std::string bytes, const std::string& what,
                                         std::map<std::string, std::string>* metadata) {
  const SafetensorsFile f(std::move(bytes), what, /*require_checksum=*/true);
  if (f.meta("format") != kStatsFormat) throw UserError(what + " is not a univ statistics file");
  std::vector<NeuronShape> shapes;
  try {
    for (const auto& s : nlohmann::json::parse(f.meta("univ.shapes")))
      shapes.push_back({json_number<int>(s, "layers"), json_number<int>(s, "width")});
  } catch (const std::exception&) {  // not JSON, or values of the wrong kind or range
    throw UserError(what + ": metadata univ.shapes is malformed");
  }
  // Every tensor the shapes call for must be in the file with that shape before
  // anything is allocated: a corrupt header cannot ask for more memory than the file holds.
  auto expect = [&](const std::string& name, const std::vector<int64_t>& shape) {
    auto it = f.entries().find(name);
    if (it == f.entries().end() || it->second.dtype != "F64" || it->second.shape != shape)
      throw UserError(what + " lacks tensor " + name + " (float64, of the recorded shape)");
  };
  for (size_t m = 0; m < shapes.size(); ++m) {
    if (shapes[m].layers < 0 || shapes[m].width < 0) throw UserError(what + ": metadata univ.shapes is malformed");
    expect("mean." + std::to_string(m), {shapes[m].neurons()});
    for (int l = 0; l < shapes[m].layers; ++l)
      expect("within." + std::to_string(m) + "." + std::to_string(l), {shapes[m].width, shapes[m].width});
    for (size_t j = m + 1; j < shapes.size(); ++j)
      expect("cross." + std::to_string(m) + "." + std::to_string(j), {shapes[m].neurons(), shapes[j].neurons()});
  }
  CorrelationStats st(shapes);
  auto it = f.entries().find("count");
  if (it == f.entries().end() || it->second.dtype != "I64" || it->second.shape != std::vector<int64_t>{1})
    throw UserError(what + " lacks its token count");
  std::memcpy(&st.count_, f.data("count").data(), sizeof(int64_t));
  for (int m = 0; m < st.models(); ++m) {
    read_f64(f, "mean." + std::to_string(m), st.means_[m]);
    for (int l = 0; l < shapes[m].layers; ++l)
      read_f64(f, "within." + std::to_string(m) + "." + std::to_string(l), st.within_[m][l]);
  }
  for (int i = 0; i < st.models(); ++i)
    for (int j = i + 1; j < st.models(); ++j)
      read_f64(f, "cross." + std::to_string(i) + "." + std::to_string(j), st.cross_[st.pair_index(i, j)]);
  if (metadata) *metadata = f.metadata();
  return st;
}

}  // namespace univ
