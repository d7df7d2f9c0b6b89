// Storage-type conversions and small numeric helpers shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/index_math.h"

namespace nsa::cuda {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// Programmatic dependent launch (Hopper): a kernel lets the next one in the stream start its
// blocks early (launch_dependents) and waits for its predecessor's results (wait) before it
// touches them. Both are no-ops on older GPUs and without the launch attribute.
// `enabled` is 0 when the backend launches without the attribute: the instructions are then
// not executed at all (compute-sanitizer's racecheck cannot handle them).
__device__ __forceinline__ void pdl_wait(int enabled) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (enabled) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents(int enabled) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (enabled) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// 2^x by the special-function unit alone (ex2.approx.ftz): exp2f adds a fix-up for subnormal
// results (a compare and two multiplies), which the softmax weights never need; results below
// 2^-126 are 0 here, and exp2_ftz(-inf) = 0 as with exp2f.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int64_t num_cmp(int64_t L, int64_t l, int64_t d) {
  return L < l ? 0 : div32(L - l, d) + 1;
}

__device__ __forceinline__ int64_t overlap(int64_t i, int64_t j, int64_t l, int64_t d,
                                           int64_t l_sel) {
  const int64_t lo = max(i * d, j * l_sel);
  const int64_t hi = min(i * d + l, (j + 1) * l_sel);
  return hi > lo ? hi - lo : 0;
}

}  // namespace nsa::cuda
