// The rotation baseline on the GPU: per batch of draws, the Haar matrices of model j's
// layers (kernels/rotation.cu), the rotated co-moments C Q^T (only each layer's block
// where matches stay within layers) and Q S (cuBLAS DGEMM, strided-batched over
// draws), the rotated variances diag(Q S Q^T), the correlations and their matches.
// Everything stays in float64; for index and max matching only the matched values
// come back.
#include "rotation_baseline.hpp"

#include <algorithm>

#include "univ/cuda/kernels.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/error.hpp"
#include "univ/philox.hpp"

namespace univ {

namespace {

// Draws whose matrices are held at once: all of them, as far as 2 GiB allows.
int draws_per_batch(int64_t correlations, const NeuronShape& sj, int draws) {
  const double per_draw = sizeof(double) * (static_cast<double>(correlations) + double(sj.neurons()) +
                                            3.0 * sj.layers * double(sj.width) * sj.width);
  const double budget = 2.0 * (int64_t(1) << 30);
  return std::max(1, std::min(draws, static_cast<int>(std::min(budget / per_draw, 1e6))));
}

// The Haar matrices of draws [first, first + count) of `model`, layer by layer:
// q [count, layers, width, width] column-major.
void draw_rotations(cuda::DeviceBuffer<double>& q, cuda::DeviceBuffer<double>& work,
                    cuda::DeviceBuffer<uint64_t>& streams, const NeuronShape& shape, int model, int first, int count,
                    uint64_t seed, cudaStream_t stream) {
  if (shape.width > cuda::haar_max_width())
    throw UserError("the GPU rotation baseline holds layers up to " + std::to_string(cuda::haar_max_width()) +
                    " neurons wide (this one has " + std::to_string(shape.width) + "); use --device cpu");
  std::vector<uint64_t> ids;
  for (int d = first; d < first + count; ++d)
    for (int l = 0; l < shape.layers; ++l)
      ids.push_back(rng_stream(RngPurpose::rotation, static_cast<uint32_t>(model),
                               (static_cast<uint32_t>(d) << 16) | static_cast<uint32_t>(l)));
  streams.upload(ids.data(), ids.size(), stream);
  cuda::haar_orthogonal_batch(q.data(), work.data(), streams.data(), seed, shape.width, count * shape.layers, stream);
}

}  // namespace

std::vector<std::vector<std::vector<double>>> rotation_matrices_cuda(const NeuronShape& shape, int model,
                                                                     int first_draw, int draws, uint64_t seed) {
  const int64_t D = shape.width, block = D * D;
  cuda::Stream stream;
  cuda::DeviceBuffer<double> q(draws * shape.layers * block), work(q.size());
  cuda::DeviceBuffer<uint64_t> streams(size_t(draws) * shape.layers);
  draw_rotations(q, work, streams, shape, model, first_draw, draws, seed, stream.get());
  std::vector<double> host(q.size());
  q.download(host.data(), host.size(), stream.get());
  stream.synchronize();
  std::vector<std::vector<std::vector<double>>> out(draws);
  for (int d = 0; d < draws; ++d)
    for (int l = 0; l < shape.layers; ++l) {
      const double* cm = host.data() + (int64_t(d) * shape.layers + l) * block;
      std::vector<double> row_major(block);
      for (int64_t r = 0; r < D; ++r)
        for (int64_t c = 0; c < D; ++c) row_major[r * D + c] = cm[r + c * D];
      out[d].push_back(std::move(row_major));
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
  // Where matches stay within layers, each row's layer block of C Q^T (rows [N_i, D]),
  // else the whole [N_i, N_j].
  const bool within_layers = options.match == MatchMode::index || options.scope == MatchScope::layer;
  const int64_t cols = within_layers ? D : Nj, per_draw = Ni * cols;
  const int batch = draws_per_batch(per_draw, sj, draws);
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

  cuda::DeviceBuffer<double> q(size_t(batch) * L * block), work(q.size()), qs(q.size());
  cuda::DeviceBuffer<double> r(size_t(batch) * per_draw), var_j(size_t(batch) * Nj), matched(size_t(batch) * Ni);
  cuda::DeviceBuffer<uint64_t> streams(size_t(batch) * L);
  const bool on_host = options.match == MatchMode::one_to_one;
  std::vector<double> host(on_host ? r.size() : matched.size());
  std::vector<std::vector<double>> out;
  const double one = 1.0, zero = 0.0;
  for (int first = 0; first < draws; first += batch) {
    const int count = std::min(batch, draws - first);
    draw_rotations(q, work, streams, sj, j, first, count, options.seed, s);
    for (int l = 0; l < L; ++l) {
      // Rotated co-moments (C Q^T)^T = Q C^T on the layer's rows of C^T: its columns of
      // layer l's rows (within layers) or all of them; and Q S.
      const int64_t row0 = within_layers ? int64_t(l) * Di : 0;
      UNIV_CUBLAS_CHECK(cublasDgemmStridedBatched(
          cublas.get(), CUBLAS_OP_N, CUBLAS_OP_N, D, static_cast<int>(within_layers ? Di : Ni), D, &one,
          q.data() + l * block, D, L * block, c.data() + int64_t(l) * D + row0 * Nj, static_cast<int>(Nj), 0, &zero,
          r.data() + (within_layers ? row0 * D : int64_t(l) * D), static_cast<int>(cols), per_draw, count));
      UNIV_CUBLAS_CHECK(cublasDgemmStridedBatched(cublas.get(), CUBLAS_OP_N, CUBLAS_OP_N, D, D, D, &one,
                                                  q.data() + l * block, D, L * block, within.data() + l * block, D, 0,
                                                  &zero, qs.data() + l * block, D, L * block, count));
    }
    cuda::rotated_variances(var_j.data(), qs.data(), q.data(), D, count * L, s);
    cuda::normalize_correlations(r.data(), var_i.data(), var_j.data(), Ni, cols, Nj, within_layers ? Di : 0, count,
                                 s);
    if (on_host) {
      r.download(host.data(), size_t(count) * per_draw, s);
      stream.synchronize();
      for (int d = 0; d < count; ++d) {
        const auto first_row = host.begin() + d * per_draw;
        if (!within_layers) {
          out.push_back(match_on_host(std::vector<double>(first_row, first_row + per_draw), Ni, Nj));
          continue;
        }
        std::vector<double> values;  // layer by layer: [D_i, D] blocks
        for (int l = 0; l < si.layers; ++l) {
          const auto rows = first_row + int64_t(l) * Di * D;
          const std::vector<double> m = match_on_host(std::vector<double>(rows, rows + int64_t(Di) * D), Di, D);
          values.insert(values.end(), m.begin(), m.end());
        }
        out.push_back(std::move(values));
      }
    } else {
      cuda::match_rows(matched.data(), r.data(), Ni, cols, options.match == MatchMode::index, count, s);
      matched.download(host.data(), size_t(count) * Ni, s);
      stream.synchronize();
      for (int d = 0; d < count; ++d) out.emplace_back(host.begin() + d * Ni, host.begin() + (d + 1) * Ni);
    }
    drawn(count);
  }
  return out;
}

}  // namespace univ
