// When launch_chained's launches chain (include/univ/cuda/chained_launch.hpp).
#include "univ/cuda/chained_launch.hpp"

#include "univ/cuda/check.hpp"

namespace univ::cuda {

namespace {

thread_local bool chaining = false;

bool device_chains() {
  static const bool hopper_or_later = [] {
    int device = 0, major = 0;
    UNIV_CUDA_CHECK(cudaGetDevice(&device));
    UNIV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 9;
  }();
  return hopper_or_later;
}

}  // namespace

ChainedLaunches::ChainedLaunches(bool on) : before_(chaining) { chaining = on; }
ChainedLaunches::~ChainedLaunches() { chaining = before_; }

bool chains_launches(cudaStream_t stream) {
  if (!chaining || !device_chains()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaGraphNode_t* follows = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t count = 0;
  UNIV_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, nullptr, &follows, &edges, &count));
  if (status != cudaStreamCaptureStatusActive || count != 1) return false;
  cudaGraphNodeType type{};
  UNIV_CUDA_CHECK(cudaGraphNodeGetType(follows[0], &type));
  return type == cudaGraphNodeTypeKernel;
}

}  // namespace univ::cuda
