// Hopper warpgroup MMA (wgmma) for the prefill's tensor-core kernels: a warpgroup (4 warps, 128
// threads) computes D[64 x N] (+)= A[64 x 16] B[16 x N], fp32 accumulation. A comes from
// registers in mma.sync's m16n8k16 A-fragment layout (warp w of the warpgroup holds rows 16 w ..
// 16 w + 15), so Q fragments and P (the softmax numerators) feed it unchanged; B is read from
// shared memory through a matrix descriptor. D uses mma.sync's accumulator layout: d[i][0..1]
// are row gid, columns 8 i + 2 tig + {0, 1}; d[i][2..3] are row gid + 8.
//
// Shared-memory layout (128-byte swizzle): a tile of 64 rows of W 16-bit elements is stored as
// W / 64 column blocks of [64 rows][64 elements] (8 KB each, 1024-byte aligned); inside a block,
// the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of that row. K tiles (rows = keys) are
// read as a K-major B operand of S = Q K^T, V tiles (rows = keys) as an MN-major (transposed) B
// operand of O += P V. copy_rows_sw128 (prefill/prefill_kernels.cuh) writes such tiles.
//
// Only sm_90a has these instructions: everything below is compiled where NSA_HAS_WGMMA is 1,
// and the callers keep their mma.sync path for the other targets.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common/wgmma_desc.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_HAS_WGMMA 1
#else
#define NSA_HAS_WGMMA 0
#endif

namespace nsa::cuda {

#if NSA_HAS_WGMMA

// Orders this thread's generic-proxy shared-memory writes (cp.async included) before later
// async-proxy reads (wgmma operands); call after the writes, before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Register accesses before it are ordered before the next wgmma (accumulators, A fragments).
__device__ __forceinline__ void wg_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator reads or writes across a wgmma wait.
template <int R, int C>
__device__ __forceinline__ void wg_fence_regs(float (&d)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
  }
}

#define NSA_WG_ACC2(i)                                                             \
  "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3]), "+f"(d[(i) + 1][0]), \
      "+f"(d[(i) + 1][1]), "+f"(d[(i) + 1][2]), "+f"(d[(i) + 1][3])
// Operand lists: accumulators, then A (4 registers), the B descriptor and scale-d.
#define NSA_WG_D64                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
  "{%32, %33, %34, %35}, %36, p"
#define NSA_WG_SCALE64 "setp.ne.b32 p, %37, 0;\n"
#define NSA_WG_D128                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
  "{%64, %65, %66, %67}, %68, p"
#define NSA_WG_SCALE128 "setp.ne.b32 p, %69, 0;\n"
#define NSA_WG_OP(shape, type) "wgmma.mma_async.sync.aligned." shape ".f32." type "." type " "

// One register-A wgmma of shape "m64nNk16" and element type "bf16" / "f16" (string literals).
#define NSA_WG_RS64(type)                                                                  \
  asm volatile("{\n.reg .pred p;\n" NSA_WG_SCALE64 NSA_WG_OP("m64n64k16", type) NSA_WG_D64 \
               ", 1, 1, %38;\n}\n"                                                         \
               : NSA_WG_ACC2(0), NSA_WG_ACC2(2), NSA_WG_ACC2(4), NSA_WG_ACC2(6)            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d),      \
                 "n"(kTransB))
#define NSA_WG_RS128(type)                                                                       \
  asm volatile("{\n.reg .pred p;\n" NSA_WG_SCALE128 NSA_WG_OP("m64n128k16", type) NSA_WG_D128    \
               ", 1, 1, %70;\n}\n"                                                               \
               : NSA_WG_ACC2(0), NSA_WG_ACC2(2), NSA_WG_ACC2(4), NSA_WG_ACC2(6), NSA_WG_ACC2(8), \
                 NSA_WG_ACC2(10), NSA_WG_ACC2(12), NSA_WG_ACC2(14)                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d),            \
                 "n"(kTransB))

// D[64 x N] (+)= A B, A from registers, B by descriptor; kTransB: B is MN-major. scale_d == 0
// overwrites D. N = 64 or 128.
template <typename T, int N, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                         uint64_t desc, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && kBf16) {
    NSA_WG_RS64("bf16");
  } else if constexpr (N == 64) {
    NSA_WG_RS64("f16");
  } else if constexpr (kBf16) {
    NSA_WG_RS128("bf16");
  } else {
    NSA_WG_RS128("f16");
  }
}

#undef NSA_WG_RS64
#undef NSA_WG_RS128

// D[64 x 64] (+)= A B, A and B K-major from shared memory by descriptor (A: the 64 rows of this
// warpgroup). scale_d == 0 overwrites D.
template <typename T>
__device__ __forceinline__ void wgmma_ss64(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                           int scale_d) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
#define NSA_WG_SS64(type) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" NSA_WG_OP("m64n64k16", type)     \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "       \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
               "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                \
               : NSA_WG_ACC2(0), NSA_WG_ACC2(2), NSA_WG_ACC2(4), NSA_WG_ACC2(6)                \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))
  if constexpr (kBf16) {
    NSA_WG_SS64("bf16");
  } else {
    NSA_WG_SS64("f16");
  }
#undef NSA_WG_SS64
}

#undef NSA_WG_ACC2
#undef NSA_WG_D64
#undef NSA_WG_SCALE64
#undef NSA_WG_D128
#undef NSA_WG_SCALE128
#undef NSA_WG_OP

#endif  // NSA_HAS_WGMMA

}  // namespace nsa::cuda
