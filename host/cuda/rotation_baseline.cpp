// The rotation baseline on the GPU, per batch of draws: every layer's Haar matrices of
// the rotated model in one launch (kernels/rotation.cu: a QR per thread block takes
// milliseconds, and one launch keeps as many SMs busy as there are matrices; cuSOLVER's
// QR for wide layers), then layer by layer the rotated co-moments C Q^T (of the
// layer's own rows where matches stay within layers) and Q S as cuBLAS DGEMMs
// strided-batched over the draws, the rotated variances diag(Q S Q^T), the
// correlations and their matches. Everything stays in float64; for index and max
// matching only the matched values come back.
#include "rotation_baseline.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/error.hpp"
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

// The Haar matrices of every layer of `model` for draws [first, first + count): q
// [layers, count, width, width], each column-major; work as large, scratch.
void draw_rotations(cuda::DeviceBuffer<double>& q, cuda::DeviceBuffer<double>& work,
                    cuda::DeviceBuffer<uint64_t>& streams, int width, int layers, int model, int first, int count,
                    uint64_t seed, cudaStream_t stream) {
  std::vector<uint64_t> ids;
  for (int l = 0; l < layers; ++l)
    for (int d = first; d < first + count; ++d)
      ids.push_back(rng_stream(RngPurpose::rotation, static_cast<uint32_t>(model),
                               (static_cast<uint32_t>(d) << 16) | static_cast<uint32_t>(l)));
  const int matrices = layers * count;
  streams.upload(ids.data(), ids.size(), stream);
  cuda::gaussian_matrices(work.data(), streams.data(), seed, width, matrices, stream);
  if (width <= kBlockQrMaxWidth && width <= cuda::batched_qr_max_width()) {
    cuda::haar_q_batched(q.data(), work.data(), width, matrices, stream);
    return;
  }
  WideQr qr(width, work.data(), stream);
  const int64_t block = int64_t(width) * width;
  for (int b = 0; b < matrices; ++b) qr.haar_q(q.data() + b * block, work.data() + b * block, stream);
  UNIV_CUDA_CHECK(cudaStreamSynchronize(stream));
  qr.check();
}

// Draws processed at once: all of them, as far as 2 GiB holds their matrices (every
// layer's Haar matrices and scratch, one layer's correlations and Q S).
int draws_per_batch(int64_t correlations, int width, int layers, int draws) {
  const double per_draw =
      sizeof(double) * (static_cast<double>(correlations) + (2.0 * layers + 1) * width * double(width) + width);
  const double budget = 2.0 * (int64_t(1) << 30);
  return std::max(1, std::min(draws, static_cast<int>(std::min(budget / per_draw, 1e6))));
}

}  // namespace

std::vector<std::vector<std::vector<double>>> rotation_matrices_cuda(const NeuronShape& shape, int model,
                                                                     int first_draw, int draws, uint64_t seed) {
  const int64_t D = shape.width, block = D * D;
  cuda::Stream stream;
  cuda::DeviceBuffer<double> q(size_t(shape.layers) * draws * block), work(q.size());
  cuda::DeviceBuffer<uint64_t> streams(size_t(shape.layers) * draws);
  std::vector<std::vector<std::vector<double>>> out(draws);
  std::vector<double> host(q.size());
  draw_rotations(q, work, streams, shape.width, shape.layers, model, first_draw, draws, seed, stream.get());
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

std::vector<std::vector<double>> rotated_matches_cuda(const CorrelationStats& stats, int i, int j, int draws,
                                                      const AnalysisOptions& options, const HostMatch& match_on_host,
                                                      const std::function<void(int)>& drawn) {
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
  const int batch = draws_per_batch(layer_rows * D, D, L, draws);
  cuda::Stream stream;
  const cudaStream_t s = stream.get();
  cuda::CublasHandle cublas(s, false);

  // C [N_i, N_j] row-major: on the device, the column-major [N_j, N_i] matrix C^T.
  cuda::DeviceBuffer<double> c(size_t(Ni * Nj)), var_i(Ni), within(size_t(L) * block);
  if (i < j) c.upload(stats.cross(i, j).data(), c.size(), s);
  else {
    const std::vector<double>& cji = stats.cross(j, i);  // [N_j, N_i]
    std::vector<double> transposed(c.size());
    for (int64_t a = 0; a < Ni; ++a)
      for (int64_t b = 0; b < Nj; ++b) transposed[a * Nj + b] = cji[b * Ni + a];
    c.upload(transposed.data(), c.size(), s);
  }
  const std::vector<double> vi = stats.variance_sums(i);
  var_i.upload(vi.data(), vi.size(), s);
  for (int l = 0; l < L; ++l) within.upload(stats.within(j, l).data(), block, s, l * block);  // symmetric

  const int64_t per_draw = layer_rows * D;  // one layer's correlations [layer_rows, D]
  cuda::DeviceBuffer<double> q(size_t(L) * batch * block), work(q.size()), qs(size_t(batch) * block);
  cuda::DeviceBuffer<double> r(size_t(batch) * per_draw), var_j(size_t(batch) * D), matched(size_t(batch) * layer_rows);
  cuda::DeviceBuffer<uint64_t> streams(size_t(L) * batch);
  std::vector<double> host(on_host ? r.size() : matched.size());
  std::vector<std::vector<double>> out;
  const double one = 1.0, zero = 0.0;
  for (int first = 0; first < draws; first += batch) {
    const int count = std::min(batch, draws - first);
    std::vector<std::vector<double>> values(count, std::vector<double>(Ni, -INFINITY));
    std::vector<std::vector<double>> whole;  // one-to-one across layers: [N_i, N_j] per draw
    if (on_host && !within_layers) whole.assign(count, std::vector<double>(Ni * Nj));
    draw_rotations(q, work, streams, D, L, j, first, count, options.seed, s);
    for (int l = 0; l < L; ++l) {
      const double* q_l = q.data() + int64_t(l) * count * block;  // [count, D, D]
      // (C Q_l^T)^T = Q_l C^T on layer l's rows of C^T and the rows of model i in view;
      // Q_l S_l; the rotated variances; the correlations.
      const int64_t row0 = within_layers ? int64_t(l) * Di : 0;
      UNIV_CUBLAS_CHECK(cublasDgemmStridedBatched(
          cublas.get(), CUBLAS_OP_N, CUBLAS_OP_N, D, static_cast<int>(layer_rows), D, &one, q_l, D, block,
          c.data() + int64_t(l) * D + row0 * Nj, static_cast<int>(Nj), 0, &zero, r.data(), D, per_draw, count));
      UNIV_CUBLAS_CHECK(cublasDgemmStridedBatched(cublas.get(), CUBLAS_OP_N, CUBLAS_OP_N, D, D, D, &one, q_l, D, block,
                                                  within.data() + l * block, D, 0, &zero, qs.data(), D, block, count));
      cuda::rotated_variances(var_j.data(), qs.data(), q_l, D, count, s);
      cuda::normalize_correlations(r.data(), var_i.data() + row0, var_j.data(), layer_rows, D, count, s);
      if (on_host) {
        r.download(host.data(), size_t(count) * per_draw, s);
        stream.synchronize();
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
        cuda::match_rows(matched.data(), r.data(), layer_rows, D, options.match == MatchMode::index, count, s);
        matched.download(host.data(), size_t(count) * layer_rows, s);
        stream.synchronize();
        for (int d = 0; d < count; ++d)  // across layers: the max of the layers' maxima
          for (int64_t a = 0; a < layer_rows; ++a) {
            double& v = values[d][row0 + a];
            v = std::max(v, host[d * layer_rows + a]);
          }
      }
    }
    for (int d = 0; d < count; ++d)
      out.push_back(on_host && !within_layers ? match_on_host(whole[d], Ni, Nj) : std::move(values[d]));
    drawn(count);
  }
  return out;
}

}  // namespace univ
