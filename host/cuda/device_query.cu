// CUDA device discovery: how many GPUs, and what they are.
#include <cuda_runtime.h>

#include <string>

#include "univ/cuda/device_query.hpp"
#include "univ/error.hpp"

namespace univ::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

std::string device_description(int index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) return "unknown device";
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.totalGlobalMem >> 30) + " GiB)";
}

void select_device(int index) {
  const cudaError_t status = cudaSetDevice(index);
  if (status != cudaSuccess)
    throw UserError("cannot use GPU " + std::to_string(index) + ": " + cudaGetErrorString(status));
}

}  // namespace univ::cuda
