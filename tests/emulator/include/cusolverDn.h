// The cuSOLVER calls of the rotation baseline (its QR of layers too wide for a QR per
// thread block), emulated on the host by LAPACK's, enqueued on the handle's stream.
#pragma once
#include "cuda_runtime.h"

extern "C" {  // LAPACK, as host/rotation.cpp declares it
void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work, const int* lwork,
             int* info);
void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau, double* work,
             const int* lwork, int* info);
}

typedef int cusolverStatus_t;
enum { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_ALLOC_FAILED = 2 };
struct EmuCusolver {
  cudaStream_t stream = nullptr;
};
typedef EmuCusolver* cusolverDnHandle_t;
inline cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* h) {
  *h = new EmuCusolver;
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t h) {
  delete h;
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t h, cudaStream_t s) {
  h->stream = s;
  return CUSOLVER_STATUS_SUCCESS;
}
// Workspace sizes: LAPACK's answers to a query (lwork -1).
inline cusolverStatus_t cusolverDnDgeqrf_bufferSize(cusolverDnHandle_t, int m, int n, double* a, int lda, int* lwork) {
  double size = 0;
  int query = -1, info = 0;
  dgeqrf_(&m, &n, a, &lda, nullptr, &size, &query, &info);
  *lwork = static_cast<int>(size);
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnDorgqr_bufferSize(cusolverDnHandle_t, int m, int n, int k, const double* a, int lda,
                                                    const double* tau, int* lwork) {
  double size = 0;
  int query = -1, info = 0;
  dorgqr_(&m, &n, &k, const_cast<double*>(a), &lda, tau, &size, &query, &info);
  *lwork = static_cast<int>(size);
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnDgeqrf(cusolverDnHandle_t h, int m, int n, double* a, int lda, double* tau,
                                         double* work, int lwork, int* info) {
  emu::enqueue(h->stream, [=] { dgeqrf_(&m, &n, a, &lda, tau, work, &lwork, info); }, "cusolver geqrf");
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnDorgqr(cusolverDnHandle_t h, int m, int n, int k, double* a, int lda,
                                         const double* tau, double* work, int lwork, int* info) {
  emu::enqueue(h->stream, [=] { dorgqr_(&m, &n, &k, a, &lda, tau, work, &lwork, info); }, "cusolver orgqr");
  return CUSOLVER_STATUS_SUCCESS;
}
