// Host-and-device helpers for index arithmetic shared by the step parameters and the kernels.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define NSA_HOST_DEVICE __host__ __device__
#else
#define NSA_HOST_DEVICE
#endif

namespace nsa::cuda {

// a / b and a % b for 0 <= a and 0 < b, both below 2^31: counts and indices within one sequence
// or launch (the backend keeps cache capacities below 2^31 tokens; launch rows are far below).
// 32-bit division is a few instructions on the GPU, 64-bit division a long subroutine (~12 % of
// the fused decode kernel's samples in the v15 profile).
NSA_HOST_DEVICE inline int64_t div32(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
}
NSA_HOST_DEVICE inline int64_t mod32(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) % static_cast<uint32_t>(b));
}

}  // namespace nsa::cuda
