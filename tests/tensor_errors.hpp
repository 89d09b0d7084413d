// Relative errors: of whole buffers, and of parameter-shaped buffers one model's tensor
// at a time (a small error in one tensor shows, which the norm over all parameters
// would hide). Without GoogleTest, so that the host emulator's checks share it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "univ/param_layout.hpp"

namespace univ::testing {

// ||got - expect|| / ||expect|| over n elements; infinite where got is not finite.
template <class A, class B>
double relative_error(const A* got, const B* expect, int64_t n) {
  double diff = 0, ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(double(got[i]))) return INFINITY;
    diff += (double(got[i]) - double(expect[i])) * (double(got[i]) - double(expect[i]));
    ref += double(expect[i]) * double(expect[i]);
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-300);
}

template <class A, class B>
double relative_error(const std::vector<A>& got, const std::vector<B>& expect) {
  return relative_error(got.data(), expect.data(), static_cast<int64_t>(got.size()));
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
