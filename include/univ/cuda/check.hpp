// Every CUDA, cuBLAS and cuSOLVER call is checked; a failure names the call, file and line.
// Plain C++17: included by kernels (nvcc) and host code (g++) alike.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

namespace univ::cuda {

// Throws: UserError for out-of-memory (the user can shrink the run), std::runtime_error otherwise.
void check_cuda(cudaError_t status, const char* call, const char* file, int line);
void check_cublas(cublasStatus_t status, const char* call, const char* file, int line);
void check_cusolver(cusolverStatus_t status, const char* call, const char* file, int line);

}  // namespace univ::cuda

#define UNIV_CUDA_CHECK(call) ::univ::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define UNIV_CUBLAS_CHECK(call) ::univ::cuda::check_cublas((call), #call, __FILE__, __LINE__)
#define UNIV_CUSOLVER_CHECK(call) ::univ::cuda::check_cusolver((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch errors (bad configuration) surface here.
#define UNIV_CUDA_CHECK_LAUNCH() ::univ::cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
