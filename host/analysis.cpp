// Correlations, rotation baseline, matching and null counts from the statistics.
#include "univ/analysis.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include <omp.h>

#include "cpu/blas.hpp"
#include "univ/error.hpp"
#include "univ/philox.hpp"
#include "univ/rotation.hpp"

#ifdef UNIV_HAVE_CUDA
#include "cuda/rotation_baseline.hpp"
#endif

namespace univ {

std::string to_string(MatchMode m) {
  return m == MatchMode::index ? "index" : m == MatchMode::max ? "max" : "one-to-one";
}
std::string to_string(MatchScope s) { return s == MatchScope::layer ? "layer" : "all"; }

MatchMode parse_match_mode(const std::string& name) {
  if (name == "index") return MatchMode::index;
  if (name == "max") return MatchMode::max;
  if (name == "one-to-one") return MatchMode::one_to_one;
  throw UserError("unknown --match '" + name + "' (expected index, max or one-to-one)");
}

MatchScope parse_match_scope(const std::string& name) {
  if (name == "layer") return MatchScope::layer;
  if (name == "all") return MatchScope::all;
  throw UserError("unknown --scope '" + name + "' (expected layer or all)");
}

void AnalysisOptions::validate() const {
  if (!(threshold > 0 && threshold <= 1))
    throw UserError("--threshold must lie in (0, 1] (got " + std::to_string(threshold) + ")");
  if (baseline_draws < 1) throw UserError("--baseline-draws must be at least 1");
  if (null_draws < 0) throw UserError("--null-draws must be zero or positive");
}

std::vector<int> min_cost_assignment(const std::vector<double>& cost, int rows, int cols) {
  // Shortest augmenting paths with row and column potentials (Kuhn-Munkres as
  // refined by Jonker and Volgenant); arrays are 1-based, column 0 is a sentinel.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(rows + 1, 0.0), v(cols + 1, 0.0), min_slack(cols + 1);
  std::vector<int> row_of(cols + 1, 0), previous(cols + 1, 0);
  std::vector<char> visited(cols + 1);
  for (int i = 1; i <= rows; ++i) {
    row_of[0] = i;
    int j0 = 0;
    std::fill(min_slack.begin(), min_slack.end(), inf);
    std::fill(visited.begin(), visited.end(), 0);
    do {
      visited[j0] = 1;
      const int i0 = row_of[j0];
      double delta = inf;
      int j1 = 0;
      for (int j = 1; j <= cols; ++j) {
        if (visited[j]) continue;
        const double slack = cost[size_t(i0 - 1) * cols + (j - 1)] - u[i0] - v[j];
        if (slack < min_slack[j]) {
          min_slack[j] = slack;
          previous[j] = j0;
        }
        if (min_slack[j] < delta) {
          delta = min_slack[j];
          j1 = j;
        }
      }
      for (int j = 0; j <= cols; ++j) {
        if (visited[j]) {
          u[row_of[j]] += delta;
          v[j] -= delta;
        } else {
          min_slack[j] -= delta;
        }
      }
      j0 = j1;
    } while (row_of[j0] != 0);
    do {
      const int j1 = previous[j0];
      row_of[j0] = row_of[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> col_of(rows, -1);
  for (int j = 1; j <= cols; ++j)
    if (row_of[j] != 0) col_of[row_of[j] - 1] = j - 1;
  return col_of;
}

double NullCount::mean() const {
  if (counts.empty()) return 0;
  return std::accumulate(counts.begin(), counts.end(), 0.0) / static_cast<double>(counts.size());
}

double NullCount::sd() const {
  if (counts.size() < 2) return 0;
  const double mu = mean();
  double ss = 0;
  for (int c : counts) ss += (c - mu) * (c - mu);
  return std::sqrt(ss / static_cast<double>(counts.size() - 1));
}

double chance_bound(const NullCount& null) {
  return null.mean() + 3 * std::max(null.sd(), std::sqrt(std::max(null.mean(), 1.0)));
}

namespace {

// The correlation of two neurons from their co-moment and variance sums; 0 where a
// variance is 0 (a constant neuron).
double correlation(double comoment, double var_a, double var_b) {
  const double denom = std::sqrt(var_a * var_b);
  return denom > 0 ? comoment / denom : 0.0;
}

// Matched correlation (and the matched column) of every row of a correlation matrix
// rows x cols, under max or one-to-one matching (index matching takes the diagonal);
// layer blocks are `row_width` and `col_width` wide.
struct Matched {
  std::vector<double> value;
  std::vector<int> column;
};

Matched match_rows(const std::vector<double>& r, int64_t rows, int64_t cols, int row_width, int col_width,
                   const AnalysisOptions& o) {
  Matched out{std::vector<double>(rows), std::vector<int>(rows)};
  const bool per_layer = o.scope == MatchScope::layer;
  if (o.match == MatchMode::max) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < rows; ++n) {
      const int64_t c0 = per_layer ? n / row_width * col_width : 0, c1 = per_layer ? c0 + col_width : cols;
      const double* row = r.data() + n * cols;
      const int64_t best = std::max_element(row + c0, row + c1) - row;
      out.value[n] = row[best];
      out.column[n] = static_cast<int>(best);
    }
  } else {
    const int64_t blocks = per_layer ? rows / row_width : 1;
    const int64_t bw = per_layer ? row_width : rows, bc = per_layer ? col_width : cols;
#pragma omp parallel for schedule(dynamic)
    for (int64_t b = 0; b < blocks; ++b) {
      std::vector<double> cost(size_t(bw * bc));
      for (int64_t n = 0; n < bw; ++n)
        for (int64_t c = 0; c < bc; ++c) cost[n * bc + c] = -r[(b * bw + n) * cols + b * bc + c];
      const std::vector<int> assigned = min_cost_assignment(cost, static_cast<int>(bw), static_cast<int>(bc));
      for (int64_t n = 0; n < bw; ++n) {
        const int64_t col = b * bc + assigned[n];
        out.value[b * bw + n] = r[(b * bw + n) * cols + col];
        out.column[b * bw + n] = static_cast<int>(col);
      }
    }
  }
  return out;
}

void check_fit(const CorrelationStats& stats, const AnalysisOptions& o) {
  if (stats.models() < 2) throw UserError("correlation needs at least 2 models");
  if (stats.count() < 2) throw UserError("correlation needs at least 2 tokens");
  for (int m = 1; m < stats.models(); ++m) {
    const NeuronShape &a = stats.shapes()[0], &b = stats.shapes()[m];
    if ((o.match == MatchMode::index || o.match == MatchMode::one_to_one) && !(a == b))
      throw UserError("--match " + to_string(o.match) +
                      " needs models of equal layer counts and widths; use --match max for models of different widths");
    if (o.scope == MatchScope::layer && a.layers != b.layers)
      throw UserError("--scope layer needs models with the same number of layers; use --scope all");
  }
}

// Rotation draws analysed at once: one per thread, while their [rows, cols]
// correlation matrices (and the rotated copy each makes) stay within 2 GiB.
int concurrent_draws(int64_t rows, int64_t cols) {
  const double bytes_per_draw = 2.0 * sizeof(double) * static_cast<double>(rows) * static_cast<double>(cols);
  const int by_memory = static_cast<int>(std::min(1024.0, std::floor(2.0 * (int64_t(1) << 30) / bytes_per_draw)));
  return std::max(1, std::min(omp_get_max_threads(), by_memory));
}

}  // namespace

std::vector<std::vector<double>> rotation_matrices(const NeuronShape& shape, int model, int draw, uint64_t seed) {
  std::vector<std::vector<double>> q;
  for (int l = 0; l < shape.layers; ++l) {
    PhiloxStream rng(seed, rng_stream(RngPurpose::rotation, static_cast<uint32_t>(model),
                                      (static_cast<uint32_t>(draw) << 16) | static_cast<uint32_t>(l)));
    q.push_back(haar_orthogonal(shape.width, rng));
  }
  return q;
}

PairCorrelations::PairCorrelations(const CorrelationStats& stats, int i, int j)
    : cross_(i < j ? stats.cross(i, j) : stats.cross(j, i)),
      stored_ij_(i < j),
      stored_cols_(stats.shapes()[std::max(i, j)].neurons()),
      var_i_(stats.variance_sums(i)),
      var_j_(stats.variance_sums(j)) {}

double PairCorrelations::operator()(int64_t a, int64_t b) const {
  const double c = stored_ij_ ? cross_[a * stored_cols_ + b] : cross_[b * stored_cols_ + a];
  return correlation(c, var_i_[a], var_j_[b]);
}

std::vector<double> correlation_matrix(const CorrelationStats& stats, int i, int j,
                                       const std::vector<std::vector<double>>& q) {
  const NeuronShape si = stats.shapes()[i], sj = stats.shapes()[j];
  const int64_t Ni = si.neurons(), Nj = sj.neurons();
  const int D = sj.width;
  std::vector<double> c = stats.cross_rows(i, j);
  std::vector<double> var_j = stats.variance_sums(j);
  if (!q.empty()) {
    std::vector<double> rotated(c.size()), qs(size_t(D) * D);
    for (int l = 0; l < sj.layers; ++l) {
      // Columns of layer l: C Q^T; variances: diag(Q S Q^T).
      cpu::gemm(false, true, static_cast<int>(Ni), D, D, 1.0, c.data() + size_t(l) * D, static_cast<int>(Nj),
                q[l].data(), D, 0.0, rotated.data() + size_t(l) * D, static_cast<int>(Nj));
      cpu::gemm(false, false, D, D, D, 1.0, q[l].data(), D, stats.within(j, l).data(), D, 0.0, qs.data(), D);
      for (int k = 0; k < D; ++k) {
        double v = 0;
        for (int a = 0; a < D; ++a) v += qs[size_t(k) * D + a] * q[l][size_t(k) * D + a];
        var_j[size_t(l) * D + k] = v;
      }
    }
    c = std::move(rotated);
  }
  const std::vector<double> var_i = stats.variance_sums(i);
#pragma omp parallel for schedule(static)
  for (int64_t a = 0; a < Ni; ++a)
    for (int64_t b = 0; b < Nj; ++b) c[a * Nj + b] = correlation(c[a * Nj + b], var_i[a], var_j[b]);
  return c;
}

namespace {

// Matched correlations under one draw's rotations q, layer by layer of model j: where
// matches stay within layers (index matching, scope layer) only the block C_ll Q_l^T of
// layer l's rows is formed, and for index matching only its diagonal; for max matching
// across layers, C[:, layer l] Q_l^T of all rows, the row maxima of the layers combined.
// One-to-one matching across layers needs the whole matrix (correlation_matrix).
std::vector<double> rotated_layer_matches(const CorrelationStats& stats, int i, int j,
                                          const std::vector<std::vector<double>>& q, const AnalysisOptions& o) {
  const NeuronShape si = stats.shapes()[i], sj = stats.shapes()[j];
  const int Di = si.width, Dj = sj.width;
  const int64_t Ni = si.neurons(), Nj = sj.neurons();
  const bool within_layers = o.match == MatchMode::index || o.scope == MatchScope::layer;
  const int rows = static_cast<int>(within_layers ? Di : Ni);
  // C[a, b] (rows of model i, columns of model j) within the stored cross block.
  const bool stored_ij = i < j;
  const std::vector<double>& cross = stored_ij ? stats.cross(i, j) : stats.cross(j, i);
  auto c_at = [&](int64_t a, int64_t b) { return stored_ij ? cross[a * Nj + b] : cross[b * Ni + a]; };
  const std::vector<double> var_i = stats.variance_sums(i);
  std::vector<double> out(Ni, -std::numeric_limits<double>::infinity()), qs(size_t(Dj) * Dj), var_j(Dj),
      block(size_t(rows) * Dj);
  for (int l = 0; l < sj.layers; ++l) {
    const std::vector<double>& ql = q[l];
    cpu::gemm(false, false, Dj, Dj, Dj, 1.0, ql.data(), Dj, stats.within(j, l).data(), Dj, 0.0, qs.data(), Dj);
    for (int k = 0; k < Dj; ++k) {  // diag(Q S Q^T)
      double v = 0;
      for (int a = 0; a < Dj; ++a) v += qs[size_t(k) * Dj + a] * ql[size_t(k) * Dj + a];
      var_j[k] = v;
    }
    const int64_t row0 = within_layers ? int64_t(l) * Di : 0, col0 = int64_t(l) * Dj;
    if (o.match == MatchMode::index) {  // (C Q^T)_kk = C[k, :] . Q[k, :]
      for (int k = 0; k < Di; ++k) {
        double c = 0;
        for (int a = 0; a < Dj; ++a) c += c_at(row0 + k, col0 + a) * ql[size_t(k) * Dj + a];
        out[row0 + k] = correlation(c, var_i[row0 + k], var_j[k]);
      }
      continue;
    }
    if (stored_ij)
      cpu::gemm(false, true, rows, Dj, Dj, 1.0, cross.data() + row0 * Nj + col0, static_cast<int>(Nj), ql.data(), Dj,
                0.0, block.data(), Dj);
    else  // the stored block is [N_j, N_i]: the rows' columns transposed
      cpu::gemm(true, true, rows, Dj, Dj, 1.0, cross.data() + col0 * Ni + row0, static_cast<int>(Ni), ql.data(), Dj,
                0.0, block.data(), Dj);
    for (int k = 0; k < rows; ++k)
      for (int b = 0; b < Dj; ++b) {
        double& r = block[size_t(k) * Dj + b];
        r = correlation(r, var_i[row0 + k], var_j[b]);
      }
    const Matched m = match_rows(block, rows, Dj, rows, Dj, o);  // within the block: all its columns
    for (int k = 0; k < rows; ++k) out[row0 + k] = std::max(out[row0 + k], m.value[k]);  // the layers' maxima
  }
  return out;
}

// On the host: for each partner i of model j, the matched correlations of model i's
// neurons under each of the draws [0, draws) of model j's rotations ([i][d], empty for
// i = j); drawn(1) is told of every (partner, draw) done. Each draw's rotations are a
// pure function of (seed, model, draw), drawn once and used for every partner, several
// draws at once on threads as far as memory allows (each holds one layer's columns of
// the rotated correlations; one-to-one matching across layers the whole [N_i, N_j]
// matrix). The GPU's counterpart is rotated_matches_cuda.
std::vector<std::vector<std::vector<double>>> rotated_matches(const CorrelationStats& stats, int j, int draws,
                                                              const AnalysisOptions& o,
                                                              const std::function<void(int)>& drawn) {
  const int K = stats.models();
  const NeuronShape sj = stats.shapes()[j];
  const int64_t Nj = sj.neurons();
  const bool whole = o.match == MatchMode::one_to_one && o.scope == MatchScope::all;
  const bool within_layers = o.match == MatchMode::index || o.scope == MatchScope::layer;
  int parallel = omp_get_max_threads();
  std::vector<std::vector<std::vector<double>>> matched(K);
  for (int i = 0; i < K; ++i) {
    if (i == j) continue;
    const NeuronShape si = stats.shapes()[i];
    parallel = std::min(parallel, concurrent_draws(within_layers ? si.width : si.neurons(), whole ? Nj : sj.width));
    matched[i].resize(draws);
  }
#pragma omp parallel for schedule(dynamic) num_threads(parallel)
  for (int d = 0; d < draws; ++d) {
    const auto q = rotation_matrices(sj, j, d, o.seed);
    for (int i = 0; i < K; ++i) {
      if (i == j) continue;
      const NeuronShape si = stats.shapes()[i];
      if (whole)
        matched[i][d] = match_rows(correlation_matrix(stats, i, j, q), si.neurons(), Nj, si.width, sj.width, o).value;
      else
        matched[i][d] = rotated_layer_matches(stats, i, j, q, o);
#pragma omp critical(univ_rotation_progress)
      drawn(1);
    }
  }
  return matched;
}

}  // namespace

Analysis analyze(const CorrelationStats& stats, const AnalysisOptions& options,
                 const std::function<void(int done, int total)>& progress,
                 [[maybe_unused]] const PreparedRotations* prepared) {
  options.validate();
  check_fit(stats, options);
  const int K = stats.models();
  const int draws = options.baseline_draws + options.null_draws;
  int draws_done = 0;
  auto drawn = [&, total = K * (K - 1) * draws](int n) {
    draws_done += n;
    if (progress) progress(draws_done, total);
  };
  // Each ordered pair's rotated matches [i * K + j], one [N_i] vector per draw, each
  // model's rotations serving all its partners: on the GPU all at once, on the host
  // model by model.
  std::vector<std::vector<std::vector<double>>> pair_matches(size_t(K) * K);
  bool on_gpu = false;
#ifdef UNIV_HAVE_CUDA
  on_gpu = options.device == Device::cuda;
  if (on_gpu) {
    auto match_on_host = [&](const std::vector<double>& r, int64_t rows, int64_t cols) {
      return match_rows(r, rows, cols, static_cast<int>(rows), static_cast<int>(cols), options).value;
    };
    pair_matches = rotated_matches_cuda(stats, draws, options, match_on_host, drawn, prepared);
  }
#endif
  if (!on_gpu)
    for (int j = 0; j < K; ++j) {
      auto matched = rotated_matches(stats, j, draws, options, drawn);
      for (int i = 0; i < K; ++i)
        if (i != j) pair_matches[size_t(i) * K + j] = std::move(matched[i]);
    }

  Analysis out;
  out.options = options;
  out.tokens = stats.count();

  // Per model i: each neuron's matches, and per null draw the excess it would have.
  for (int i = 0; i < K; ++i) {
    const NeuronShape si = stats.shapes()[i];
    const int64_t Ni = si.neurons();
    std::vector<NeuronResult> neurons(Ni);
    for (int64_t n = 0; n < Ni; ++n) {
      neurons[n].model = i;
      neurons[n].layer = static_cast<int>(n / si.width);
      neurons[n].neuron = static_cast<int>(n % si.width);
      neurons[n].dead = stats.within(i, neurons[n].layer)[size_t(neurons[n].neuron) * (si.width + 1)] <= 0;
    }
    std::vector<std::vector<double>> rotation_null(options.null_draws, std::vector<double>(Ni, 0.0));
    std::vector<std::vector<double>> permutation_null(
        options.match == MatchMode::index ? options.null_draws : 0, std::vector<double>(Ni, 0.0));
    for (int j = 0; j < K; ++j) {
      if (j == i) continue;
      const NeuronShape sj = stats.shapes()[j];
      const int64_t Nj = sj.neurons();
      const PairCorrelations r(stats, i, j);
      Matched actual{std::vector<double>(Ni), std::vector<int>(Ni)};
      if (options.match == MatchMode::index) {  // neuron n with neuron n: N_i of the N_i x N_j correlations
        for (int64_t n = 0; n < Ni; ++n) {
          actual.value[n] = r(n, n);
          actual.column[n] = static_cast<int>(n);
        }
      } else {
        actual = match_rows(correlation_matrix(stats, i, j), Ni, Nj, si.width, sj.width, options);
      }
      std::vector<double> baseline(Ni, 0.0);
      const std::vector<std::vector<double>> matched = std::move(pair_matches[size_t(i) * K + j]);
      // Added in draw order: the sums do not depend on how the draws were spread.
      for (int d = 0; d < draws; ++d)
        for (int64_t n = 0; n < Ni; ++n) {
          if (d < options.baseline_draws) baseline[n] += matched[d][n] / options.baseline_draws;
          else rotation_null[d - options.baseline_draws][n] += matched[d][n];
        }
      for (size_t e = 0; e < permutation_null.size(); ++e) {
        // Partners paired by a random permutation within each layer instead of by index.
        for (int l = 0; l < sj.layers; ++l) {
          std::vector<int64_t> perm(sj.width);
          std::iota(perm.begin(), perm.end(), int64_t(l) * sj.width);
          PhiloxStream rng(options.seed, rng_stream(RngPurpose::permutation, static_cast<uint32_t>(j),
                                                    (static_cast<uint32_t>(e) << 16) | static_cast<uint32_t>(l)));
          for (int k = sj.width - 1; k > 0; --k) std::swap(perm[k], perm[rng.next_below(k + 1)]);
          for (int k = 0; k < si.width; ++k) {
            const int64_t n = int64_t(l) * si.width + k;
            permutation_null[e][n] += r(n, perm[k]);
          }
        }
      }
      for (int64_t n = 0; n < Ni; ++n) {
        const int col = actual.column[n];
        neurons[n].partners.push_back({j, col / sj.width, col % sj.width, actual.value[n], baseline[n]});
        for (auto& null : rotation_null) null[n] -= baseline[n];
        for (auto& null : permutation_null) null[n] -= baseline[n];
      }
    }
    // Excess: the mean over partners of r - baseline; the nulls likewise.
    const double partners = K - 1;
    for (auto& nr : neurons) {
      double sum = 0;
      for (const auto& p : nr.partners) sum += p.r - p.baseline;
      nr.excess = nr.dead ? 0.0 : sum / partners;
      nr.universal = !nr.dead && nr.excess > options.threshold;
    }
    for (int l = 0; l < si.layers; ++l) {
      LayerSummary ls{i, l, si.width, 0, 0, {}, {}};
      for (int k = 0; k < si.width; ++k) {
        const NeuronResult& nr = neurons[size_t(l) * si.width + k];
        ls.dead += nr.dead;
        ls.universal += nr.universal;
      }
      auto count_null = [&](const std::vector<std::vector<double>>& nulls, NullCount& into) {
        for (const auto& null : nulls) {
          int count = 0;
          for (int k = 0; k < si.width; ++k) {
            const int64_t n = int64_t(l) * si.width + k;
            count += !neurons[n].dead && null[n] / partners > options.threshold;
          }
          into.counts.push_back(count);
        }
      };
      count_null(rotation_null, ls.rotation_null);
      count_null(permutation_null, ls.permutation_null);
      out.layers.push_back(std::move(ls));
    }
    out.neurons.insert(out.neurons.end(), neurons.begin(), neurons.end());
  }

  // Totals and the verdict against the largest applicable null.
  auto total = [&](NullCount LayerSummary::*which) {
    NullCount t;
    if (out.layers.empty() || !(out.layers[0].*which).applies()) return t;
    t.counts.assign((out.layers[0].*which).counts.size(), 0);
    for (const auto& ls : out.layers)
      for (size_t e = 0; e < t.counts.size(); ++e) t.counts[e] += (ls.*which).counts[e];
    return t;
  };
  out.rotation_null = total(&LayerSummary::rotation_null);
  out.permutation_null = total(&LayerSummary::permutation_null);
  for (const auto& ls : out.layers) out.universal += ls.universal;
  int64_t live = 0;
  for (const auto& nr : out.neurons) live += !nr.dead;

  char text[512];
  std::snprintf(text, sizeof text, "%d of %lld neurons are universal (excess correlation above %.2f, %s matching)",
                out.universal, static_cast<long long>(live), options.threshold, to_string(options.match).c_str());
  std::string verdict = text;
  const NullCount* strongest = nullptr;
  for (const NullCount* n : {&out.rotation_null, &out.permutation_null})
    if (n->applies() && (!strongest || chance_bound(*n) > chance_bound(*strongest))) strongest = n;
  if (!strongest) {
    out.verdict = verdict + "; no null draws were made, so chance is not known.";
    return out;
  }
  out.exceeds_chance = out.universal > chance_bound(*strongest);
  if (out.permutation_null.applies()) {
    std::snprintf(text, sizeof text, "; random partner permutations flag %.1f ± %.1f", out.permutation_null.mean(),
                  out.permutation_null.sd());
    verdict += text;
  }
  if (out.rotation_null.applies()) {
    std::snprintf(text, sizeof text, "%s random rotations %.1f ± %.1f", out.permutation_null.applies() ? " and" : ";",
                  out.rotation_null.mean(), out.rotation_null.sd());
    verdict += text;
  }
  verdict += out.exceeds_chance ? ": the observed count exceeds what chance gives."
                                : ": the observed count does not exceed what chance gives.";
  out.verdict = verdict;
  return out;
}

}  // namespace univ
