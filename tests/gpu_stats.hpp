// CudaStatsAccumulator's statistics of activations held on the host, shared by the GPU
// tests and the host emulator's check of the same code.
#pragma once
#include <cstdint>
#include <vector>

#include "univ/cuda/check.hpp"
#include "univ/cuda/memory.hpp"
#include "univ/stats.hpp"

namespace univ::testing {

// Statistics of acts[m] rows [0, n) added `chunk` rows at a time from device memory,
// float32 sums over spans of `span` tokens (0: the default) of products of `split`
// parts, `spans_per_pass` of them per float64 pass (0: the default).
inline CorrelationStats gpu_stats(const std::vector<std::vector<float>>& acts, const std::vector<NeuronShape>& shapes,
                                  const std::vector<int64_t>& chunks, int64_t span = 0,
                                  SplitPrecision split = SplitPrecision::f16, int spans_per_pass = 0) {
  std::vector<cuda::DeviceBuffer<float>> device;
  for (const auto& a : acts) {
    device.emplace_back(a.size());
    device.back().upload(a.data(), a.size(), nullptr);
  }
  UNIV_CUDA_CHECK(cudaDeviceSynchronize());
  CudaStatsAccumulator acc(shapes, span, split, spans_per_pass);
  int64_t at = 0;
  for (int64_t n : chunks) {
    std::vector<const float*> ptrs;
    for (size_t m = 0; m < shapes.size(); ++m) ptrs.push_back(device[m].data() + at * shapes[m].neurons());
    acc.add(ptrs, n);
    at += n;
  }
  return acc.stats();
}

}  // namespace univ::testing
