// Error checks for CUDA, cuBLAS and cuSOLVER calls: the call, file and line in the message.
#include <string>

#include "univ/cuda/check.hpp"
#include "univ/error.hpp"

namespace univ::cuda {

void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  const std::string where = std::string(call) + " at " + file + ":" + std::to_string(line);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw UserError("out of GPU memory (" + where + "): use a smaller --batch, model or fewer --models");
  }
  throw std::runtime_error("CUDA error " + std::string(cudaGetErrorName(status)) + " (" +
                           cudaGetErrorString(status) + ") in " + where);
}

void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  const std::string where = std::string(call) + " at " + file + ":" + std::to_string(line);
  if (status == CUBLAS_STATUS_ALLOC_FAILED) throw UserError("out of GPU memory (" + where + ")");
  throw std::runtime_error("cuBLAS error " + std::string(cublasGetStatusName(status)) + " in " + where);
}

void check_cusolver(cusolverStatus_t status, const char* call, const char* file, int line) {
  if (status == CUSOLVER_STATUS_SUCCESS) return;
  const std::string where = std::string(call) + " at " + file + ":" + std::to_string(line);
  if (status == CUSOLVER_STATUS_ALLOC_FAILED) throw UserError("out of GPU memory (" + where + ")");
  throw std::runtime_error("cuSOLVER error " + std::to_string(static_cast<int>(status)) + " in " + where);
}

}  // namespace univ::cuda
