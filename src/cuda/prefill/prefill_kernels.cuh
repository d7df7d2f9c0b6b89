// Prefill attention on tensor cores for 16-bit storage (issue 5). A launch covers rows of one
// sequence. A block of W warps takes a tile of 16 W MMA rows, each a (query, head) pair:
// 16 W / h consecutive queries times the h heads of one group (h divides 16), so every K/V tile
// it loads serves all the group's heads of several queries; each warp owns 16 rows
// (FlashAttention-2 style: S = Q K^T and O += P V with mma.sync m16n8k16, online softmax in
// registers), and every row keeps its own causal key range inside the kernel (no mask tensors).
//
// nsa_prefill_cmp_kernel: the compressed branch, fused with the scoring and the top-n. Pass 1
// streams the row's visible compressed keys (output and log-sum-exp); pass 2 streams the keys
// again, turns the logits into p_cmp with the final log-sum-exp, sums them over the group's
// heads and spreads them over the selection blocks in shared memory; then one warp per query
// picks the top-n. Only the selected blocks, their reads and the branch output leave the block:
// the [T, T/d] scores are never written to device memory.
// nsa_prefill_win_kernel: the sliding window, keys [t - w + 1, t] per row.
// The selected blocks then go through the decode kernel's gathered attention (one (query,
// group) per block, the h heads as MMA rows) and the step's LSE combine and gate.
#pragma once

#include <type_traits>

#include "cuda/common/wgmma.cuh"
#include "cuda/decode/attn_tc_kernel.cuh"
#include "cuda/decode/select_kernels.cuh"

namespace nsa::cuda {

// Warps per block: the backend instantiates W = 8 (128 rows), and on the wgmma path W = 4 (64
// rows, two blocks per SM: the default there) and W = 12 (192 rows, three warpgroups,
// NSA_CUDA_PREFILL_WARPS=12), where Q is a shared-memory operand so that 12 warps fit the
// registers.
template <int W>
struct PfWarps {
  static constexpr int kWarps = W, kThreads = 32 * W, kRows = 16 * W;
  static constexpr int kMinBlocks = W <= 8 ? 8 / W : 1;  // per SM, for __launch_bounds__
  static constexpr int kMaxChosen = 64;  // n_sel <= 64 (checked when the backend is built)
  // Static shared memory of the cmp kernel: each warp's chosen-block list.
  static constexpr size_t kCmpStaticSmem = size_t{W} * kMaxChosen * sizeof(int32_t);
};

template <int DK, int DV>
struct PfShape {
  static constexpr int kTile = static_cast<int>(kTileKeys);
  static constexpr int kLdK = DK + 8;  // 16-byte row padding: conflict-free ldmatrix
  static constexpr int kLdV = DV + 8;
  static constexpr int kKElems = kTile * kLdK;
  static constexpr int kVElems = kTile * kLdV;
  static constexpr size_t kPipeBytes = (2 * size_t{kKElems} + 2 * size_t{kVElems}) * 2;
};

// Dynamic shared memory of the compressed kernel beyond the K/V ring: the block scores
// [queries][nb_max] and the head-summed p_cmp of two tiles [2][queries][64].
inline size_t prefill_score_smem(int rows, int64_t h, int64_t nb_max) {
  return static_cast<size_t>((rows / h) * (nb_max + 2 * kTileKeys)) * sizeof(float);
}

// cp.async copies of nk consecutive rows of W elements (src row stride W) into dst (row stride
// LD); rows nk .. 63 are zero-filled. NT threads. Rows go in segments of up to 64 elements
// (8 chunks of 16 bytes), so a thread's copies differ by constant offsets (a dk-192 row is 24
// chunks, which would need a division per copy).
template <int W, int LD, int NT, typename T>
__device__ __forceinline__ void copy_rows_async(T* dst, const T* src, int nk) {
  constexpr int kSeg = W % 64 == 0 ? 64 : W;  // elements per segment (W is 32 or a multiple of 64)
  constexpr int kc = kSeg / 8;                // 16-byte chunks per segment
  constexpr int kRowStep = NT / kc;           // rows between one thread's copies
  constexpr int kRows = static_cast<int>(kTileKeys);
  static_assert(NT % kc == 0 && kRows % kRowStep == 0 && W % kSeg == 0, "copy layout");
  const int r0 = static_cast<int>(threadIdx.x) / kc, col = (static_cast<int>(threadIdx.x) % kc) * 8;
#pragma unroll
  for (int u = 0; u < kRows / kRowStep; ++u) {
    const int row = r0 + u * kRowStep;
    const bool ok = row < nk;
#pragma unroll
    for (int sg = 0; sg < W / kSeg; ++sg) {
      cp_async16(smem_addr(dst + row * LD + sg * kSeg + col),
                 (ok ? src + row * W : src) + sg * kSeg + col, ok);
    }
  }
}

// Element offset of (row, 16-byte chunk c of column block cb) in a 128-byte-swizzled 64-row
// tile (the wgmma layout, common/wgmma.cuh).
__device__ __forceinline__ int sw128_offset(int row, int cb, int c) {
  return cb * (kSwBlockBytes / 2) + row * kSwCols + ((c ^ (row & 7)) * 8);
}

// The same copies as copy_rows_async into a swizzled 64-row tile: rows nk .. 63 are zero-filled.
// Where a thread's rows differ by multiples of 8 its swizzle is one constant; other thread
// counts (384) copy chunk by chunk.
template <int W, int NT, typename T>
__device__ __forceinline__ void copy_rows_sw128(T* dst, const T* src, int nk) {
  static_assert(W % kSwCols == 0, "swizzled tiles hold rows of a multiple of 64 elements");
  constexpr int kRowStep = NT / 8;
  if constexpr (NT % 64 == 0 && 64 % kRowStep == 0) {
    const int r0 = static_cast<int>(threadIdx.x) / 8, c = static_cast<int>(threadIdx.x) % 8;
    const int sw = (c ^ (r0 & 7)) * 8;
#pragma unroll
    for (int u = 0; u < 64 / kRowStep; ++u) {
      const int row = r0 + u * kRowStep;
      const bool ok = row < nk;
#pragma unroll
      for (int cb = 0; cb < W / kSwCols; ++cb) {
        cp_async16(smem_addr(dst + cb * (kSwBlockBytes / 2) + row * kSwCols + sw),
                   (ok ? src + row * W : src) + cb * kSwCols + c * 8, ok);
      }
    }
  } else {
    constexpr int kc = W / 8;  // 16-byte chunks per row
#pragma unroll 4
    for (int i = static_cast<int>(threadIdx.x); i < 64 * kc; i += NT) {
      const int row = i / kc, c = i % kc;
      const bool ok = row < nk;
      cp_async16(smem_addr(dst + sw128_offset(row, c / 8, c % 8)),
                 (ok ? src + row * W : src) + c * 8, ok);
    }
  }
}

// Key range end of a row that does not exist: never narrows a tile's masking.
constexpr int64_t kNoRowEnd = int64_t{1} << 62;

// Phase clocks of the prefill kernels (NSA_CUDA_KERNEL_TIMES=2, a development aid): thread 0 of
// each block adds the SM clocks between phase boundaries to shared counters and at the end to
// p.stamps[base + phase]; entry kPfBlocks counts the blocks. Thread 0's warp runs in step with
// the others at every barrier, so its phases are the block's. The kernels without clocks
// (kOn = false, the default) compile to the same code as before.
enum PfPhase : int {
  kPfSetup,      // row set-up, the Q tile
  kPfP1Wait,     // pass 1: the next tile's copies issued, this tile's awaited, the barrier
  kPfP1Logits,   // pass 1: S = Q K^T
  kPfP1Softmax,  // pass 1: masks, running max, exponentials, rescaling
  kPfP1Pv,       // pass 1: O += P V
  kPfP1Barrier,  // pass 1: the end-of-tile barrier
  kPfP1Store,    // pass 1: normalisation and the partial's store
  kPfP2Wait,     // pass 2 (cmp kernel): copies and the barrier
  kPfP2Logits,   // pass 2: S = Q K^T
  kPfP2Exp,      // pass 2: p_cmp, head sums into shared memory
  kPfP2Barrier,  // pass 2: the barrier before the spread
  kPfP2Spread,   // pass 2: the spread over the selection blocks
  kPfTopN,       // the top-n and the block lists
  kPfBlocks = 15,
  kPfPhases = 16,  // entries per kernel in p.stamps (cmp kernel at 0, window kernel at 16)
};

template <bool kOn>
struct PfClock {
  long long* acc;  // shared [kPfPhases]
  long long t;
  __device__ explicit PfClock(long long* shared) : acc(shared), t(0) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kPfPhases; ++i) acc[i] = 0;
      t = clock64();
    }
  }
  __device__ void mark(PfPhase ph) {
    if (threadIdx.x == 0) {
      const long long now = clock64();
      acc[ph] += now - t;
      t = now;
    }
  }
  __device__ void flush(long long* out) const {
    if (threadIdx.x != 0) return;
    for (int i = 0; i < kPfBlocks; ++i) {
      if (acc[i] != 0) atomicAdd(reinterpret_cast<unsigned long long*>(out + i), acc[i]);
    }
    atomicAdd(reinterpret_cast<unsigned long long*>(out + kPfBlocks), 1ull);
  }
};

template <>
struct PfClock<false> {
  __device__ explicit PfClock(long long*) {}
  __device__ void mark(PfPhase) {}
  __device__ void flush(long long*) const {}
};

// The tile's rows as this thread sees them: MMA rows gid and gid + 8 of its warp.
struct PfRows {
  int64_t r0;       // first launch row of the tile
  int64_t t0;       // absolute position of the tile's first query
  int qt, n_valid;  // queries per tile, queries of the tile that exist
  int q[2], head[2];
  bool valid[2];
};

template <int ROWS>
__device__ __forceinline__ PfRows pf_rows(const StepParams& p) {
  PfRows rw;
  const int h = static_cast<int>(p.h), warp = threadIdx.x / 32, gid = (threadIdx.x % 32) / 4;
  rw.qt = ROWS / h;
  rw.r0 = static_cast<int64_t>(blockIdx.x) * rw.qt;
  rw.n_valid = static_cast<int>(min(static_cast<int64_t>(rw.qt), p.R - rw.r0));
  rw.t0 = *p.len + (p.row0 + rw.r0) % p.T;  // a launch's rows are consecutive positions
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int m = warp * 16 + gid + 8 * k;
    rw.q[k] = m / h;
    rw.head[k] = m % h;
    rw.valid[k] = rw.q[k] < rw.n_valid;
  }
  return rw;
}

// cp.async copies of the tile's NT / 2 Q rows (row m: query m / h, head m % h of group g; rows
// of queries that do not exist are zero) into shared memory, chunk c of row m at element
// dst(m, c); then waits for them. Every thread of the block calls it.
template <typename T, int DK, int NT, typename Dst>
__device__ __forceinline__ void copy_q_rows(const StepParams& p, const PfRows& rw, int64_t g,
                                            Dst&& dst) {
  constexpr int kc = DK / 8, kRows = NT / 2;
  const int h = static_cast<int>(p.h);
  const int h_shift = __ffs(h) - 1;  // h divides 16 (checked when the backend is built)
  const T* q0 = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kRows * kc; i += NT) {
    const int m = i / kc, c = i % kc, qi = m >> h_shift;
    const bool ok = qi < rw.n_valid;
    const T* src = ok ? q0 + ((rw.r0 + qi) * p.H + g * p.h + (m & (h - 1))) * DK + c * 8 : q0;
    cp_async16(smem_addr(dst(m, c)), src, ok);
  }
  cp_async_commit();
  cp_async_wait<0>();
}

// Q of this thread's rows as A fragments (rows that do not exist are zero): the tile's rows go
// through shared memory (qs: 16 W rows of DK + 8 elements, the K ring before it is used) with
// 16-byte copies, then ldmatrix; not 4-byte loads of scattered rows from device memory. Every
// thread of the block calls it.
template <typename T, int DK, int NT>
__device__ __forceinline__ void load_q_frags(const StepParams& p, const PfRows& rw, int64_t g,
                                             uint32_t (&qa)[DK / 16][4], T* qs) {
  constexpr int kLd = DK + 8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  copy_q_rows<T, DK, NT>(p, rw, g, [&](int m, int c) { return qs + m * kLd + c * 8; });
  __syncthreads();
#pragma unroll
  for (int kc16 = 0; kc16 < DK / 16; ++kc16) {
    ldmatrix_x4(qa[kc16],
                smem_addr(qs + (warp * 16 + (lane & 15)) * kLd + kc16 * 16 + (lane >> 4) * 8));
  }
  __syncthreads();  // qs is the K ring, which the caller fills next
}

// Q of the tile's 16 W rows into shared memory as wgmma A operands (the wgmma path with W > 8):
// one swizzled 64-row K-major tile of DK elements per warpgroup at qs + warpgroup * 64 DK (rows
// that do not exist are zero). Every thread of the block calls it; ends with a barrier.
template <typename T, int DK, int NT>
__device__ __forceinline__ void load_q_sw128(const StepParams& p, const PfRows& rw, int64_t g,
                                             T* qs) {
  copy_q_rows<T, DK, NT>(p, rw, g, [&](int m, int c) {
    return qs + (m / 64) * 64 * DK + sw128_offset(m % 64, c / 8, c % 8);
  });
#if NSA_HAS_WGMMA
  fence_proxy_async();
#endif
  __syncthreads();
}

// S = Q K^T of this warp's 16 rows and the 64 keys of the tile at ks (raw dot products).
template <typename T, int DK, int LDK>
__device__ __forceinline__ void tile_logits(const uint32_t (&qa)[DK / 16][4], const T* ks,
                                            float (&s)[8][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kc = 0; kc < DK / 16; ++kc) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t b[4];
      const int row = kk * 16 + (lane & 7) + ((lane >> 4) << 3),
                col = kc * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(b, smem_addr(ks + row * LDK + col));
      mma16816<T>(s[2 * kk], qa[kc], b[0], b[1]);
      mma16816<T>(s[2 * kk + 1], qa[kc], b[2], b[3]);
    }
  }
}

// Whether the prefill kernels multiply with warpgroup MMAs for these head dims (where the
// device runs the sm_90a code): dk a multiple of 64 and dv 128 (see PfRing).
constexpr bool pf_wgmma_dims(int dk, int dv) { return dk % 64 == 0 && dv == 128; }

// Dynamic shared memory of the K/V ring and, for the wgmma path with W > 8 warps, the Q tiles
// after it (the cmp kernel's scores follow). The host calls it with wgmma = whether the device
// runs the sm_90a code.
template <int DK, int DV, int W>
constexpr size_t pf_pipe_bytes(bool wgmma) {
  if (!wgmma || !pf_wgmma_dims(DK, DV) || W <= 8) return PfShape<DK, DV>::kPipeBytes;
  return 1024 + 2 * static_cast<size_t>(DK + DV) * kTileKeys * 2 +
         static_cast<size_t>(W / 4) * kTileKeys * DK * 2;
}

// The two-stage K/V ring of the prefill kernels. On sm_90a, for dk a multiple of 64 and dv 128,
// tiles are stored with the 128-byte swizzle and multiplied by warpgroup MMAs (wgmma,
// common/wgmma.cuh): a warpgroup's 4 warps are the 64 rows of one wgmma, with the same
// per-thread fragments as before; with W > 8 warps Q is a shared-memory operand too (q_tiles).
// Elsewhere rows are padded (ldmatrix without bank conflicts) and multiplied by mma.sync. dv 64
// stays on mma.sync: its P V as one m64n64k16 wgmma gave wrong outputs on the H100
// (docs/perf-cuda-prefill.md, v22) while dv 128 matches the CPU reference.
// Every thread of the block calls load, ready, logits and accumulate.
template <typename T, int DK, int DV, int NT>
struct PfRing {
  using Sh = PfShape<DK, DV>;
  static constexpr bool kWg = NSA_HAS_WGMMA && pf_wgmma_dims(DK, DV);
  static constexpr int kKStage = kWg ? DK * Sh::kTile : Sh::kKElems;  // elements per stage
  static constexpr int kVStage = kWg ? DV * Sh::kTile : Sh::kVElems;
  static constexpr size_t kBytes = pf_pipe_bytes<DK, DV, NT / 32>(kWg);
  // The swizzled ring starts at the next 1024-byte boundary: the padding of the unswizzled
  // layout (16 elements per row, 2 x 64 x 16 x 2 bytes) leaves room for it in kPipeBytes.
  static_assert(!kWg || 2 * (kKStage + kVStage) * 2 + 1024 <= kBytes, "ring fits");
  T* base;

  __device__ explicit PfRing(T* pipe) : base(pipe) {
    if constexpr (kWg) {
      const uint32_t a = smem_addr(pipe);
      base = pipe + (((a + 1023u) & ~1023u) - a) / sizeof(T);
    }
  }
  __device__ T* k(int stage) const { return base + stage * kKStage; }
  __device__ T* v(int stage) const { return base + 2 * kKStage + stage * kVStage; }
  // The Q tiles of the wgmma path with W > 8 (load_q_sw128): after the ring, 1024-aligned.
  __device__ T* q_tiles() const { return base + 2 * kKStage + 2 * kVStage; }

  // A tile of nk rows of kW elements into dst (padded rows of kLd elements off the wgmma path).
  template <int kW, int kLd>
  __device__ void load_rows(T* dst, const T* src, int nk) const {
    if constexpr (kWg) {
      copy_rows_sw128<kW, NT>(dst, src, nk);
    } else if constexpr (NT <= 256) {
      copy_rows_async<kW, kLd, NT>(dst, src, nk);
    } else {
      __trap();  // never launched: more than 8 warps only on the wgmma path
    }
  }
  __device__ void load_k(int stage, const T* src, int nk) const {
    load_rows<DK, Sh::kLdK>(k(stage), src, nk);
  }
  __device__ void load_v(int stage, const T* src, int nk) const {
    load_rows<DV, Sh::kLdV>(v(stage), src, nk);
  }

  // After cp_async_wait: the stage's copies are visible to every thread and to wgmma.
  __device__ void ready() const {
#if NSA_HAS_WGMMA
    if constexpr (kWg) fence_proxy_async();
#endif
    __syncthreads();
  }

  // S = Q K^T of this warp's 16 rows and the stage's 64 keys (raw dot products).
  __device__ void logits(const uint32_t (&qa)[DK / 16][4], int stage, float (&s)[8][4]) const {
#if NSA_HAS_WGMMA
    if constexpr (kWg) {
      const uint64_t d0 = desc_k_major(smem_addr(k(stage)), 0);
      wg_fence();
#pragma unroll
      for (int kc = 0; kc < DK / 16; ++kc) {
        wgmma_rs<T, 64, 0>(s, qa[kc], desc_moved(d0, k_major_offset(kc)), kc > 0 ? 1 : 0);
      }
      wg_commit();
      wg_wait<0>();
      wg_fence_regs(s);
      return;
    }
#endif
    tile_logits<T, DK, Sh::kLdK>(qa, k(stage), s);
  }

  // The same with Q from shared memory: q_tile is the shared address of this warpgroup's Q tile
  // (load_q_sw128). wgmma path only.
  __device__ void logits(uint32_t q_tile, int stage, float (&s)[8][4]) const {
#if NSA_HAS_WGMMA
    if constexpr (kWg) {
      const uint64_t dq = desc_k_major(q_tile, 0), dk = desc_k_major(smem_addr(k(stage)), 0);
      wg_fence();
#pragma unroll
      for (int kc = 0; kc < DK / 16; ++kc) {
        const uint32_t off = k_major_offset(kc);
        wgmma_ss64<T>(s, desc_moved(dq, off), desc_moved(dk, off), kc > 0 ? 1 : 0);
      }
      wg_commit();
      wg_wait<0>();
      wg_fence_regs(s);
      return;
    }
#endif
    (void)q_tile;
    (void)stage;
    __trap();  // never launched: the host takes W > 8 only where the wgmma path runs
  }

  // O += P V: P is the tile's exponentials s (rounded to 16 bits) as A fragments.
  __device__ void accumulate(const float (&s)[8][4], int stage, float (&o)[DV / 8][4]) const {
    uint32_t pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#if NSA_HAS_WGMMA
    if constexpr (kWg) {
      const uint64_t d0 = desc_mn_major(smem_addr(v(stage)), 0);
      wg_fence_regs(o);
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        wgmma_rs<T, DV, 1>(o, pa[kk], desc_moved(d0, mn_major_offset(kk)), 1);
      }
      wg_commit();
      wg_wait<0>();
      wg_fence_regs(o);
      return;
    }
#endif
    const int lane = threadIdx.x % 32;
    const T* vt = v(stage);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int nd = 0; nd < DV / 16; ++nd) {
        uint32_t b[4];
        ldmatrix_x4_trans(
            b, smem_addr(vt + (kk * 16 + (lane & 15)) * Sh::kLdV + nd * 16 + (lane >> 4) * 8));
        mma16816<T>(o[2 * nd], pa[kk], b[0], b[1]);
        mma16816<T>(o[2 * nd + 1], pa[kk], b[2], b[3]);
      }
    }
  }
};

// Pass 1 (pf_attend, pf_attend_ranges below) over keys [k0, k1) of K/V (rows of DK / DV
// elements from position 0): each row attends to its own range [lo, hi) (rows that do not exist:
// [0, kNoRowEnd), their Q is zero and their results are never stored). Leaves the row's output
// (normalised) in o and its log-sum-exp in log2 units in lse2 (-inf for a row without keys). The
// tile's Q as the A operand of S = Q K^T: fragments in registers (8 warps or fewer), or, on the
// wgmma path with more warps, one swizzled shared-memory tile per warpgroup after the K/V ring,
// which frees the fragments' DK / 4 registers per thread. Every thread calls load.
template <typename T, int DK, int DV, int NT>
struct PfQOperand {
  static constexpr bool kSmem = PfRing<T, DK, DV, NT>::kWg && NT > 256;
  using Frags = uint32_t[DK / 16][4];
  std::conditional_t<kSmem, uint32_t, Frags> q;

  __device__ void load(const StepParams& p, const PfRows& rw, int64_t g, T* pipe) {
    if constexpr (kSmem) {
      const PfRing<T, DK, DV, NT> ring(pipe);
      load_q_sw128<T, DK, NT>(p, rw, g, ring.q_tiles());
      q = smem_addr(ring.q_tiles() + (threadIdx.x / 128) * 64 * DK);
    } else if constexpr (NT <= 256) {
      static_assert(NT / 2 * (DK + 8) <= 2 * PfShape<DK, DV>::kKElems, "Q staging fits the ring");
      load_q_frags<T, DK, NT>(p, rw, g, q, pipe);
    } else {
      __trap();  // never launched: the host takes more than 8 warps only on the wgmma path
    }
  }
  __device__ const std::conditional_t<kSmem, uint32_t, Frags>& op() const { return q; }
};

// Keys [k0, k1) of K/V, and the keys [lo, hi) of them this thread's two rows see.
struct PfKeys {
  int64_t k0, k1;
  int64_t lo[2], hi[2];
};

// The same over kN ranges of keys one after another (the forced blocks: kN = 2), with one
// online softmax. qa: Q as A fragments, or the shared address of this warpgroup's Q tile
// (PfRing::logits).
template <typename T, int DK, int DV, int NT, int kN, typename Q, typename Clock>
__device__ __forceinline__ void pf_attend_ranges(const StepParams& p, const Q& qa, const T* K,
                                                 const T* V, const PfKeys (&ranges)[kN], T* pipe,
                                                 float (&o)[DV / 8][4], float (&lse2)[2],
                                                 Clock& clk) {
  static_assert(kN == 1 || kN == 2, "one or two key ranges");
  using Sh = PfShape<DK, DV>;
  constexpr int kTile = Sh::kTile;
  const int tig = threadIdx.x % 4;
  const PfRing<T, DK, DV, NT> ring(pipe);
  auto tiles = [&](const PfKeys& r) {
    return r.k1 > r.k0 ? (r.k1 - r.k0 + kTile - 1) / kTile : int64_t{0};
  };
  const int64_t n_first = tiles(ranges[0]);
  const int64_t n_tiles = n_first + (kN > 1 ? tiles(ranges[kN - 1]) : 0);
  // Tile it: its range and first key.
  auto range_of = [&](int64_t it) -> const PfKeys& {
    return kN > 1 && it >= n_first ? ranges[kN - 1] : ranges[0];
  };
  auto first_key = [&](int64_t it) {
    return kN > 1 && it >= n_first ? ranges[kN - 1].k0 + (it - n_first) * kTile
                                   : ranges[0].k0 + it * kTile;
  };
  auto issue = [&](int64_t it) {
    if (it < n_tiles) {
      const int64_t j0 = first_key(it);
      const int nk = static_cast<int>(min(static_cast<int64_t>(kTile), range_of(it).k1 - j0));
      ring.load_k(static_cast<int>(it & 1), K + j0 * DK, nk);
      ring.load_v(static_cast<int>(it & 1), V + j0 * DV, nk);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m[2] = {-FLT_MAX, -FLT_MAX}, l[2] = {0.f, 0.f};
  const float scale2 = p.scale * 1.4426950408889634f;  // logits in log2 units
  issue(0);
  for (int64_t it = 0; it < n_tiles; ++it) {
    issue(it + 1);
    cp_async_wait<1>();
    ring.ready();
    clk.mark(kPfP1Wait);
    const int stage = static_cast<int>(it & 1);
    const int64_t j0 = first_key(it);
    const PfKeys& rk = range_of(it);
    const int64_t lo[2] = {rk.lo[0], rk.lo[1]}, hi[2] = {rk.hi[0], rk.hi[1]};
    float s[8][4];
    ring.logits(qa, stage, s);
    clk.mark(kPfP1Logits);
    // Most tiles hold only keys every row of the warp sees: no per-key range test there. Else
    // the rows' ranges relative to the tile, as small ints.
    const bool full = __all_sync(
        0xffffffffu, lo[0] <= j0 && j0 + kTile <= hi[0] && lo[1] <= j0 && j0 + kTile <= hi[1]);
    if (!full) {
      int lo_r[2], hi_r[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        lo_r[k] = static_cast<int>(min(max(lo[k] - j0, int64_t{0}), int64_t{kTile}));
        hi_r[k] = static_cast<int>(min(max(hi[k] - j0, int64_t{0}), int64_t{kTile}));
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + tig * 2 + (e & 1), k = e >> 1;
          if (col < lo_r[k] || col >= hi_r[k]) s[nt][e] = -INFINITY;
        }
      }
    }
    float mx[2] = {-FLT_MAX, -FLT_MAX};  // of the raw logits (the scale is positive)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      mx[k] = fmaxf(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], 1));
      mx[k] = fmaxf(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], 2));
    }
    // The running max moves only where a row's tile max passes it by more than kLazyMax (log2
    // units), decided per warp: until then the numerators stay below 2^kLazyMax (fp32 and the
    // 16-bit P hold them) and l and O need no rescaling; the final normalisation divides by l
    // taken with the same max, so the result is the same up to rounding.
    constexpr float kLazyMax = 8.f;
    const bool move = __any_sync(
        0xffffffffu, mx[0] * scale2 > m[0] + kLazyMax || mx[1] * scale2 > m[1] + kLazyMax);
    float c[2] = {1.f, 1.f};
    if (move) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float n = fmaxf(m[k], mx[k] * scale2);
        c[k] = exp2_ftz(m[k] - n);
        m[k] = n;
      }
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // Scaled logit minus the running max in one FFMA; masked keys: exp2(-inf) = 0.
        s[nt][e] = exp2_ftz(fmaf(s[nt][e], scale2, -m[e >> 1]));
        sum[e >> 1] += s[nt][e];
      }
    }
    l[0] = l[0] * c[0] + sum[0];
    l[1] = l[1] * c[1] + sum[1];
    if (move) {
#pragma unroll
      for (int nd = 0; nd < DV / 8; ++nd) {
        o[nd][0] *= c[0];
        o[nd][1] *= c[0];
        o[nd][2] *= c[1];
        o[nd][3] *= c[1];
      }
    }
    clk.mark(kPfP1Softmax);
    ring.accumulate(s, stage, o);
    clk.mark(kPfP1Pv);
    __syncthreads();  // the stage is refilled by the next iteration's issue
    clk.mark(kPfP1Barrier);
  }
  cp_async_wait<0>();
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    l[k] += __shfl_xor_sync(0xffffffffu, l[k], 1);
    l[k] += __shfl_xor_sync(0xffffffffu, l[k], 2);
    lse2[k] = l[k] > 0.f ? m[k] + log2f(l[k]) : -INFINITY;
  }
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) {
    o[nd][0] *= inv[0];
    o[nd][1] *= inv[0];
    o[nd][2] *= inv[1];
    o[nd][3] *= inv[1];
  }
}

template <typename T, int DK, int DV, int NT, typename Q, typename Clock>
__device__ __forceinline__ void pf_attend(const StepParams& p, const Q& qa, const T* K, const T* V,
                                          int64_t k0, int64_t k1, const int64_t (&lo)[2],
                                          const int64_t (&hi)[2], T* pipe, float (&o)[DV / 8][4],
                                          float (&lse2)[2], Clock& clk) {
  const PfKeys r[1] = {{k0, k1, {lo[0], lo[1]}, {hi[0], hi[1]}}};
  pf_attend_ranges<T, DK, DV, NT, 1>(p, qa, K, V, r, pipe, o, lse2, clk);
}

// Writes a row's branch result as the only partial of its branch (slot): m = log-sum-exp in
// natural-log units, s = 1, o normalised; the combine kernel then reads it as one split.
template <int DV>
__device__ __forceinline__ void pf_store(const StepParams& p, const PfRows& rw, int64_t g,
                                         int64_t slot, const float (&o)[DV / 8][4],
                                         const float (&lse2)[2]) {
  const int tig = threadIdx.x % 4;
  const int64_t NS = n_splits_total(p);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (!rw.valid[k]) continue;
    const int64_t rg = (rw.r0 + rw.q[k]) * p.G + g;
    const int64_t at = (rg * NS + slot) * p.h + rw.head[k];
    const bool any = lse2[k] > -INFINITY;
    if (tig == 0) {
      p.part_m[at] = any ? lse2[k] * 0.6931471805599453f : -FLT_MAX;
      p.part_s[at] = any ? 1.f : 0.f;
    }
    float* out = p.part_o + at * DV;
#pragma unroll
    for (int nd = 0; nd < DV / 8; ++nd) {
      *reinterpret_cast<float2*>(out + nd * 8 + tig * 2) =
          make_float2(o[nd][2 * k], o[nd][2 * k + 1]);
    }
  }
}

// One butterfly level of pf_head_sums: values [0, kHalf) and [kHalf, 2 kHalf) of each array;
// the lower lane of the pair (bit clear) keeps the first half, the upper lane the second.
template <int kHalf, int kArrays>
__device__ __forceinline__ void pf_butterfly(float (&pc)[2][16], bool upper, int off) {
#pragma unroll
  for (int a = 0; a < kArrays; ++a) {
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float lo_v = pc[a][i], hi_v = pc[a][i + kHalf];
      const float send = upper ? lo_v : hi_v, keep = upper ? hi_v : lo_v;
      pc[a][i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
}

// Sums the p_cmp values pc[k][2 nt + c] of this thread's rows (gid + 8 k; keys nt * 8 + tig * 2
// + c of the tile) over the heads of each query and writes them to stage[query][key]. The heads
// of a query are the low kL = log2(h) bits of gid (h <= 8), or all 16 rows of the warp (kMerge,
// h = 16: rows gid and gid + 8 add first). Each of the kL butterfly levels exchanges half of a
// lane's values with the lane differing in one gid bit and keeps the other half summed, so a
// lane ends with 16 / 2^kL keys of its query(s): 14 shuffles for h = 16 instead of 48.
template <int kL, bool kMerge>
__device__ __forceinline__ void pf_head_sums(float (&pc)[2][16], const PfRows& rw, float* stage) {
  const int lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  constexpr int kArrays = kMerge ? 1 : 2;
  if constexpr (kMerge) {
#pragma unroll
    for (int i = 0; i < 16; ++i) pc[0][i] += pc[1][i];
  }
  // The value index (2 nt + c) this lane's first kept value stands for.
  const int idx0 = (kL >= 1 ? (gid & 1) * 8 : 0) + (kL >= 2 ? ((gid >> 1) & 1) * 4 : 0) +
                   (kL >= 3 ? ((gid >> 2) & 1) * 2 : 0);
  if constexpr (kL >= 1) pf_butterfly<8, kArrays>(pc, gid & 1, 4);
  if constexpr (kL >= 2) pf_butterfly<4, kArrays>(pc, (gid >> 1) & 1, 8);
  if constexpr (kL >= 3) pf_butterfly<2, kArrays>(pc, (gid >> 2) & 1, 16);
  constexpr int kKept = 16 >> kL;  // even for kL <= 3: pairs of adjacent keys
#pragma unroll
  for (int a = 0; a < kArrays; ++a) {
#pragma unroll
    for (int i = 0; i < kKept; i += 2) {
      const int idx = idx0 + i, col = (idx >> 1) * 8 + tig * 2;
      *reinterpret_cast<float2*>(stage + rw.q[a] * static_cast<int>(kTileKeys) + col) =
          make_float2(pc[a][i], pc[a][i + 1]);
    }
  }
}

// Whether any query of the tile needs the branch (gate non-zero, or every branch computed).
__device__ __forceinline__ bool pf_tile_needs(const StepParams& p, const PfRows& rw, int64_t g,
                                              int branch) {
  bool need = p.compute_all != 0;
  if (static_cast<int>(threadIdx.x) < rw.n_valid) {
    const float* gate = p.gates + ((rw.r0 + threadIdx.x) * p.G + g) * 3;
    need = need || branch_needed(p, gate, branch);
  }
  return __syncthreads_or(need) != 0;
}

// kClock: the phase clocks (PfClock), window kernel entries at p.stamps + kPfPhases.
template <typename T, int DK, int DV, int W, bool kClock = false>
__global__ void __launch_bounds__(PfWarps<W>::kThreads, PfWarps<W>::kMinBlocks)
    nsa_prefill_win_kernel(const __grid_constant__ StepParams p) {
  using Wp = PfWarps<W>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ long long clk_acc[kClock ? kPfPhases : 1];
  PfClock<kClock> clk(clk_acc);
  const int64_t g = blockIdx.y;
  const PfRows rw = pf_rows<Wp::kRows>(p);
  if (p.w <= 0 || !pf_tile_needs(p, rw, g, 2)) return;
  const int64_t b = (p.row0 + rw.r0) / p.T;
  int64_t lo[2], hi[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t t = rw.t0 + rw.q[k];
    lo[k] = rw.valid[k] ? max(int64_t{0}, t - p.w + 1) : 0;
    hi[k] = rw.valid[k] ? t + 1 : kNoRowEnd;
  }
  const int64_t k0 = max(int64_t{0}, rw.t0 - p.w + 1), k1 = rw.t0 + rw.n_valid;
  PfQOperand<T, DK, DV, Wp::kThreads> qa;
  qa.load(p, rw, g, reinterpret_cast<T*>(smem_raw));
  const T* K = static_cast<const T*>(p.k_win) + cache_at(p, b, g, 0, DK, p.cap);
  const T* V = static_cast<const T*>(p.v_win) + cache_at(p, b, g, 0, DV, p.cap);
  float o[DV / 8][4], lse2[2];
  clk.mark(kPfSetup);
  pf_attend<T, DK, DV, Wp::kThreads>(p, qa.op(), K, V, k0, k1, lo, hi,
                                     reinterpret_cast<T*>(smem_raw), o, lse2, clk);
  pf_store<DV>(p, rw, g, p.n_cmp_splits, o, lse2);
  clk.mark(kPfP1Store);
  clk.flush(p.stamps + kPfPhases);
}

// The forced blocks of the selected branch (p.sel_forced_apart): block 0, the previous and the
// current block of each row, keys [0, min(l_sel, t + 1)) and [max(l_sel, (cur - 1) l_sel), t + 1)
// with cur = t / l_sel (SPEC section 3, de-duplicated by starting the second range past block
// 0). Rows of a tile share these blocks, so a tile of queries loads them once; the partial goes
// to the sel slot, which the selected pass merges with its gather over the other blocks.
template <typename T, int DK, int DV, int W>
__global__ void __launch_bounds__(PfWarps<W>::kThreads, PfWarps<W>::kMinBlocks)
    nsa_prefill_fsel_kernel(const __grid_constant__ StepParams p) {
  using Wp = PfWarps<W>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int64_t g = blockIdx.y;
  const PfRows rw = pf_rows<Wp::kRows>(p);
  if (!pf_tile_needs(p, rw, g, 1)) return;
  const int64_t b = (p.row0 + rw.r0) / p.T, ls = p.l_sel;
  const int64_t t_first = rw.t0, t_last = rw.t0 + rw.n_valid - 1;
  PfKeys r[2];
  r[0].k0 = 0;
  r[0].k1 = min(ls, t_last + 1);
  r[1].k0 = max(ls, (t_first / ls - 1) * ls);
  r[1].k1 = t_last + 1;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int64_t t = rw.t0 + rw.q[k];
    r[0].lo[k] = 0;
    r[0].hi[k] = rw.valid[k] ? min(ls, t + 1) : kNoRowEnd;
    r[1].lo[k] = rw.valid[k] ? max(ls, (t / ls - 1) * ls) : 0;
    r[1].hi[k] = rw.valid[k] ? t + 1 : kNoRowEnd;
  }
  PfQOperand<T, DK, DV, Wp::kThreads> qa;
  qa.load(p, rw, g, reinterpret_cast<T*>(smem_raw));
  const T* K = static_cast<const T*>(p.k_sel) + cache_at(p, b, g, 0, DK, p.cap);
  const T* V = static_cast<const T*>(p.v_sel) + cache_at(p, b, g, 0, DV, p.cap);
  float o[DV / 8][4], lse2[2];
  PfClock<false> clk(nullptr);
  pf_attend_ranges<T, DK, DV, Wp::kThreads, 2>(p, qa.op(), K, V, r, reinterpret_cast<T*>(smem_raw),
                                               o, lse2, clk);
  pf_store<DV>(p, rw, g, p.n_cmp_splits + p.n_win_splits, o, lse2);
}

// kClock: the phase clocks (PfClock), cmp kernel entries at p.stamps.
template <typename T, int DK, int DV, int W, bool kClock = false>
__global__ void __launch_bounds__(PfWarps<W>::kThreads, PfWarps<W>::kMinBlocks)
    nsa_prefill_cmp_kernel(const __grid_constant__ StepParams p, int64_t nb_max) {
  using Sh = PfShape<DK, DV>;
  using Wp = PfWarps<W>;
  constexpr int kTile = Sh::kTile;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int32_t chosen[W][Wp::kMaxChosen];
  __shared__ long long clk_acc[kClock ? kPfPhases : 1];
  PfClock<kClock> clk(clk_acc);
  const int64_t g = blockIdx.y;
  const PfRows rw = pf_rows<Wp::kRows>(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tig = lane % 4;
  const int h = static_cast<int>(p.h);
  const bool need_cmp = pf_tile_needs(p, rw, g, 0);  // the cmp output or the selection
  const bool need_sel = pf_tile_needs(p, rw, g, 1);
  const int64_t b = (p.row0 + rw.r0) / p.T;
  int64_t lo[2] = {0, 0}, hi[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    hi[k] = rw.valid[k] ? num_cmp(rw.t0 + rw.q[k] + 1, p.l, p.d) : kNoRowEnd;
  }
  const int64_t k1 = num_cmp(rw.t0 + rw.n_valid, p.l, p.d);  // keys of the tile's last query
  T* pipe = reinterpret_cast<T*>(smem_raw);
  float* scores =
      reinterpret_cast<float*>(smem_raw + PfRing<T, DK, DV, Wp::kThreads>::kBytes);  // [qt][nb_max]
  float* stages = scores + rw.qt * nb_max;  // [2][qt][64]: tile it uses stages[it & 1]
  const T* K = static_cast<const T*>(p.k_cmp) + cache_at(p, b, g, 0, DK, p.cap_cmp);
  const T* V = static_cast<const T*>(p.v_cmp) + cache_at(p, b, g, 0, DV, p.cap_cmp);
  PfQOperand<T, DK, DV, Wp::kThreads> qa;
  qa.load(p, rw, g, pipe);
  float lse2[2] = {-INFINITY, -INFINITY};
  clk.mark(kPfSetup);
  if (need_cmp && k1 > 0) {
    float o[DV / 8][4];
    pf_attend<T, DK, DV, Wp::kThreads>(p, qa.op(), K, V, 0, k1, lo, hi, pipe, o, lse2, clk);
    pf_store<DV>(p, rw, g, 0, o, lse2);
  }
  clk.mark(kPfP1Store);
  for (int64_t i = threadIdx.x; i < rw.qt * nb_max && need_sel; i += blockDim.x) scores[i] = 0.f;
  if (need_sel && k1 > 0) {
    // Pass 2: p_cmp with the final log-sum-exp, summed over each query's heads, spread over the
    // selection blocks by overlap. Keys only.
    const float scale2 = p.scale * 1.4426950408889634f;
    const int64_t n_tiles = (k1 + kTile - 1) / kTile;
    const PfRing<T, DK, DV, Wp::kThreads> ring(pipe);
    const int spread_d = static_cast<int>(p.d), spread_r = static_cast<int>(p.l_sel / p.d);
    const int spread_a = static_cast<int>(p.l / p.d);
    const float inv_l = 1.f / static_cast<float>(p.l);
    auto issue = [&](int64_t it) {
      if (it < n_tiles) {
        const int64_t j0 = it * kTile;
        const int nk = static_cast<int>(min(static_cast<int64_t>(kTile), k1 - j0));
        ring.load_k(static_cast<int>(it & 1), K + j0 * DK, nk);
      }
      cp_async_commit();
    };
    issue(0);
    for (int64_t it = 0; it < n_tiles; ++it) {
      issue(it + 1);
      cp_async_wait<1>();
      ring.ready();
      clk.mark(kPfP2Wait);
      const int64_t j0 = it * kTile;
      float* stage = stages + (it & 1) * rw.qt * kTile;
      float s[8][4];
      ring.logits(qa.op(), static_cast<int>(it & 1), s);
      clk.mark(kPfP2Logits);
      // p_cmp of this thread's two rows and 16 keys (keys at or past a row's end: 0). Most
      // tiles lie inside every row's range of the warp: no per-key test there.
      float pc[2][16];
      auto p_cmp = [&](auto masked) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int lim = static_cast<int>(min(max(hi[k] - j0, int64_t{0}), int64_t{kTile}));
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int col = nt * 8 + tig * 2 + c;
              pc[k][2 * nt + c] = !decltype(masked)::value || col < lim
                                      ? exp2_ftz(fmaf(s[nt][2 * k + c], scale2, -lse2[k]))
                                      : 0.f;
            }
          }
        }
      };
      if (__all_sync(0xffffffffu, j0 + kTile <= hi[0] && j0 + kTile <= hi[1])) {
        p_cmp(std::false_type{});
      } else {
        p_cmp(std::true_type{});
      }
      switch (h) {  // h divides 16 (checked when the backend is built)
        case 16:
          pf_head_sums<3, true>(pc, rw, stage);
          break;
        case 8:
          pf_head_sums<3, false>(pc, rw, stage);
          break;
        case 4:
          pf_head_sums<2, false>(pc, rw, stage);
          break;
        case 2:
          pf_head_sums<1, false>(pc, rw, stage);
          break;
        default:
          pf_head_sums<0, false>(pc, rw, stage);
          break;
      }
      clk.mark(kPfP2Exp);
      __syncthreads();
      clk.mark(kPfP2Barrier);
      // Block jb gets the tile's tokens i it overlaps, weighted by overlap / l. SPEC's l % d == 0
      // and l_sel % d == 0 make that a fixed pattern: with r = l_sel / d and a = l / d, block jb
      // overlaps tokens jb r + u for u in [1 - a, r), by min(u + a, r) - max(u, 0) strides of d.
      // One warp per query, one lane per block: no divisions, and each sum in token order.
      // 32-bit positions: the cache limit (select_smem_bytes) keeps them below 2^22.
      const int i0 = static_cast<int>(j0), nk = static_cast<int>(min(int64_t{kTile}, k1 - j0));
      const int jb0 = i0 / spread_r;
      const int jb1 = min(static_cast<int>(nb_max) - 1, (i0 + nk - 1 + spread_a - 1) / spread_r);
      if (spread_r == 4 && spread_a == 2) {
        // The default pattern (l 32, d 16, l_sel 64): a 64-token tile touches at most 17 blocks,
        // one per lane; lane k's block jb0 + k has tokens 4 k .. 4 k + 3 of the tile (i0 is a
        // multiple of 64) and the one before, lane k - 1's last. One 16-byte load per lane
        // (no bank conflicts) and a shuffle; entries at or past nk are 0 (the head sums wrote
        // p_cmp 0 there), so only the tile's row end needs a test. Same sums, same order.
        const int base = 4 * lane;
        const float w_edge = static_cast<float>(spread_d) * inv_l;
        const float w_mid = static_cast<float>(2 * spread_d) * inv_l;
        for (int qi = warp; qi < rw.n_valid; qi += W) {
          const float4 v = base < kTile
                               ? *reinterpret_cast<const float4*>(stage + qi * kTile + base)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
          float prev = __shfl_up_sync(0xffffffffu, v.w, 1);
          if (lane == 0) prev = 0.f;  // token i0 - 1 belongs to the previous tile
          if (jb0 + lane <= jb1) {
            float sc = 0.f;
            sc += prev * w_edge;
            sc += v.x * w_mid;
            sc += v.y * w_mid;
            sc += v.z * w_mid;
            sc += v.w * w_edge;
            scores[qi * nb_max + jb0 + lane] += sc;
          }
        }
      } else {
        for (int qi = warp; qi < rw.n_valid; qi += W) {
          const float* st = stage + qi * kTile;
          float* sq = scores + qi * nb_max;
          for (int jb = jb0 + lane; jb <= jb1; jb += 32) {
            const int base = jb * spread_r - i0;  // stage index of token jb r
            float sc = 0.f;
            for (int u = 1 - spread_a; u < spread_r; ++u) {
              const int at = base + u;
              if (at >= 0 && at < nk) {
                const int ov = (min(u + spread_a, spread_r) - max(u, 0)) * spread_d;
                sc += st[at] * (static_cast<float>(ov) * inv_l);
              }
            }
            sq[jb] += sc;
          }
        }
      }
      clk.mark(kPfP2Spread);
      // No barrier here: the next tile writes the other stage, its ring refill targets the
      // stage every warp finished reading before the barrier above, and its own two barriers
      // come before the next spread (which may update the same boundary block's score) and
      // before the tile after it rewrites this stage.
    }
    cp_async_wait<0>();
  }
  __syncthreads();
  clk.mark(kPfP2Barrier);
  // Top-n per query, one warp per query: forced blocks (0, current, previous), then the `take`
  // largest keys (score, then lower index; see rank_key) by repeated warp-wide maxima. Block j
  // belongs to lane j % 32, which keeps the best key of its blocks and rescans only when its
  // best is taken.
  for (int qi = warp; qi < rw.n_valid; qi += W) {
    const int64_t r = rw.r0 + qi, rg = r * p.G + g, t = rw.t0 + qi, L = t + 1;
    const int64_t n_cmp = num_cmp(L, p.l, p.d);
    const int64_t n_win = p.w > 0 ? min(p.w, L) : 0;
    int32_t* blocks = p.sel_blocks + rg * p.n_sel;
    int32_t* rd = p.reads + rg * 3;
    const bool sel_row = p.compute_all || p.gates[rg * 3 + 1] != 0.f;
    if (!sel_row || !need_sel) {
      for (int64_t k = lane; k < p.n_sel; k += 32) blocks[k] = -1;
      if (lane == 0) {
        p.sel_count[rg] = 0;
        rd[0] = static_cast<int32_t>(n_cmp);
        rd[1] = 0;
        rd[2] = static_cast<int32_t>(n_win);
      }
      continue;
    }
    float* sc = scores + qi * nb_max;
    const int64_t nb = L / p.l_sel;
    const Forced fb = forced_blocks(t, nb, p.l_sel, p.n_sel);
    const int64_t* forced = fb.block;
    const int64_t nf = fb.n, take = fb.take;
    __syncwarp();
    if (lane == 0) {
      for (int64_t k = 0; k < nf; ++k)
        if (forced[k] < nb) sc[forced[k]] = -1.f;  // -1: not a candidate
    }
    __syncwarp();
    auto lane_best = [&]() {
      uint64_t best = 0ull;
      for (int j = lane; j < static_cast<int>(nb); j += 32) best = max(best, rank_key(sc[j], j));
      return best;
    };
    uint64_t best = take > 0 ? lane_best() : 0ull;
    for (int64_t k = 0; k < take; ++k) {
      // The warp's largest key: the high words' maximum, then the low words' maximum among the
      // lanes holding it (two warp reductions, not five 64-bit shuffle rounds).
      const auto hi = static_cast<uint32_t>(best >> 32);
      const uint32_t top_hi = __reduce_max_sync(0xffffffffu, hi);
      const uint32_t top_lo =
          __reduce_max_sync(0xffffffffu, hi == top_hi ? static_cast<uint32_t>(best) : 0u);
      const int64_t j = static_cast<int64_t>(0xffffffffu - top_lo);
      if (lane == 0) chosen[warp][nf + k] = static_cast<int32_t>(j);
      if (j % 32 == lane) {
        sc[j] = -1.f;
        best = lane_best();
      }
    }
    if (lane < nf) chosen[warp][lane] = static_cast<int32_t>(forced[lane]);
    __syncwarp();
    const int64_t n = nf + take;
    int tokens = 0;
    for (int64_t e = lane; e < p.n_sel; e += 32) {
      if (e < n) {
        const int32_t v = chosen[warp][e];
        int rank = 0;
        for (int64_t x = 0; x < n; ++x) rank += chosen[warp][x] < v;
        blocks[rank] = v;
        tokens += static_cast<int>(min((v + 1) * p.l_sel, L) - v * p.l_sel);
      } else {
        blocks[e] = -1;
      }
    }
    for (int off = 16; off > 0; off /= 2) tokens += __shfl_xor_sync(0xffffffffu, tokens, off);
    if (lane == 0) {
      p.sel_count[rg] = static_cast<int32_t>(n);
      rd[0] = static_cast<int32_t>(n_cmp);
      rd[1] = tokens;
      rd[2] = static_cast<int32_t>(n_win);
    }
    __syncwarp();  // chosen[warp] is reused by the warp's next query
  }
  clk.mark(kPfTopN);
  clk.flush(p.stamps);
}

}  // namespace nsa::cuda
