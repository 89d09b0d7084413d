// Parameter initialisation on the host from the counter-based RNG, so every backend
// starts from bit-identical weights.
#pragma once
#include <cstdint>
#include <vector>

#include "univ/config.hpp"
#include "univ/param_layout.hpp"

namespace univ {

// GPT-2's scheme: weights and embeddings N(0, 0.02), the two residual projections
// N(0, 0.02 / sqrt(2 * layers)), layer-norm weights 1, biases 0. Model m draws from
// seeds[m] only; params is the flat buffer of `layout` (padding left zero).
template <class F>
void init_parameters(const ParamLayout& layout, const ModelConfig& config, const std::vector<uint64_t>& seeds,
                     F* params);

}  // namespace univ
