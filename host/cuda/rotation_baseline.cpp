// The rotation baseline on the GPU, per batch of draws: the Haar matrices of every
// layer of as many models as memory holds in one launch per width (kernels/rotation.cu:
// a QR per thread block takes milliseconds, and one launch keeps as many SMs busy as
// there are matrices; cuSOLVER's QR for wide layers), each model's serving all its
// partners; then per ordered pair and layer the rotated co-moments C Q^T (of the
// layer's own rows where matches stay within layers) and Q S as cuBLAS DGEMMs
// strided-batched over the draws, the rotated variances diag(Q S Q^T), the
// correlations and their matches. Everything stays in float64; for index and max
// matching only the matched values come back.
#include "rotation_baseline.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/philox.hpp"

namespace univ {

namespace {

// Widest layer whose QRs run one per thread block, a batch of draws at once: near 1536
// a block's QR takes about as long as cuSOLVER's blocked QRs of the default 16 draws
// one after another over the whole GPU (estimated from the float64 rates of one SM and
// of the card, and some 2 ms of launches per cuSOLVER QR; not measured); wider ones go
// to cuSOLVER.
constexpr int kBlockQrMaxWidth = 1536;

// cuSOLVER's blocked Householder QR (geqrf, orgqr) of one n x n matrix at a time, for
// layers too wide for a QR per thread block, with the sign fix around it.
class WideQr {
 public:
  WideQr(int n, double* some_matrix, cudaStream_t stream) : n_(n), tau_(n), sign_(n), info_(1) {
    UNIV_CUSOLVER_CHECK(cusolverDnCreate(&handle_));
    UNIV_CUSOLVER_CHECK(cusolverDnSetStream(handle_, stream));
    int geqrf = 0, orgqr = 0;
    UNIV_CUSOLVER_CHECK(cusolverDnDgeqrf_bufferSize(handle_, n, n, some_matrix, n, &geqrf));
    UNIV_CUSOLVER_CHECK(cusolverDnDorgqr_bufferSize(handle_, n, n, n, some_matrix, n, tau_.data(), &orgqr));
    workspace_ = cuda::DeviceBuffer<double>(static_cast<size_t>(std::max({geqrf, orgqr, 1})));
  }
  ~WideQr() { cusolverDnDestroy(handle_); }
  WideQr(const WideQr&) = delete;
  WideQr& operator=(const WideQr&) = delete;

  // q = Q diag(sign(diag R)) of the column-major g (overwritten).
  void haar_q(double* q, double* g, cudaStream_t stream) {
    const int lwork = static_cast<int>(workspace_.size());
    UNIV_CUSOLVER_CHECK(
        cusolverDnDgeqrf(handle_, n_, n_, g, n_, tau_.data(), workspace_.data(), lwork, info_.data()));
    cuda::diagonal_signs(sign_.data(), g, n_, stream);
    UNIV_CUSOLVER_CHECK(
        cusolverDnDorgqr(handle_, n_, n_, n_, g, n_, tau_.data(), workspace_.data(), lwork, info_.data()));
    cuda::columns_times_signs(q, g, sign_.data(), n_, stream);
  }
  // After the stream is synchronized: the last call's verdict.
  void check() const {
    int info = 0;
    UNIV_CUDA_CHECK(cudaMemcpy(&info, info_.data(), sizeof info, cudaMemcpyDeviceToHost));
    if (info != 0) throw std::runtime_error("cuSOLVER QR failed: info " + std::to_string(info));
  }

 private:
  int n_;
  cusolverDnHandle_t handle_{};
  cuda::DeviceBuffer<double> tau_, sign_, workspace_;
  cuda::DeviceBuffer<int> info_;
};

// The Haar matrices of every layer of `models` (model, layers), all of width `width`,
// for draws [first, first + count): q [models, layers, count, width, width] in that
// order, each column-major; work as large, scratch; ids one stream id per matrix.
void draw_rotations(double* q, double* work, uint64_t* ids, const std::vector<std::pair<int, int>>& models, int width,
                    int first, int count, uint64_t seed, cudaStream_t stream) {
  std::vector<uint64_t> host_ids;
  for (const auto& [model, layers] : models)
    for (int l = 0; l < layers; ++l)
      for (int d = first; d < first + count; ++d)
        host_ids.push_back(rng_stream(RngPurpose::rotation, static_cast<uint32_t>(model),
                                      (static_cast<uint32_t>(d) << 16) | static_cast<uint32_t>(l)));
  const int matrices = static_cast<int>(host_ids.size());
  UNIV_CUDA_CHECK(cudaMemcpyAsync(ids, host_ids.data(), host_ids.size() * sizeof(uint64_t), cudaMemcpyHostToDevice,
                                  stream));
  cuda::gaussian_matrices(work, ids, seed, width, matrices, stream);
  if (width <= kBlockQrMaxWidth && width <= cuda::batched_qr_max_width()) {
    cuda::haar_q_batched(q, work, width, matrices, stream);
    return;
  }
  WideQr qr(width, work, stream);
  const int64_t block = int64_t(width) * width;
  for (int b = 0; b < matrices; ++b) qr.haar_q(q + b * block, work + b * block, stream);
  UNIV_CUDA_CHECK(cudaStreamSynchronize(stream));
  qr.check();
}

constexpr double kBudgetBytes = 2.0 * (int64_t(1) << 30);  // device memory for a batch of draws

// Bytes per draw of a model's Haar matrices and their scratch.
double rotation_bytes(const NeuronShape& shape) { return 16.0 * shape.layers * double(shape.width) * shape.width; }

// Bytes per draw of the largest ordered pair's correlations, Q S, rotated variances
// and matches.
double pair_bytes(const std::vector<NeuronShape>& shapes, const AnalysisOptions& options) {
  const bool within_layers = options.match == MatchMode::index || options.scope == MatchScope::layer;
  double bytes = 0;
  for (size_t j = 0; j < shapes.size(); ++j) {
    const double D = shapes[j].width;
    for (size_t i = 0; i < shapes.size(); ++i) {
      const double rows = within_layers ? shapes[i].width : double(shapes[i].neurons());
      if (i != j) bytes = std::max(bytes, 8.0 * (rows * D + D * D + D + rows));
    }
  }
  return bytes;
}

// The Haar matrices of models [first_model, last_model) for draws [first, first +
// count), drawn on `stream` in one launch per run of equal widths (a QR per block
// takes milliseconds on its SM, so a launch keeps as many SMs busy as there are
// matrices): model j's [layers, count, D, D] at of(j).
class DrawnRotations {
 public:
  DrawnRotations(const std::vector<NeuronShape>& shapes, int first_model, int last_model, int first, int count,
                 uint64_t seed, cudaStream_t stream)
      : first_model_(first_model), at_(last_model - first_model + 1, 0) {
    int64_t matrices = 0;
    for (int j = first_model; j < last_model; ++j) {
      const NeuronShape& shape = shapes[j];
      at_[j - first_model + 1] = at_[j - first_model] + int64_t(shape.layers) * count * shape.width * shape.width;
      matrices += int64_t(shape.layers) * count;
    }
    q_ = cuda::DeviceBuffer<double>(size_t(at_.back()));
    work_ = cuda::DeviceBuffer<double>(q_.size());
    ids_ = cuda::DeviceBuffer<uint64_t>(static_cast<size_t>(matrices));
    int64_t first_id = 0;
    for (int a = first_model; a < last_model;) {
      std::vector<std::pair<int, int>> run;  // (model, layers) of one width
      int b = a;
      for (; b < last_model && shapes[b].width == shapes[a].width; ++b) run.emplace_back(b, shapes[b].layers);
      draw_rotations(q_.data() + at_[a - first_model], work_.data() + at_[a - first_model], ids_.data() + first_id,
                     run, shapes[a].width, first, count, seed, stream);
      for (const auto& m : run) first_id += int64_t(m.second) * count;
      a = b;
    }
  }
  const double* of(int model) const { return q_.data() + at_[model - first_model_]; }

 private:
  int first_model_;
  std::vector<int64_t> at_;  // model first_model + k's matrices from at_[k] (doubles)
  cuda::DeviceBuffer<double> q_, work_;
  cuda::DeviceBuffer<uint64_t> ids_;
};

// pair_matches' device buffers, sized for the largest ordered pair of `shapes` and
// `draws` draws at once and made once per analysis (each free waits for the device);
// the stored cross block of a pair and a model's within-layer blocks stay for the next
// pair that needs them.
struct PairWorkspace {
  PairWorkspace(const std::vector<NeuronShape>& shapes, const AnalysisOptions& options, int draws) {
    const bool within_layers = options.match == MatchMode::index || options.scope == MatchScope::layer;
    size_t c = 0, n = 0, w = 0, block = 0, per_draw = 0, rows = 0, width = 0;
    for (size_t j = 0; j < shapes.size(); ++j) {
      const size_t D = shapes[j].width;
      w = std::max(w, size_t(shapes[j].layers) * D * D);
      block = std::max(block, D * D);
      width = std::max(width, D);
      for (size_t i = 0; i < shapes.size(); ++i) {
        if (i == j) continue;
        const size_t layer_rows = within_layers ? shapes[i].width : shapes[i].neurons();
        c = std::max(c, size_t(shapes[i].neurons() * shapes[j].neurons()));
        n = std::max(n, size_t(shapes[i].neurons()));
        per_draw = std::max(per_draw, layer_rows * D);
        rows = std::max(rows, layer_rows);
      }
    }
    cross = cuda::DeviceBuffer<double>(c);
    var_i = cuda::DeviceBuffer<double>(n);
    within = cuda::DeviceBuffer<double>(w);
    qs = cuda::DeviceBuffer<double>(size_t(draws) * block);
    r = cuda::DeviceBuffer<double>(size_t(draws) * per_draw);
    var_j = cuda::DeviceBuffer<double>(size_t(draws) * width);
    matched = cuda::DeviceBuffer<double>(size_t(draws) * rows);
  }
  cuda::DeviceBuffer<double> cross, var_i, within, qs, r, var_j, matched;
  std::pair<int, int> cross_of{-1, -1};  // the pair (a < b) whose stored block cross(a, b) `cross` holds
  int within_of = -1;                    // the model whose within-layer blocks `within` holds
};

// Model i's matched correlations with model j under `count` draws, given model j's
// Haar matrices q [layers_j, count, D_j, D_j] on the device: one [N_i] vector per draw.
std::vector<std::vector<double>> pair_matches(const CorrelationStats& stats, int i, int j, const double* q, int count,
                                              const AnalysisOptions& options, const HostMatch& match_on_host,
                                              PairWorkspace& work, cublasHandle_t cublas, cudaStream_t s) {
  const NeuronShape si = stats.shapes()[i], sj = stats.shapes()[j];
  const int64_t Ni = si.neurons(), Nj = sj.neurons();
  const int L = sj.layers, Di = si.width, D = sj.width;
  const int64_t block = int64_t(D) * D;
  // Layer by layer of model j: where matches stay within layers, the block of C Q_l^T
  // of layer l's rows, else all rows (max over all layers is the max over the layers'
  // maxima; one-to-one across layers assembles the whole matrix on the host).
  const bool within_layers = options.match == MatchMode::index || options.scope == MatchScope::layer;
  const bool on_host = options.match == MatchMode::one_to_one;
  const int64_t layer_rows = within_layers ? Di : Ni;

  // The stored cross block of the pair, row-major [N_a, N_b] for a < b: on the device
  // the column-major [N_b, N_a] matrix, C^T for i < j and C for i > j.
  const std::pair<int, int> pair{std::min(i, j), std::max(i, j)};
  if (work.cross_of != pair) {
    const std::vector<double>& stored = stats.cross(pair.first, pair.second);
    work.cross.upload(stored.data(), stored.size(), s);
    work.cross_of = pair;
  }
  if (work.within_of != j) {
    for (int l = 0; l < L; ++l) work.within.upload(stats.within(j, l).data(), block, s, l * block);  // symmetric
    work.within_of = j;
  }
  const std::vector<double> vi = stats.variance_sums(i);
  work.var_i.upload(vi.data(), vi.size(), s);

  const int64_t per_draw = layer_rows * D;  // one layer's correlations [layer_rows, D]
  double *r = work.r.data(), *qs = work.qs.data(), *var_j = work.var_j.data(), *matched = work.matched.data();
  std::vector<double> host(size_t(count) * (on_host ? per_draw : layer_rows));
  std::vector<std::vector<double>> values(count, std::vector<double>(Ni, -INFINITY));
  std::vector<std::vector<double>> whole;  // one-to-one across layers: [N_i, N_j] per draw
  if (on_host && !within_layers) whole.assign(count, std::vector<double>(Ni * Nj));
  const double one = 1.0, zero = 0.0;
  for (int l = 0; l < L; ++l) {
    const double* q_l = q + int64_t(l) * count * block;  // [count, D, D]
    // (C Q_l^T)^T = Q_l C^T on layer l's rows of C^T and the rows of model i in view;
    // Q_l S_l; the rotated variances; the correlations.
    const int64_t row0 = within_layers ? int64_t(l) * Di : 0;
    const double* ct_rows = i < j ? work.cross.data() + int64_t(l) * D + row0 * Nj   // C^T's rows, ld N_j
                                  : work.cross.data() + row0 + int64_t(l) * D * Ni;  // C's columns, ld N_i
    UNIV_CUBLAS_CHECK(cublasDgemmStridedBatched(cublas, CUBLAS_OP_N, i < j ? CUBLAS_OP_N : CUBLAS_OP_T, D,
                                                static_cast<int>(layer_rows), D, &one, q_l, D, block, ct_rows,
                                                static_cast<int>(i < j ? Nj : Ni), 0, &zero, r, D, per_draw, count));
    UNIV_CUBLAS_CHECK(cublasDgemmStridedBatched(cublas, CUBLAS_OP_N, CUBLAS_OP_N, D, D, D, &one, q_l, D, block,
                                                work.within.data() + l * block, D, 0, &zero, qs, D, block, count));
    cuda::rotated_variances(var_j, qs, q_l, D, count, s);
    cuda::normalize_correlations(r, work.var_i.data() + row0, var_j, layer_rows, D, count, s);
    if (on_host) {
      UNIV_CUDA_CHECK(cudaMemcpyAsync(host.data(), r, host.size() * sizeof(double), cudaMemcpyDeviceToHost, s));
      UNIV_CUDA_CHECK(cudaStreamSynchronize(s));
      for (int d = 0; d < count; ++d) {
        const double* block_rows = host.data() + d * per_draw;  // [layer_rows, D]
        if (within_layers) {
          const std::vector<double> m = match_on_host(std::vector<double>(block_rows, block_rows + per_draw), Di, D);
          std::copy(m.begin(), m.end(), values[d].begin() + row0);
        } else {
          for (int64_t a = 0; a < Ni; ++a)
            std::copy(block_rows + a * D, block_rows + (a + 1) * D, whole[d].begin() + a * Nj + int64_t(l) * D);
        }
      }
    } else {
      cuda::match_rows(matched, r, layer_rows, D, options.match == MatchMode::index, count, s);
      UNIV_CUDA_CHECK(cudaMemcpyAsync(host.data(), matched, host.size() * sizeof(double), cudaMemcpyDeviceToHost, s));
      UNIV_CUDA_CHECK(cudaStreamSynchronize(s));
      for (int d = 0; d < count; ++d)  // across layers: the max of the layers' maxima
        for (int64_t a = 0; a < layer_rows; ++a) {
          double& v = values[d][row0 + a];
          v = std::max(v, host[d * layer_rows + a]);
        }
    }
  }
  if (on_host && !within_layers)
    for (int d = 0; d < count; ++d) values[d] = match_on_host(whole[d], Ni, Nj);
  return values;
}

}  // namespace

std::vector<std::vector<std::vector<double>>> rotation_matrices_cuda(const NeuronShape& shape, int model,
                                                                     int first_draw, int draws, uint64_t seed) {
  const int64_t D = shape.width, block = D * D;
  cuda::Stream stream;
  cuda::DeviceBuffer<double> q(size_t(shape.layers) * draws * block), work(q.size());
  cuda::DeviceBuffer<uint64_t> ids(size_t(shape.layers) * draws);
  std::vector<std::vector<std::vector<double>>> out(draws);
  std::vector<double> host(q.size());
  draw_rotations(q.data(), work.data(), ids.data(), {{model, shape.layers}}, shape.width, first_draw, draws, seed,
                 stream.get());
  q.download(host.data(), host.size(), stream.get());
  stream.synchronize();
  for (int l = 0; l < shape.layers; ++l) {
    for (int d = 0; d < draws; ++d) {
      const double* cm = host.data() + (int64_t(l) * draws + d) * block;
      std::vector<double> row_major(block);
      for (int64_t r = 0; r < D; ++r)
        for (int64_t c = 0; c < D; ++c) row_major[r * D + c] = cm[r + c * D];
      out[d].push_back(std::move(row_major));
    }
  }
  return out;
}

struct PreparedRotations::Device {
  std::vector<NeuronShape> shapes;
  int draws;
  uint64_t seed;
  cuda::Stream stream;
  std::unique_ptr<DrawnRotations> rotations;
  cuda::Event drawn;  // recorded on stream after the drawing
};

PreparedRotations::PreparedRotations(const std::vector<NeuronShape>& shapes, const AnalysisOptions& options) {
  const int draws = options.baseline_draws + options.null_draws;
  double bytes = pair_bytes(shapes, options);
  for (const auto& shape : shapes) bytes += rotation_bytes(shape);
  if (draws <= 0 || shapes.size() < 2 || bytes * draws > kBudgetBytes) return;  // analyze() draws in batches
  device_ = std::make_unique<Device>();
  device_->shapes = shapes;
  device_->draws = draws;
  device_->seed = options.seed;
  const cudaStream_t s = device_->stream.get();
  device_->rotations = std::make_unique<DrawnRotations>(shapes, 0, static_cast<int>(shapes.size()), 0, draws,
                                                        options.seed, s);
  device_->drawn.record(s);
}

PreparedRotations::~PreparedRotations() = default;

std::vector<std::vector<std::vector<double>>> rotated_matches_cuda(const CorrelationStats& stats, int draws,
                                                                   const AnalysisOptions& options,
                                                                   const HostMatch& match_on_host,
                                                                   const std::function<void(int)>& drawn,
                                                                   const PreparedRotations* prepared) {
  const std::vector<NeuronShape>& shapes = stats.shapes();
  const int K = stats.models();
  std::vector<std::vector<std::vector<double>>> out(size_t(K) * K);
  if (draws <= 0) return out;
  cuda::Stream stream;
  const cudaStream_t s = stream.get();
  cuda::CublasHandle cublas(s, false);
  std::optional<PairWorkspace> work;  // made once the draws at once are known
  // Every ordered pair (i, j) for `count` draws, given model j's Haar matrices q_j.
  auto match_pairs = [&](int j, const double* q_j, int count) {
    for (int i = 0; i < K; ++i) {
      if (i == j) continue;
      auto values = pair_matches(stats, i, j, q_j, count, options, match_on_host, *work, cublas.get(), s);
      auto& into = out[size_t(i) * K + j];
      for (auto& v : values) into.push_back(std::move(v));
      drawn(count);
    }
  };
  const PreparedRotations::Device* ready = prepared ? prepared->device() : nullptr;
  if (ready && ready->shapes == shapes && ready->draws == draws && ready->seed == options.seed) {
    ready->drawn.make_wait(s);
    work.emplace(shapes, options, draws);
    for (int j = 0; j < K; ++j) match_pairs(j, ready->rotations->of(j), draws);
    return out;
  }
  // Draws processed at once: all of them, as far as the budget holds the widest model's.
  const double per_pair = pair_bytes(shapes, options);
  double widest = 0;
  for (const auto& shape : shapes) widest = std::max(widest, rotation_bytes(shape));
  const int batch = static_cast<int>(std::clamp(kBudgetBytes / (widest + per_pair), 1.0, double(draws)));
  work.emplace(shapes, options, batch);
  for (int first = 0; first < draws; first += batch) {
    const int count = std::min(batch, draws - first);
    // Models whose rotations are drawn together: consecutive ones, as far as the budget
    // holds them; each model's rotations serve all its partners.
    for (int j0 = 0; j0 < K;) {
      int j1 = j0 + 1;
      double bytes = count * (rotation_bytes(shapes[j0]) + per_pair);
      while (j1 < K && bytes + count * rotation_bytes(shapes[j1]) <= kBudgetBytes)
        bytes += count * rotation_bytes(shapes[j1++]);
      const DrawnRotations rotations(shapes, j0, j1, first, count, options.seed, s);
      for (int j = j0; j < j1; ++j) match_pairs(j, rotations.of(j), count);
      j0 = j1;
    }
  }
  return out;
}

}  // namespace univ
