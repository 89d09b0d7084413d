// From correlation statistics to universal neurons: correlations, the Haar rotation
// baseline applied algebraically, matching of partner neurons, and null counts.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "univ/backend.hpp"
#include "univ/stats.hpp"

namespace univ {

enum class MatchMode { index, max, one_to_one };
enum class MatchScope { layer, all };
std::string to_string(MatchMode m);
std::string to_string(MatchScope s);
MatchMode parse_match_mode(const std::string& name);  // UserError for unknown names
MatchScope parse_match_scope(const std::string& name);

struct AnalysisOptions {
  MatchMode match = MatchMode::index;
  MatchScope scope = MatchScope::layer;
  double threshold = 0.5;
  int baseline_draws = 8;  // rotations averaged into the baseline
  int null_draws = 8;      // further rotations (and, for index matching, partner permutations) for the nulls
  uint64_t seed = 0;
  Device device = Device::cpu;  // where the rotation draws run (the same draws either way)
  void validate() const;
};

// Assigns each row of the row-major rows x cols cost matrix (rows <= cols) its own
// column, minimising the total cost (Hungarian algorithm, O(rows^2 cols)).
std::vector<int> min_cost_assignment(const std::vector<double>& cost, int rows, int cols);

struct PartnerMatch {
  int partner = 0;      // the other model
  int layer = 0;        // matched neuron of the partner: layer and index within the layer
  int index = 0;
  double r = 0;         // correlation with it
  double baseline = 0;  // mean matched correlation when the partner's neurons are randomly rotated
};

struct NeuronResult {
  int model = 0, layer = 0, neuron = 0;  // neuron: index within the layer
  bool dead = false;                     // constant over the tokens: no correlation defined
  std::vector<PartnerMatch> partners;    // one per other model
  double excess = 0;                     // mean over partners of r - baseline
  bool universal = false;                // excess > threshold
};

// How many neurons a null model flags, over its draws.
struct NullCount {
  std::vector<int> counts;  // one per draw; empty when this null does not apply
  double mean() const;
  double sd() const;
  bool applies() const { return !counts.empty(); }
};

struct LayerSummary {
  int model = 0, layer = 0, neurons = 0, dead = 0, universal = 0;
  NullCount rotation_null;     // a further rotation draw in place of the partner
  NullCount permutation_null;  // index matching only: partners paired by a random permutation
};

struct Analysis {
  AnalysisOptions options;
  int64_t tokens = 0;
  std::vector<NeuronResult> neurons;  // model by model, layer by layer
  std::vector<LayerSummary> layers;
  int universal = 0;
  NullCount rotation_null, permutation_null;  // totals over all layers
  bool exceeds_chance = false;
  std::string verdict;  // one sentence: the observed count against the largest applicable null
};

// The rotation of draw `draw` for `model`: a Haar-random orthogonal [width, width]
// matrix per layer, from (seed, model, draw, layer) alone.
std::vector<std::vector<double>> rotation_matrices(const NeuronShape& shape, int model, int draw, uint64_t seed);

#ifdef UNIV_HAVE_CUDA
// rotation_matrices for draws [first_draw, first_draw + draws), drawn and factored on
// the current GPU: equal to the host's to rounding.
std::vector<std::vector<std::vector<double>>> rotation_matrices_cuda(const NeuronShape& shape, int model,
                                                                     int first_draw, int draws, uint64_t seed);
#endif

// Correlations [N_i, N_j] of model i's neurons with model j's neurons rotated layer
// by layer (b' = Q_l b), from the statistics alone: the co-moment becomes C Q^T and
// the variances diag(Q S_l Q^T). Without a rotation (q empty), the plain correlations.
std::vector<double> correlation_matrix(const CorrelationStats& stats, int i, int j,
                                       const std::vector<std::vector<double>>& q = {});

// correlation_matrix(stats, i, j)'s entries one at a time, equal to the bit: index
// matching and its permutation null need N_i of the N_i x N_j. Holds a reference to
// stats.
class PairCorrelations {
 public:
  PairCorrelations(const CorrelationStats& stats, int i, int j);
  double operator()(int64_t a, int64_t b) const;  // model i's neuron a with model j's neuron b

 private:
  const std::vector<double>& cross_;  // the stored block: [N_i, N_j] for i < j, else [N_j, N_i]
  bool stored_ij_;
  int64_t stored_cols_;
  std::vector<double> var_i_, var_j_;
};

// The threshold an observed count must pass to exceed a null: its mean plus three
// standard deviations (at least three times the Poisson deviation sqrt(max(mean, 1))).
double chance_bound(const NullCount& null);

#ifdef UNIV_HAVE_CUDA
// Every model's Haar matrices for the draws of `options`, drawn ahead of analyze() on
// the current GPU on a stream of their own: they do not depend on the statistics, so
// they can be drawn while the statistics stream. Nothing is drawn where they would
// not fit the device memory a batch of draws may take (2 GiB); analyze() then draws
// them in batches as usual.
class PreparedRotations {
 public:
  PreparedRotations(const std::vector<NeuronShape>& shapes, const AnalysisOptions& options);
  ~PreparedRotations();
  PreparedRotations(const PreparedRotations&) = delete;
  PreparedRotations& operator=(const PreparedRotations&) = delete;
  struct Device;  // the GPU baseline's
  const Device* device() const { return device_.get(); }  // null: nothing drawn

 private:
  std::unique_ptr<Device> device_;
};
#else
class PreparedRotations {};  // CPU-only builds: nothing to prepare
#endif

// UserError when the match mode does not fit the models (index and one-to-one need
// equal widths, scope layer equal layer counts) or there are fewer than 2 tokens.
// progress(done, total), when given, follows the rotation draws over all model pairs.
// On the GPU, rotations prepared for these models and options are used when given.
Analysis analyze(const CorrelationStats& stats, const AnalysisOptions& options,
                 const std::function<void(int done, int total)>& progress = {},
                 const PreparedRotations* prepared = nullptr);

}  // namespace univ
