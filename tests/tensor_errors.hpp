// Relative errors of parameter-shaped buffers, one model's tensor at a time: a small
// error in one tensor shows, which the norm over all parameters would hide. Without
// GoogleTest, so that the host emulator's checks share it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "univ/param_layout.hpp"

namespace univ::testing {

// ||got - expect|| / ||expect|| over n elements; infinite where got is not finite.
inline double relative_error(const float* got, const float* expect, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (double(got[i]) - expect[i]) * (double(got[i]) - expect[i]);
    den += double(expect[i]) * expect[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

struct TensorError {
  double error = 0;
  std::string tensor;  // "name of model m"
};

// The largest relative error of one model's tensor, and which.
inline TensorError worst_tensor_error(const ParamLayout& layout, int models, const std::vector<float>& got,
                                      const std::vector<float>& expect) {
  TensorError worst;
  for (const auto& t : layout.tensors())
    for (int m = 0; m < models; ++m) {
      const int64_t at = layout.offset(t, m);
      const double error = relative_error(got.data() + at, expect.data() + at, t.numel);
      if (error >= worst.error) worst = {error, t.name + " of model " + std::to_string(m)};
    }
  return worst;
}

}  // namespace univ::testing
