// Deterministic GPT-2 style initialisation from Philox streams.
#include "univ/init.hpp"

#include <cmath>

#include "univ/philox.hpp"

namespace univ {

template <class F>
void init_parameters(const ParamLayout& layout, const ModelConfig& config, const std::vector<uint64_t>& seeds,
                     F* params) {
  const double std_normal = 0.02;
  const double std_residual = 0.02 / std::sqrt(2.0 * config.layers);
  const auto& tensors = layout.tensors();
  for (int m = 0; m < layout.models(); ++m)
    for (size_t i = 0; i < tensors.size(); ++i) {
      const ParamTensor& t = tensors[i];
      F* out = params + layout.offset(t, m);
      switch (t.init) {
        case ParamInit::zeros:
        case ParamInit::ones:
          for (int64_t k = 0; k < t.numel; ++k) out[k] = F(t.init == ParamInit::ones ? 1 : 0);
          break;
        case ParamInit::normal:
        case ParamInit::residual_normal: {
          const double stddev = t.init == ParamInit::normal ? std_normal : std_residual;
          PhiloxStream rng(seeds.at(m), rng_stream(RngPurpose::init, static_cast<uint32_t>(i)));
          for (int64_t k = 0; k < t.numel; ++k) out[k] = static_cast<F>(stddev * rng.next_normal());
          break;
        }
      }
    }
}

template void init_parameters<float>(const ParamLayout&, const ModelConfig&, const std::vector<uint64_t>&, float*);
template void init_parameters<double>(const ParamLayout&, const ModelConfig&, const std::vector<uint64_t>&, double*);

}  // namespace univ
