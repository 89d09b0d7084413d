// The cuSOLVER names check.hpp declares; the emulated training backend calls none.
#pragma once
typedef int cusolverStatus_t;
enum { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_ALLOC_FAILED = 2 };
