// Device selection and the backend factory.
#include "univ/backend.hpp"
#include "univ/error.hpp"

#ifdef UNIV_HAVE_CUDA
#include "univ/cuda/device_query.hpp"
#endif

namespace univ {

std::unique_ptr<TrainBackend> make_cpu_backend(const RunConfig& config);

std::string to_string(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

int cuda_device_count() {
#ifdef UNIV_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

Device resolve_device(const std::string& flag) {
  if (flag == "cpu" || flag == "auto") return Device::cpu;  // the CUDA trainer arrives with the CUDA backend
  if (flag == "cuda") {
#ifndef UNIV_HAVE_CUDA
    throw UserError("--device cuda: this build has no CUDA support (nvcc was not found when it was configured)");
#else
    if (cuda_device_count() == 0) throw UserError("--device cuda: no CUDA device is available");
    throw UserError("--device cuda: the CUDA training backend is not part of this build yet; use --device cpu");
#endif
  }
  throw UserError("unknown --device '" + flag + "' (expected auto, cpu or cuda)");
}

std::unique_ptr<TrainBackend> make_backend(Device device, const RunConfig& config) {
  if (device == Device::cpu) return make_cpu_backend(config);
  throw UserError("the CUDA training backend is not part of this build yet");
}

}  // namespace univ
