// Error checking for CUDA runtime and cuBLAS calls: failures become nsa::Error with file and line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "nsa/error.h"

#define NSA_CUDA_CHECK(expr)                                                                       \
  do {                                                                                             \
    const cudaError_t nsa_err_ = (expr);                                                           \
    if (nsa_err_ != cudaSuccess) {                                                                 \
      NSA_FAIL("CUDA error '{}' at {}:{} in {}", cudaGetErrorString(nsa_err_), __FILE__, __LINE__, \
               #expr);                                                                             \
    }                                                                                              \
  } while (0)

// Checks the launch just made (configuration errors surface here, not at the next sync).
#define NSA_CUDA_CHECK_LAUNCH() NSA_CUDA_CHECK(cudaGetLastError())

#define NSA_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                          \
    const cublasStatus_t nsa_st_ = (expr);                                                      \
    if (nsa_st_ != CUBLAS_STATUS_SUCCESS) {                                                     \
      NSA_FAIL("cuBLAS error {} at {}:{} in {}", static_cast<int>(nsa_st_), __FILE__, __LINE__, \
               #expr);                                                                          \
    }                                                                                           \
  } while (0)
