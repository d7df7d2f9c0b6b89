// The decode step's projections at a few rows: out[r, n] = sum_k a[r, k] w[n, k] (w row-major
// [N, K], fp32 accumulation and output) for R <= kGemvMaxRows rows, one warp per output row n
// reading w once for all R rows. cuBLAS's GEMM kernels take ~9.5 us for the seed's 1 MB W_in at
// one row (docs/perf-cuda-decode.md, fourteenth session), where the bytes take ~1 us.
#pragma once

#include "cuda/common/types.cuh"

namespace nsa::cuda {

constexpr int kGemvMaxRows = 4;
constexpr int kGemvThreads = 256;  // 8 output rows per block

// 16 bytes of T as floats.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16 / sizeof(T)]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) v[i] = to_f32(e[i]);
}

// kVec: w and a rows start at 16-byte boundaries (K * sizeof(T) % 16 == 0 and aligned bases),
// so each lane reads 16 bytes at a time; else one element at a time. pdl: StepParams::pdl.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kGemvThreads)
    nsa_gemv_kernel(const T* __restrict__ w, const T* __restrict__ a, float* __restrict__ out,
                    int N, int K, int R, int pdl) {
  pdl_wait(pdl);
  pdl_launch_dependents(pdl);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int n =
      static_cast<int>(blockIdx.x) * (kGemvThreads / 32) + static_cast<int>(threadIdx.x / 32);
  if (n >= N) return;
  const T* wn = w + static_cast<int64_t>(n) * K;
  float acc[kGemvMaxRows] = {};
  if constexpr (kVec) {
    constexpr int kE = 16 / sizeof(T);  // elements per 16-byte load
    // Two loads of w in flight per lane per step (64 lanes' worth of 16 bytes = 1 KB per warp).
    for (int k0 = lane * kE; k0 < K; k0 += 64 * kE) {
      float wv[2][kE];
      const bool second = k0 + 32 * kE < K;
      load16(wn + k0, wv[0]);
      if (second) load16(wn + k0 + 32 * kE, wv[1]);
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r) {
        if (r >= R) break;
        float av[kE];
        load16(a + static_cast<int64_t>(r) * K + k0, av);
#pragma unroll
        for (int i = 0; i < kE; ++i) acc[r] += wv[0][i] * av[i];
        if (second) {
          load16(a + static_cast<int64_t>(r) * K + k0 + 32 * kE, av);
#pragma unroll
          for (int i = 0; i < kE; ++i) acc[r] += wv[1][i] * av[i];
        }
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      const float wk = to_f32(wn[k]);
#pragma unroll
      for (int r = 0; r < kGemvMaxRows; ++r) {
        if (r < R) acc[r] += wk * to_f32(a[static_cast<int64_t>(r) * K + k]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvMaxRows; ++r) {
    if (r >= R) break;
    float v = acc[r];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) out[static_cast<int64_t>(r) * N + n] = v;
  }
}

}  // namespace nsa::cuda
