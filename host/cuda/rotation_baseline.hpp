// The rotation baseline on the GPU (CUDA builds only): analyze() dispatches here for
// Device::cuda.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "univ/analysis.hpp"

namespace univ {

// Matched values of the rows of a correlation matrix [rows, cols] on the host, all of
// its columns open to every row.
using HostMatch = std::function<std::vector<double>(const std::vector<double>& r, int64_t rows, int64_t cols)>;

// The matched correlations of each model i's neurons with each other model j's under
// the rotation draws [0, draws) (rotation_matrices' draws): out[i * K + j] holds one
// [N_i] vector per draw (empty for i = j), computed on the current GPU in float64: the
// Haar matrices (each model's drawn once per batch of draws and used for all its
// partners), C Q^T (each layer's block where matches stay within layers), diag(Q S
// Q^T) and, for index and max matching, the match itself. One-to-one matching runs on
// the host: match_on_host gets each layer block, or each whole matrix. drawn(n) is
// told of every n draws done for a pair. Rotations prepared for these models, draws
// and seed are used instead of drawing them again.
std::vector<std::vector<std::vector<double>>> rotated_matches_cuda(const CorrelationStats& stats, int draws,
                                                                   const AnalysisOptions& options,
                                                                   const HostMatch& match_on_host,
                                                                   const std::function<void(int)>& drawn,
                                                                   const PreparedRotations* prepared);

}  // namespace univ
