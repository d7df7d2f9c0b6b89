// Tensor-core split attention for 16-bit storage (the paper's group-centric kernel): the h <= 16
// query heads of a group are the M = 16 rows of mma.sync m16n8k16, so each 64-key K/V tile is
// read once for the whole group. Tiles stream through cp.async rings (the next tiles load while
// one is computed; two blocks per SM); each of the 4 warps owns 16 keys of every tile and keeps its
// own online softmax and output in registers (FlashAttention-2 style fragments), and the warps are
// merged once at the end of the split.
#pragma once

#include <type_traits>

#include "cuda/decode/step_kernels.cuh"

namespace nsa::cuda {

// cp.async rings of KS key tiles and VS value tiles (VS = KS or KS - 1). Group g of copies holds
// K tile g and V tile g - (KS - VS): with KS = 3, VS = 2 the keys run two tiles ahead and the
// values one, which fits two blocks per SM at dk 192, dv 128 (2 x 112 KB) with more bytes in
// flight than the default 2 + 2 ring (measured: no faster, docs/perf-cuda-decode.md).
template <int DK, int DV, int KS, int VS>
struct TcShape {
  static constexpr int kKS = KS, kVS = VS, kLag = KS - VS;
  static constexpr int kWarps = 4;
  static constexpr int kLdK = DK + 8;  // 16-byte row padding: conflict-free ldmatrix
  static constexpr int kLdV = DV + 8;
  static constexpr int kKElems = static_cast<int>(kTileKeys) * kLdK;
  static constexpr int kVElems = static_cast<int>(kTileKeys) * kLdV;
  static constexpr size_t kPipeBytes = (size_t{KS} * kKElems + size_t{VS} * kVElems) * 2;
  // Epilogue (reuses the pipeline buffers): m and l per warp and row, then O per warp.
  static constexpr size_t kMergeBytes = (2 * kWarps * 16 + kWarps * 16 * DV) * sizeof(float);
  static constexpr size_t kMainBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  static constexpr size_t kSmemBytes = kMainBytes + 64 * sizeof(int32_t);  // + selected blocks
  // The tiled prefill's selected pass (p.sel_fused) also holds the row's compressed and window
  // partials (h <= 16 heads), copied in while the tiles stream.
  // and, with the forced blocks apart (p.sel_forced_apart), their partial: [3][16][DV] floats.
  static constexpr size_t kFusedSmemBytes = kSmemBytes + 3 * 16 * size_t{DV} * sizeof(float);
  static_assert(VS == KS || VS == KS - 1, "the value ring is as deep as the key ring or one less");
  static_assert(DK % 16 == 0 && DV % 16 == 0, "head dims must be multiples of 16");
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false the destination is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D += A B for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one 32-bit register of 16-bit values, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// cp.async copies of the tile of virtual keys [j0, j0 + nk) (W elements per row) into dst with
// row stride LD; rows nk .. kTileKeys - 1 are zero-filled. 128 threads. A row is copied in
// segments of up to 64 elements (8 chunks of 16 bytes), so a warp's copy covers whole 128-byte
// segments of consecutive rows, and a thread's copies differ only by constant offsets (no
// per-copy index arithmetic: dk 192 rows are 24 chunks, which do not divide the 128 threads).
template <int W, int LD, typename T>
__device__ __forceinline__ void copy_tile_async(T* dst, const T* base, const Split& sp, int64_t j0,
                                                int64_t nk) {
  constexpr int kSeg = W % 64 == 0 ? 64 : W;  // elements per segment (W is 32 or a multiple of 64)
  constexpr int kc = kSeg / 8;                // 16-byte chunks per segment
  constexpr int kRowStep = 128 / kc;          // rows between one thread's copies
  constexpr int kRows = static_cast<int>(kTileKeys);
  static_assert(128 % kc == 0 && kRows % kRowStep == 0 && W % kSeg == 0, "copy layout");
  // Splits start at whole tiles, so with l_sel a multiple of the tile a tile never straddles
  // two selected blocks: its rows are consecutive positions (one block lookup per tile).
  const bool consecutive = sp.blocks == nullptr || sp.l_sel % kTileKeys == 0;
  const int r0 = static_cast<int>(threadIdx.x) / kc, col = (static_cast<int>(threadIdx.x) % kc) * 8;
  const T* src0 = base + key_pos(sp, j0) * W + r0 * W + col;  // this thread's first chunk
  T* dst0 = dst + r0 * LD + col;
#pragma unroll
  for (int u = 0; u < kRows / kRowStep; ++u) {
    const int row = r0 + u * kRowStep;
    const bool ok = row < nk;
    const T* src_row = consecutive ? src0 + u * kRowStep * W
                       : ok        ? base + key_pos(sp, j0 + row) * W + col
                                   : base;  // past the split: no block lookup
#pragma unroll
    for (int sg = 0; sg < W / kSeg; ++sg) {
      cp_async16(smem_addr(dst0 + u * kRowStep * LD + sg * kSeg), ok ? src_row + sg * kSeg : base,
                 ok);
    }
  }
}

// The tiled prefill's gated output of one (row, group) from the single cmp and window partials
// and the sel output o_sel (0 when the sel branch is off), element idx = head * dv + e; the
// branch outputs too when every branch is computed (inspection).
// What the fused output of one (row, group) needs besides the selected branch: loaded once per
// block, not once per output element.
struct FusedRow {
  float gate[3];
  bool use_c, use_w;  // the compressed / window partial exists (see fused_row)
  int64_t rg;
};

__device__ __forceinline__ FusedRow fused_row(const StepParams& p, int64_t rg) {
  FusedRow f;
  f.rg = rg;
  for (int i = 0; i < 3; ++i) f.gate[i] = p.gates[rg * 3 + i];
  // A branch's partial exists where its kernel ran for the row's tile (gate on or every branch
  // computed) and the row has keys: a tile before the first compressed token writes none.
  f.use_c =
      (p.compute_all || f.gate[0] != 0.f) && num_cmp(row_info(p, div32(rg, p.G)).L, p.l, p.d) > 0;
  f.use_w = p.w > 0 && (p.compute_all || f.gate[2] != 0.f);
  return f;
}

// The compressed (branch 0), window (branch 2) or forced-block (branch 1, p.sel_forced_apart)
// partial of a (row, group): h x dv floats; part_m at the same slot holds its log-sum-exp.
__device__ __forceinline__ int64_t fused_slot(const StepParams& p, int64_t rg, int branch) {
  const int64_t slot = branch == 0   ? 0
                       : branch == 2 ? p.n_cmp_splits
                                     : p.n_cmp_splits + p.n_win_splits;
  return rg * n_splits_total(p) + slot;
}
__device__ __forceinline__ const float* fused_partial(const StepParams& p, int64_t rg, int branch) {
  return p.part_o + fused_slot(p, rg, branch) * p.h * p.dv;
}

// The tiled prefill with the forced blocks apart: stages the row's selected blocks without the
// forced ones (0, the current and the previous block of position t, which
// nsa_prefill_fsel_kernel attends to), in order, and makes the split their tokens: every other
// selected block is complete. Warp 0 compacts the n_sel <= 64 entries by ballots.
__device__ __forceinline__ void stage_unforced_blocks(const StepParams& p, Split& sp, int64_t t,
                                                      int32_t* blocks_s) {
  __shared__ int n_kept;
  if (threadIdx.x < 32) {
    const int lane = static_cast<int>(threadIdx.x);
    const int64_t cur = div32(t, p.l_sel);
    auto kept = [&](int i, int32_t& v) {
      v = i < p.n_sel ? sp.blocks[i] : -1;
      return v > 0 && v != cur && v != cur - 1;
    };
    int32_t v0, v1;
    const bool k0 = kept(lane, v0), k1 = kept(lane + 32, v1);
    const unsigned m0 = __ballot_sync(0xffffffffu, k0), m1 = __ballot_sync(0xffffffffu, k1);
    const unsigned below = (1u << lane) - 1u;
    if (k0) blocks_s[__popc(m0 & below)] = v0;
    if (k1) blocks_s[__popc(m0) + __popc(m1 & below)] = v1;
    if (lane == 0) n_kept = __popc(m0) + __popc(m1);
  }
  __syncthreads();
  sp.blocks = blocks_s;
  sp.start = 0;
  sp.n = static_cast<int64_t>(n_kept) * p.l_sel;
}

// The gated output of all three branches for element idx = head * dv + e of a (row, group);
// pc and pw: its compressed and window partials (device or shared memory).
template <typename T>
__device__ __forceinline__ void fused_output(const StepParams& p, const FusedRow& f, int64_t idx,
                                             float o_sel, const float* pc, const float* pw) {
  const int64_t rg = f.rg, r = div32(rg, p.G), g = mod32(rg, p.G);
  const float oc = f.use_c ? pc[idx] : 0.f;
  const float ow = f.use_w ? pw[idx] : 0.f;
  float o = 0.f;
  if (f.gate[0] != 0.f) o += f.gate[0] * oc;
  if (f.gate[1] != 0.f) o += f.gate[1] * o_sel;
  if (f.gate[2] != 0.f) o += f.gate[2] * ow;
  const int64_t at = (r * p.H + g * p.h) * p.dv + idx;
  static_cast<T*>(p.o)[at] = from_f32<T>(o);
  if (p.compute_all) {
    p.o_cmp[at] = oc;
    p.o_sel[at] = o_sel;
    p.o_win[at] = ow;
  }
}

// One split of this block (blockIdx): the body of nsa_attn_tc_kernel.
// kForced: the instantiation for the tiled prefill's selected pass with the forced blocks apart
// (p.sel_forced_apart); the others compile without that code.
template <typename T, int DK, int DV, int KS, int VS, bool kForced = false>
__device__ __forceinline__ void tc_attend(const StepParams& p, int phase, unsigned char* smem_raw) {
  using Sh = TcShape<DK, DV, KS, VS>;
  constexpr int kTile = static_cast<int>(kTileKeys);
  Split sp;
  const auto bx = static_cast<int64_t>(blockIdx.x);
  const int64_t rg = p.sel_group_major ? mod32(bx, p.R) * p.G + div32(bx, p.R) : bx;
  if (!split_range<T>(p, phase, rg, blockIdx.y, sp)) {
    if (p.sel_fused) {  // the sel branch is off for this row: the output from the other two
      const FusedRow f = fused_row(p, sp.rg);
      const float* pc = fused_partial(p, sp.rg, 0);
      const float* pw = fused_partial(p, sp.rg, 2);
      for (int64_t i = threadIdx.x; i < p.h * DV; i += blockDim.x)
        fused_output<T>(p, f, i, 0.f, pc, pw);
    }
    return;
  }
  T* pipe = reinterpret_cast<T*>(smem_raw);
  int32_t* blocks_s = reinterpret_cast<int32_t*>(smem_raw + Sh::kMainBytes);
  const bool forced_apart = kForced && p.sel_fused && p.sel_forced_apart && sp.branch == 1;
  if (forced_apart) {
    stage_unforced_blocks(p, sp, row_info(p, sp.r).t, blocks_s);
  } else {
    stage_blocks(p, sp, blocks_s);
  }
  // The forced blocks' log-sum-exp of head threadIdx.x (natural log; -FLT_MAX: no keys).
  const float m_forced = forced_apart && threadIdx.x < p.h
                             ? p.part_m[fused_slot(p, sp.rg, 1) * p.h + threadIdx.x]
                             : -FLT_MAX;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int h = static_cast<int>(p.h);
  const T* K = static_cast<const T*>(sp.K);
  const T* V = static_cast<const T*>(sp.V);
  const int64_t n_tiles = (sp.n + kTile - 1) / kTile;

  T* k_ring = pipe;
  T* v_ring = pipe + Sh::kKS * Sh::kKElems;
  // Issues the cp.async copies of key tile `it` or value tile `it` (rows past the split's end
  // are zero-filled).
  auto issue = [&](int64_t it, bool keys) {
    const int64_t j0 = sp.start + it * kTile;
    const int64_t nk = min(static_cast<int64_t>(kTile), sp.start + sp.n - j0);
    if (keys) {
      copy_tile_async<DK, Sh::kLdK>(k_ring + (it % Sh::kKS) * Sh::kKElems, K, sp, j0, nk);
    } else {
      copy_tile_async<DV, Sh::kLdV>(v_ring + (it % Sh::kVS) * Sh::kVElems, V, sp, j0, nk);
    }
  };
  // Copy group g: key tile g and value tile g - kLag.
  auto issue_group = [&](int64_t g) {
    if (g < n_tiles) issue(g, true);
    if (g - Sh::kLag >= 0 && g - Sh::kLag < n_tiles) issue(g - Sh::kLag, false);
    cp_async_commit();
  };
  // The prefill's selected pass: the row's compressed and window partials go to shared memory
  // with the first tiles' copies, so the output epilogue does not wait on device memory.
  float* partials_s = reinterpret_cast<float*>(smem_raw + Sh::kSmemBytes);  // [3][h * DV]
  if (p.sel_fused) {
    const float* pc = fused_partial(p, sp.rg, 0);
    const float* pw = fused_partial(p, sp.rg, 2);
    const float* pf = fused_partial(p, sp.rg, 1);
    for (int i = threadIdx.x * 4; i < h * DV; i += blockDim.x * 4) {
      cp_async16(smem_addr(partials_s + i), pc + i, true);
      cp_async16(smem_addr(partials_s + h * DV + i), pw + i, true);
      if (forced_apart) cp_async16(smem_addr(partials_s + 2 * h * DV + i), pf + i, true);
    }
  }
  for (int g = 0; g < Sh::kKS - 1; ++g) issue_group(g);

  // Q as A fragments for the whole split: rows gid and gid + 8 (heads past h are zero).
  uint32_t qa[DK / 16][4];
  {
    const T* q = static_cast<const T*>(p.q) + (sp.r * p.H + sp.g * p.h) * DK;
    auto ld = [&](int row, int col) {
      return row < h ? *reinterpret_cast<const uint32_t*>(q + row * DK + col) : 0u;
    };
#pragma unroll
    for (int kc = 0; kc < DK / 16; ++kc) {
      qa[kc][0] = ld(gid, kc * 16 + tig * 2);
      qa[kc][1] = ld(gid + 8, kc * 16 + tig * 2);
      qa[kc][2] = ld(gid, kc * 16 + 8 + tig * 2);
      qa[kc][3] = ld(gid + 8, kc * 16 + 8 + tig * 2);
    }
  }
  float o[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  // Running max (base-2 logits) and lane-partial sums of rows gid and gid + 8.
  float m0 = -FLT_MAX, m1 = -FLT_MAX, l0 = 0.f, l1 = 0.f;
  const float scale2 = p.scale * 1.4426950408889634f;  // logits in log2 units
  float* logits = sp.branch == 0 ? p.cmp_logits + sp.rg * p.h * p.cap_cmp : nullptr;

  for (int64_t it = 0; it < n_tiles; ++it) {
    issue_group(it + Sh::kKS - 1);
    cp_async_wait<Sh::kKS - 1 - Sh::kLag>();  // groups up to it + kLag: K and V of tile it
    __syncthreads();
    const T* ks = k_ring + (it % Sh::kKS) * Sh::kKElems;
    const T* vs = v_ring + (it % Sh::kVS) * Sh::kVElems;
    const int64_t j0 = sp.start + it * kTile;
    const int nk = static_cast<int>(min(static_cast<int64_t>(kTile), sp.start + sp.n - j0));
    const int key0 = warp * 16;  // this warp's 16 keys of the tile

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kc = 0; kc < DK / 16; ++kc) {
      uint32_t b[4];
      const int row = key0 + (lane & 7) + ((lane >> 4) << 3), col = kc * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(b, smem_addr(ks + row * Sh::kLdK + col));
      mma16816<T>(s[0], qa[kc], b[0], b[1]);
      mma16816<T>(s[1], qa[kc], b[2], b[3]);
    }
    float mx0 = -FLT_MAX, mx1 = -FLT_MAX;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nt * 8 + tig * 2 + (e & 1), row = gid + (e >> 1) * 8;
        const bool ok = key < nk;
        if (logits != nullptr && ok && row < h)
          logits[row * p.cap_cmp + j0 + key] = s[nt][e] * p.scale;
        s[nt][e] = ok ? s[nt][e] * scale2 : -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {  // the 4 lanes of a quad hold one row's 16 keys
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float c0 = exp2_ftz(m0 - n0), c1 = exp2_ftz(m1 - n1);
    m0 = n0;
    m1 = n1;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = exp2_ftz(s[nt][0] - n0);
      s[nt][1] = exp2_ftz(s[nt][1] - n0);
      s[nt][2] = exp2_ftz(s[nt][2] - n1);
      s[nt][3] = exp2_ftz(s[nt][3] - n1);
    }
    l0 = l0 * c0 + s[0][0] + s[0][1] + s[1][0] + s[1][1];
    l1 = l1 * c1 + s[0][2] + s[0][3] + s[1][2] + s[1][3];
#pragma unroll
    for (int nd = 0; nd < DV / 8; ++nd) {
      o[nd][0] *= c0;
      o[nd][1] *= c0;
      o[nd][2] *= c1;
      o[nd][3] *= c1;
    }
    // The S accumulators are the A fragment of P V (P rounded to 16 bits, as in FlashAttention).
    const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                            pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int nd = 0; nd < DV / 16; ++nd) {
      uint32_t b[4];
      ldmatrix_x4_trans(
          b, smem_addr(vs + (key0 + (lane & 15)) * Sh::kLdV + nd * 16 + (lane >> 4) * 8));
      mma16816<T>(o[2 * nd], pa, b[0], b[1]);
      mma16816<T>(o[2 * nd + 1], pa, b[2], b[3]);
    }
    __syncthreads();  // the stage is refilled by the next iteration's issue
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the 4 warps: per row the block max M, each warp's factor 2^(m_w - M).
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float* red_m = reinterpret_cast<float*>(smem_raw);  // [4][16]
  float* red_l = red_m + Sh::kWarps * 16;             // [4][16]
  float* obuf = red_l + Sh::kWarps * 16;              // [4][16][DV]
  if (tig == 0) {
    red_m[warp * 16 + gid] = m0;
    red_m[warp * 16 + gid + 8] = m1;
    red_l[warp * 16 + gid] = l0;
    red_l[warp * 16 + gid + 8] = l1;
  }
  __syncthreads();
  float M0 = -FLT_MAX, M1 = -FLT_MAX;
#pragma unroll
  for (int w = 0; w < Sh::kWarps; ++w) {
    M0 = fmaxf(M0, red_m[w * 16 + gid]);
    M1 = fmaxf(M1, red_m[w * 16 + gid + 8]);
  }
  const float f0 = exp2f(m0 - M0), f1 = exp2f(m1 - M1);
  float* ob = obuf + warp * 16 * DV;
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) {
    const int col = nd * 8 + tig * 2;
    *reinterpret_cast<float2*>(ob + gid * DV + col) = make_float2(o[nd][0] * f0, o[nd][1] * f0);
    *reinterpret_cast<float2*>(ob + (gid + 8) * DV + col) =
        make_float2(o[nd][2] * f1, o[nd][3] * f1);
  }
  __syncthreads();
  // Per head: the factor of the gathered sum (1 / L), and with the forced blocks apart the
  // log-sum-exp merge with their normalised partial: weights 2^(M - M') and 2^(mf - M') over the
  // merged sum L 2^(M - M') + 2^(mf - M').
  __shared__ float inv_l[16], w_forced[16];
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    float M = -FLT_MAX, L = 0.f;
    for (int w = 0; w < Sh::kWarps; ++w) M = fmaxf(M, red_m[w * 16 + i]);
    for (int w = 0; w < Sh::kWarps; ++w) L += red_l[w * 16 + i] * exp2f(red_m[w * 16 + i] - M);
    if (p.sel_fused && forced_apart) {
      const float mf = m_forced > -FLT_MAX ? m_forced * 1.4426950408889634f : -FLT_MAX;
      const float Mx = fmaxf(L > 0.f ? M : -FLT_MAX, mf);
      const float wa = L > 0.f ? exp2f(M - Mx) : 0.f;
      const float wf = mf > -FLT_MAX ? exp2f(mf - Mx) : 0.f;
      const float den = L * wa + wf;
      inv_l[i] = den > 0.f ? wa / den : 0.f;
      w_forced[i] = den > 0.f ? wf / den : 0.f;
    } else if (p.sel_fused) {
      inv_l[i] = L > 0.f ? 1.f / L : 0.f;
    } else {
      store_partial(p, sp, i, M * 0.6931471805599453f, L);  // back to natural-log units
    }
  }
  if (p.sel_fused) {
    const FusedRow f = fused_row(p, sp.rg);
    __syncthreads();
    for (int i = threadIdx.x; i < h * DV; i += blockDim.x) {
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < Sh::kWarps; ++w) a += obuf[w * 16 * DV + i];
      float o_sel = a * inv_l[i / DV];
      if (forced_apart) o_sel += partials_s[2 * h * DV + i] * w_forced[i / DV];
      fused_output<T>(p, f, i, o_sel, partials_s, partials_s + h * DV);
    }
    return;
  }
  float* out = partial_out(p, sp);
  for (int i = threadIdx.x; i < h * DV; i += blockDim.x) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < Sh::kWarps; ++w) a += obuf[w * 16 * DV + i];
    out[i] = a;
  }
}

// Tensor-core split attention, one split per block (kForced: see tc_attend).
template <typename T, int DK, int DV, int KS, int VS, bool kForced = false>
__global__ void __launch_bounds__(128, 2)
    nsa_attn_tc_kernel(const __grid_constant__ StepParams p, int phase) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  tc_attend<T, DK, DV, KS, VS, kForced>(p, phase, smem_raw);
}

}  // namespace nsa::cuda
