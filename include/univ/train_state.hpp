// Everything a training run needs to continue bit for bit, on the host.
#pragma once
#include <cstdint>
#include <vector>

namespace univ {

// Flat buffers laid out by ParamLayout (size ParamLayout::total()).
struct TrainState {
  std::vector<float> params, exp_avg, exp_avg_sq;
  int64_t step = 0;  // updates done
};

}  // namespace univ
