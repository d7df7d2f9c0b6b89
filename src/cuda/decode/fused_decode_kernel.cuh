// The whole attention of a short decode step in one kernel (experimental,
// NSA_CUDA_FUSED_DECODE=on): prepare, the three branches, selection and combine.
#pragma once

#include <algorithm>

#include "cuda/decode/select_kernels.cuh"
#include "cuda/decode/step_kernels.cuh"

namespace nsa::cuda {

// Called by every block of the grid (row, group) x splits after its partials are written (block
// uniform): the last block of the (row, group) to arrive combines all its heads, and the last
// (row, group) advances the device length. weight: h x 3 x ws floats of shared memory, ws >= the
// splits of every branch (free for reuse: the caller is done with it).
template <typename T>
__device__ __forceinline__ void finish_row_group(const StepParams& p, int64_t rg, float* weight,
                                                 int64_t ws) {
  __shared__ bool last;
  __threadfence();  // this block's partials are visible before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(p.rg_done + rg, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  combine_heads<T>(p, div32(rg, p.G), mod32(rg, p.G), 0, p.h, weight, ws);
  if (threadIdx.x == 0) {
    p.rg_done[rg] = 0;
    finish_step(p, gridDim.x);
  }
}

// --- 6. The whole attention of a decode step in one kernel (short contexts) ------------------
// Grid (row, group) x P blocks of kFusedThreads. Every block of a (row, group) does the prepare,
// the compressed branch, the scoring and the selection itself (identical results, identical
// writes: cheap at short contexts, and no launch or grid-wide wait between them); then block y
// takes the selected split y and the window split y (n_sel_splits = n_win_splits = P,
// n_cmp_splits = 1). The last block of the (row, group) to finish combines. A decode step is
// then three graph nodes: the input GEMM, this kernel and the output GEMM. Experimental
// (NSA_CUDA_FUSED_DECODE=on): at the seed shape it measured no faster than the step kernels,
// because each phase inside it costs about what the kernel did alone (docs/perf-cuda-decode.md).
constexpr int kFusedThreads = kSelectThreads;

template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    nsa_fused_decode_kernel(const __grid_constant__ StepParams p) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ int32_t blocks_s[64];
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  float* smem = reinterpret_cast<float*>(fused_smem);
  const int64_t rg = blockIdx.x, r = div32(rg, p.G), g = mod32(rg, p.G), y = blockIdx.y;
  // Development aid (NSA_CUDA_KERNEL_TIMES=1): SM clock at each phase boundary, block (0, 0).
  const bool stamping = p.stamps != nullptr && rg == 0 && y == 0 && threadIdx.x == 0;
  auto stamp = [&](int i) {
    if (stamping) p.stamps[i] = clock64();
  };
  stamp(0);
  prepare_row<T>(p, r, g, 1, reinterpret_cast<double*>(fused_smem));
  __syncthreads();
  stamp(1);
  Split sp;
  if (split_range<T>(p, 0, rg, 0, sp)) ffma_attend<T>(p, sp, smem);
  stamp(2);
  for (int64_t c = 0; c * kScoreBlocks < p.nb_cap; ++c) {
    score_chunk(p, rg, c, smem);
    __syncthreads();
  }
  stamp(3);
  select_row(p, rg, smem);
  __syncthreads();
  stamp(4);
  if (split_range<T>(p, 1, rg, y, sp)) {
    stage_blocks(p, sp, blocks_s);
    ffma_attend<T>(p, sp, smem);
  }
  stamp(5);
  if (split_range<T>(p, 1, rg, p.n_sel_splits + y, sp)) ffma_attend<T>(p, sp, smem);
  stamp(6);
  finish_row_group<T>(p, rg, smem, gridDim.y);
  stamp(7);  // the (row, group)'s last block: after its combine
}

// Shared-memory bytes of nsa_fused_decode_kernel (its phases reuse one buffer).
inline size_t fused_smem_bytes(int64_t h, int64_t dk, int64_t dv, int64_t g_hid, int64_t l,
                               int64_t d, int64_t l_sel, int64_t nb_cap, int64_t splits) {
  return std::max({prepare_smem_bytes(h, dk, g_hid), ffma_smem_bytes(h, dk, dv),
                   score_smem_bytes(h, l, d, l_sel), select_smem_bytes(nb_cap),
                   sizeof(float) * static_cast<size_t>(h * 3 * splits)});
}

}  // namespace nsa::cuda
