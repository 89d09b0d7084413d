// Device selection and the backend factory.
#include "univ/backend.hpp"
#include "univ/error.hpp"

#include <cmath>

#ifdef UNIV_HAVE_CUDA
#include "univ/cuda/device_query.hpp"
#endif

namespace univ {

std::unique_ptr<TrainBackend> make_cpu_backend(const RunConfig& config);
#ifdef UNIV_HAVE_CUDA
std::unique_ptr<TrainBackend> make_cuda_backend(const RunConfig& config, Precision precision, CudaFusion fusion,
                                                CudaLaunch launch);
#endif

std::string to_string(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

std::string describe_fault(const StepStats& stats, const ParamLayout& layout, const std::vector<float>& params,
                           const std::vector<float>& grads) {
  auto first_nonfinite = [&](const std::vector<float>& buffer, int m) -> const ParamTensor* {
    for (const auto& t : layout.tensors()) {
      const float* x = buffer.data() + layout.offset(t, m);
      for (int64_t i = 0; i < t.numel; ++i)
        if (!std::isfinite(x[i])) return &t;
    }
    return nullptr;
  };
  for (size_t m = 0; m < stats.loss.size(); ++m) {
    const bool bad_loss = !std::isfinite(stats.loss[m]);
    if (!bad_loss && std::isfinite(stats.grad_norm[m])) continue;
    const std::string model = "model " + std::to_string(m);
    std::string what = bad_loss ? "the loss of " + model + " is " + std::to_string(stats.loss[m])
                                : "the gradient norm of " + model + " is " + std::to_string(stats.grad_norm[m]);
    if (const ParamTensor* t = first_nonfinite(params, static_cast<int>(m)))
      what += " (its parameter " + t->name + " holds a non-finite value)";
    else if (const ParamTensor* g = first_nonfinite(grads, static_cast<int>(m)))
      what += " (the gradient of its " + g->name + " is not finite)";
    return what;
  }
  return "";
}

int cuda_device_count() {
#ifdef UNIV_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

void select_cuda_device(int index) {
#ifdef UNIV_HAVE_CUDA
  if (const int count = cuda::device_count(); count > 0) cuda::select_device(index % count);
#else
  (void)index;
#endif
}

Device resolve_device(const std::string& flag) {
  if (flag == "cpu") return Device::cpu;
  if (flag == "auto") return cuda_device_count() > 0 ? Device::cuda : Device::cpu;
  if (flag == "cuda") {
#ifndef UNIV_HAVE_CUDA
    throw UserError("--device cuda: this build has no CUDA support (nvcc was not found when it was configured)");
#else
    if (cuda_device_count() == 0) throw UserError("--device cuda: no CUDA device is available");
    return Device::cuda;
#endif
  }
  throw UserError("unknown --device '" + flag + "' (expected auto, cpu or cuda)");
}

std::string to_string(Precision p) { return p == Precision::fp32 ? "fp32" : "tf32"; }

std::string to_string(CudaFusion f) {
  switch (f) {
    case CudaFusion::sublayers: return "sublayers";
    case CudaFusion::ops: return "ops";
    case CudaFusion::blocks: return "blocks";
  }
  return "?";
}

Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::fp32;
  if (name == "tf32") return Precision::tf32;
  throw UserError("unknown --precision '" + name + "' (expected fp32 or tf32)");
}

std::unique_ptr<TrainBackend> make_backend(Device device, const RunConfig& config, Precision precision,
                                           CudaFusion fusion, CudaLaunch launch) {
  if (device == Device::cpu) return make_cpu_backend(config);
#ifdef UNIV_HAVE_CUDA
  return make_cuda_backend(config, precision, fusion, launch);
#else
  (void)precision, (void)fusion, (void)launch;
  throw UserError("this build has no CUDA support");
#endif
}

}  // namespace univ
