// correlate's GPU streaming paths (CUDA builds only); the CPU functions in
// correlate.hpp and activations.hpp dispatch here for Device::cuda.
#pragma once
#include <functional>
#include <vector>

#include "univ/activations.hpp"
#include "univ/correlate.hpp"

namespace univ {

StreamResult stream_statistics_cuda(const std::vector<LoadedModel>& models, const HeldOutTokens& tokens, Site site,
                                    int batch, const std::function<void(const StreamProgress&)>& progress);

// Rows [first, last) of every model's activation files.
StreamResult stream_activation_statistics_cuda(const std::vector<ActivationModel>& models, int64_t first,
                                               int64_t last, int64_t chunk,
                                               const std::function<void(const StreamProgress&)>& progress);

}  // namespace univ
