// Device code of one NSA step (decode, or a chunk of prefill rows): RoPE + cache append +
// compressed-token emission + gate (`prepare`), the FFMA split attention (the tensor-core one is
// in attn_tc_kernel.cuh, scoring and top-n in select_kernels.cuh), and the gated combine.
#pragma once

#include <cfloat>

#include "cuda/common/types.cuh"
#include "cuda/decode/step_params.h"

namespace nsa::cuda {

struct RowInfo {
  int64_t r, b, t, L;
};

__device__ __forceinline__ RowInfo row_info(const StepParams& p, int64_t r) {
  const int64_t row = p.row0 + r;
  const int64_t t = *p.len + mod32(row, p.T);
  return {r, div32(row, p.T), t, t + 1};
}

__device__ __forceinline__ int64_t cache_at(const StepParams& p, int64_t b, int64_t g, int64_t pos,
                                            int64_t width, int64_t cap) {
  return ((b * p.G + g) * cap + pos) * width;
}

__device__ __forceinline__ bool branch_needed(const StepParams& p, const float* gate, int branch) {
  if (p.compute_all) return true;
  // The selection needs the compressed scores even when the cmp output is gated off.
  if (branch == 0) return gate[0] != 0.f || gate[1] != 0.f;
  return gate[branch] != 0.f;
}

// --- 1. RoPE, cache append, emission and the gate, per (row, group) --------------------------
// Compressed-token emission of row r reads the raw cmp keys of positions L-l .. L-1. In a decode
// step (T = 1) this block wrote position t itself, so it emits too (emit = 1); a prefill launch
// has other rows of the same sequence in other blocks and runs nsa_emit_kernel afterwards.
template <typename T>
__device__ __forceinline__ void emit_compressed(const StepParams& p, const RowInfo& ri, int64_t g) {
  if (ri.L < p.l || (ri.L - p.l) % p.d != 0) return;
  const int64_t i = div32(ri.L - p.l, p.d);
  for (int64_t e = threadIdx.x; e < p.dk + p.dv; e += blockDim.x) {
    const bool key = e < p.dk;
    const int64_t width = key ? p.dk : p.dv, col = key ? e : e - p.dk;
    const T* raw = static_cast<const T*>(key ? p.k_cmp_raw : p.v_cmp_raw) +
                   cache_at(p, ri.b, g, 0, width, p.cap);
    float s = 0.f;
#pragma unroll 8
    for (int64_t pos = ri.L - p.l; pos < ri.L; ++pos) s += to_f32(raw[pos * width + col]);
    T* out = static_cast<T*>(key ? p.k_cmp : p.v_cmp) + cache_at(p, ri.b, g, i, width, p.cap_cmp);
    out[col] = from_f32<T>(s / static_cast<float>(p.l));
  }
}

constexpr int kPrepareThreads = 512;

// Rows per block of nsa_prepare_kernel at most (the gates of a block's rows are computed
// together, so fc1's weights are read once per block, not once per row).
constexpr int kMaxPrepareRows = 4;

// RoPE, cache append and (emit) emission of one (row, group), and the gate's input: the mean of
// the group's rotated queries as stored, into u[dk]. rope_smem holds cos[dk/2], sin[dk/2]
// (double), then the rotated queries qr[h][dk]. Ends with a barrier (u is visible).
template <typename T>
__device__ __forceinline__ void prepare_rope(const StepParams& p, int64_t r, int64_t g, int emit,
                                             double* rope_smem, float* u) {
  const RowInfo ri = row_info(p, r);
  const int half = static_cast<int>(p.dk / 2), dk = static_cast<int>(p.dk);
  const int h = static_cast<int>(p.h), dv = static_cast<int>(p.dv), G = static_cast<int>(p.G);
  double* cs = rope_smem;
  double* sn = cs + half;
  float* qr = reinterpret_cast<float*>(sn + half);
  // Angles in double (positions reach 1e5), once per frequency.
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const double a = static_cast<double>(ri.t) * p.rope_freq[j];
    sincos(a, &sn[j], &cs[j]);
  }
  __syncthreads();
  const float* pr = p.proj + ri.r * p.P;
  T* q = static_cast<T*>(p.q) + (ri.r * p.H + g * h) * p.dk;
  // Rotate the group's h query heads, then its three keys (cmp, sel, win), pair by pair.
#pragma unroll 4
  for (int i = threadIdx.x; i < (h + 3) * half; i += blockDim.x) {
    const int vec = i / half, j = i % half;
    const float* src;
    T* dst;
    if (vec < h) {
      src = pr + (g * h + vec) * p.dk;
      dst = q + vec * p.dk;
    } else {
      const int64_t kv = vec - h;  // 0 cmp, 1 sel, 2 win
      src = pr + p.H * p.dk + kv * G * (p.dk + p.dv) + g * p.dk;
      void* base = kv == 0 ? p.k_cmp_raw : kv == 1 ? p.k_sel : p.k_win;
      dst = static_cast<T*>(base) + cache_at(p, ri.b, g, ri.t, p.dk, p.cap);
    }
    const double x0 = src[2 * j], x1 = src[2 * j + 1];
    const T y0 = from_f32<T>(static_cast<float>(x0 * cs[j] - x1 * sn[j]));
    const T y1 = from_f32<T>(static_cast<float>(x0 * sn[j] + x1 * cs[j]));
    dst[2 * j] = y0;
    dst[2 * j + 1] = y1;
    if (vec < h) {
      qr[vec * dk + 2 * j] = to_f32(y0);
      qr[vec * dk + 2 * j + 1] = to_f32(y1);
    }
  }
  for (int i = threadIdx.x; i < 3 * dv; i += blockDim.x) {
    const int kv = i / dv, e = i % dv;
    const float v = pr[p.H * p.dk + kv * G * (p.dk + p.dv) + G * p.dk + g * p.dv + e];
    void* base = kv == 0 ? p.v_cmp_raw : kv == 1 ? p.v_sel : p.v_win;
    static_cast<T*>(base)[cache_at(p, ri.b, g, ri.t, p.dv, p.cap) + e] = from_f32<T>(v);
  }
  __syncthreads();  // this block's cache and query writes are visible to its threads below
  if (emit) emit_compressed<T>(p, ri, g);
  // Gate from the mean of the group's rotated queries, as stored (SPEC section 2, step 4).
  for (int e = threadIdx.x; e < dk; e += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < h; ++j) s += qr[j * dk + e];
    u[e] = s / static_cast<float>(h);
  }
  __syncthreads();
}

// The three gates of a (row, group) from fc2's outputs z: sigmoid, or softmax at p.gate_temp.
__device__ __forceinline__ void write_gates(const StepParams& p, float* gate, const float* z) {
  if (p.gate_sigmoid) {
    for (int k = 0; k < 3; ++k) gate[k] = 1.f / (1.f + expf(-z[k]));
  } else {
    const float m = fmaxf(z[0], fmaxf(z[1], z[2])) / p.gate_temp;
    float e[3], sum = 0.f;
    for (int k = 0; k < 3; ++k) sum += (e[k] = expf(z[k] / p.gate_temp - m));
    for (int k = 0; k < 3; ++k) gate[k] = e[k] / sum;
  }
}

// The gates of rows r0 .. r0 + nr - 1 (nr <= kMaxPrepareRows) of group g from their inputs
// u[nr][dk] (prepare_rope); hid: nr * g_hid floats of shared memory. Every thread calls it.
__device__ __forceinline__ void prepare_gates(const StepParams& p, int64_t r0, int nr, int64_t g,
                                              const float* u, float* hid) {
  const int dk = static_cast<int>(p.dk), g_hid = static_cast<int>(p.g_hid);
  // One warp per hidden unit, four units in flight per warp; lanes split the dot products, and
  // each weight serves every row of the block.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int i0 = 4 * warp; i0 < g_hid; i0 += 4 * n_warps) {
    float a[kMaxPrepareRows][4] = {}, bias[4];  // the biases load beside the weights
#pragma unroll
    for (int k = 0; k < 4; ++k) bias[k] = i0 + k < g_hid ? p.fc1_b[i0 + k] : 0.f;
#pragma unroll 2
    for (int e = lane; e < dk; e += 32) {
      float w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = i0 + k < g_hid ? p.fc1_w[(i0 + k) * p.dk + e] : 0.f;
#pragma unroll
      for (int rr = 0; rr < kMaxPrepareRows; ++rr) {
        if (rr < nr) {
          const float x = u[rr * dk + e];
#pragma unroll
          for (int k = 0; k < 4; ++k) a[rr][k] += w[k] * x;
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kMaxPrepareRows; ++rr) {
      if (rr >= nr) break;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        for (int off = 16; off > 0; off /= 2)
          a[rr][k] += __shfl_xor_sync(0xffffffffu, a[rr][k], off);
        if (lane == 0 && i0 + k < g_hid) {
          const float z = a[rr][k] + bias[k];
          hid[rr * g_hid + i0 + k] = z / (1.f + expf(-z));
        }
      }
    }
  }
  __syncthreads();
  __shared__ float z[kMaxPrepareRows][3];
  for (int task = warp; task < 3 * nr; task += n_warps) {
    const int k = task % 3, rr = task / 3;
    const float bias = p.fc2_b[k];
    float a = 0.f;
    for (int i = lane; i < g_hid; i += 32) a += p.fc2_w[k * p.g_hid + i] * hid[rr * g_hid + i];
    for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (lane == 0) z[rr][k] = a + bias;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < nr) {
    const int rr = static_cast<int>(threadIdx.x);
    write_gates(p, p.gates + ((r0 + rr) * p.G + g) * 3, z[rr]);
  }
}

// Shared-memory layout of the prepare step for `rows` rows: cos and sin (double), qr[h][dk], then
// u[rows][dk] and hid[rows][g_hid] (floats).
inline size_t prepare_smem_bytes(int64_t h, int64_t dk, int64_t g_hid,
                                 int64_t rows = kMaxPrepareRows) {
  return static_cast<size_t>(dk) * sizeof(double) +
         static_cast<size_t>(h * dk + rows * (dk + g_hid)) * sizeof(float);
}

// One (row, group) of the fused decode kernel: RoPE, append, emission, gate.
template <typename T>
__device__ __forceinline__ void prepare_row(const StepParams& p, int64_t r, int64_t g, int emit,
                                            double* rope_smem) {
  float* u = reinterpret_cast<float*>(rope_smem + p.dk) + p.h * p.dk;
  prepare_rope<T>(p, r, g, emit, rope_smem, u);
  prepare_gates(p, r, 1, g, u, u + p.dk);
}

// Rows [blockIdx.x rows_per_block, ...) of group blockIdx.y (decode: one row per block; prefill:
// a few rows per smaller block, docs/perf-cuda-prefill.md): RoPE and append row by row, then
// the gates of all of them.
template <typename T>
__global__ void __launch_bounds__(kPrepareThreads)
    nsa_prepare_kernel(const __grid_constant__ StepParams p, int emit, int rows_per_block) {
  extern __shared__ double rope_smem[];
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int nr = static_cast<int>(min(p.R, r0 + rows_per_block) - r0);
  float* u = reinterpret_cast<float*>(rope_smem + p.dk) + p.h * p.dk;  // [nr][dk]
  for (int rr = 0; rr < nr; ++rr) {
    prepare_rope<T>(p, r0 + rr, blockIdx.y, emit, rope_smem, u + rr * p.dk);
  }
  prepare_gates(p, r0, nr, blockIdx.y, u, u + nr * p.dk);
}

// Emission only, per (row, group): prefill launches and cache filling.
template <typename T>
__global__ void nsa_emit_kernel(const __grid_constant__ StepParams p) {
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  emit_compressed<T>(p, row_info(p, blockIdx.x), blockIdx.y);
}

// --- 3. Split attention: one (row, group, key range) per block, all h heads at once ------------
// phase 0: n_cmp_splits compressed splits (logits kept for scoring). phase 1 (after the
// selection): n_sel_splits splits over the selected blocks' tokens, then n_win_splits window
// splits. Partial slots: cmp, window, sel. Every branch is a sequence of keys ("virtual" indices
// 0 .. n-1) mapped to cache positions by key_pos.
struct Split {
  int64_t rg, r, g, index;  // index: slot of this split in the partial arrays
  int64_t start, n;         // this split's virtual keys [start, start + n)
  int64_t base;             // cache position of virtual key 0 (cmp and window)
  const int32_t* blocks;    // sel: sorted selected blocks (virtual key j is in blocks[j / l_sel])
  int32_t l_sel;
  int32_t l_sel_shift;  // log2(l_sel) when l_sel is a power of two, else -1
  int branch;           // 0 cmp, 1 sel, 2 win
  const void* K;
  const void* V;  // keys and values of (b, g) at position 0
};

__device__ __forceinline__ int64_t key_pos(const Split& sp, int64_t j) {
  if (sp.blocks == nullptr) return sp.base + j;
  const int32_t jj = static_cast<int32_t>(j);
  // A shift, not a division, for the usual power-of-two block length (once per tile or row).
  const int32_t blk = sp.l_sel_shift >= 0 ? jj >> sp.l_sel_shift : jj / sp.l_sel;
  return static_cast<int64_t>(sp.blocks[blk]) * sp.l_sel + (jj - blk * sp.l_sel);
}

// Points a sel split at a shared-memory copy (blocks_s, n_sel entries) of its selected blocks,
// which the gather looks up once per tile or row; other splits are left as they are.
__device__ __forceinline__ void stage_blocks(const StepParams& p, Split& sp, int32_t* blocks_s) {
  if (sp.blocks == nullptr) return;
  for (int i = threadIdx.x; i < p.n_sel; i += blockDim.x) blocks_s[i] = sp.blocks[i];
  __syncthreads();
  sp.blocks = blocks_s;
}

// Fills sp for split s of (row, group) rg in this phase. Returns false when the split has no keys
// or its branch is gated off.
template <typename T>
__device__ __forceinline__ bool split_range(const StepParams& p, int phase, int64_t rg, int64_t s,
                                            Split& sp) {
  sp.rg = rg;
  sp.r = div32(sp.rg, p.G);
  sp.g = mod32(sp.rg, p.G);
  // Independent loads first, so their latencies overlap.
  const float* gate = p.gates + sp.rg * 3;
  const float g0 = gate[0], g1 = gate[1], g2 = gate[2];
  const int32_t sel_tokens = phase == 1 ? p.reads[sp.rg * 3 + 1] : 0;
  const RowInfo ri = row_info(p, sp.r);
  int64_t total = 0, splits = 1;
  sp.base = 0;
  sp.blocks = nullptr;
  sp.l_sel = static_cast<int32_t>(p.l_sel);
  sp.l_sel_shift = (sp.l_sel & (sp.l_sel - 1)) == 0 ? __ffs(sp.l_sel) - 1 : -1;
  const void* K;
  const void* V;
  int64_t cap = p.cap;
  if (phase == 0) {
    sp.branch = 0;
    sp.index = s;
    total = num_cmp(ri.L, p.l, p.d);
    splits = p.n_cmp_splits;
    K = p.k_cmp;
    V = p.v_cmp;
    cap = p.cap_cmp;
  } else if (s >= p.n_sel_splits) {
    sp.branch = 2;
    s -= p.n_sel_splits;
    sp.index = p.n_cmp_splits + s;
    sp.base = max(int64_t{0}, ri.t - p.w + 1);
    total = p.w > 0 ? ri.L - sp.base : 0;
    splits = p.n_win_splits;
    K = p.k_win;
    V = p.v_win;
  } else {
    sp.branch = 1;
    sp.index = p.n_cmp_splits + p.n_win_splits + s;
    sp.blocks = p.sel_blocks + sp.rg * p.n_sel;
    total = sel_tokens;  // tokens of the selected blocks
    splits = p.n_sel_splits;
    K = p.k_sel;
    V = p.v_sel;
  }
  const int64_t chunk = split_chunk(total, splits);
  sp.start = s * chunk;
  sp.n = min(chunk, total - sp.start);
  const float gv[3] = {g0, g1, g2};
  if (sp.n <= 0 || !branch_needed(p, gv, sp.branch)) return false;
  sp.K = static_cast<const T*>(K) + cache_at(p, ri.b, sp.g, 0, p.dk, cap);
  sp.V = static_cast<const T*>(V) + cache_at(p, ri.b, sp.g, 0, p.dv, cap);
  return true;
}

// The split of this block: (row, group) blockIdx.x, split blockIdx.y.
template <typename T>
__device__ __forceinline__ bool split_range(const StepParams& p, int phase, Split& sp) {
  return split_range<T>(p, phase, blockIdx.x, blockIdx.y, sp);
}

// Rows [0, nk) of one tile, or (kTwo) of a K and a V tile loaded together, as 16-byte vectors
// (kvec / vvec per row, nK / nV in all) converted to f32 into shared memory with row strides
// kld / vld: kStage vectors per thread and tile in flight before the stores (a load-store loop
// would wait one memory latency per load). Plain (coherent) loads, not __ldg: in the fused
// decode kernel the rows include the token the same kernel appended.
template <typename T, int kStage, bool kTwo, typename KRow, typename VRow>
__device__ __forceinline__ void load_vec_tiles_f32(float* ks, int kld, int kvec, int nK, KRow krow,
                                                   float* vs, int vld, int vvec, int nV,
                                                   VRow vrow) {
  constexpr int kPer = 16 / sizeof(T);  // elements per 16 bytes
  auto store = [](float* d, const uint4& r) {
    const T* v = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int e = 0; e < kPer; ++e) d[e] = to_f32(v[e]);
  };
  const int n = kTwo ? max(nK, nV) : nK;
  for (int base = threadIdx.x; base < n; base += kStage * blockDim.x) {
    uint4 rk[kStage], rv[kStage];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      rk[u] = i < nK ? *(reinterpret_cast<const uint4*>(krow(i / kvec)) + i % kvec)
                     : make_uint4(0, 0, 0, 0);
      if constexpr (kTwo) {
        rv[u] = i < nV ? *(reinterpret_cast<const uint4*>(vrow(i / vvec)) + i % vvec)
                       : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      if (i < nK) store(ks + (i / kvec) * kld + (i % kvec) * kPer, rk[u]);
      if constexpr (kTwo) {
        if (i < nV) store(vs + (i / vvec) * vld + (i % vvec) * kPer, rv[u]);
      }
    }
  }
}

// Copies rows [0, nk) of a K or V tile (row j at src_row(j), `width` elements) into shared
// memory as f32 with row stride ld: 16-byte loads when rows allow it, else element by element,
// kStage per thread in flight before the stores.
template <typename T, typename Row>
__device__ __forceinline__ void load_tile_f32(float* dst, int ld, int nk, int width, Row src_row) {
  constexpr int kStage = 8;
  if ((width * sizeof(T)) % 16 == 0) {
    const int vec = width / (16 / static_cast<int>(sizeof(T)));
    load_vec_tiles_f32<T, kStage, false>(dst, ld, vec, nk * vec, src_row, nullptr, 0, 1, 0,
                                         src_row);
    return;
  }
  const int n = nk * width;
  for (int base = threadIdx.x; base < n; base += kStage * blockDim.x) {
    float r[kStage];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      r[u] = i < n ? to_f32(src_row(i / width)[i % width]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      if (i < n) dst[(i / width) * ld + i % width] = r[u];
    }
  }
}

// Copies rows [0, nk) of a K tile and a V tile (row j at krow(j) / vrow(j)) into shared memory
// as f32 (row strides kld, vld), with the loads of both tiles in flight together.
template <typename T, typename KRow, typename VRow>
__device__ __forceinline__ void load_kv_tile_f32(float* ks, int kld, float* vs, int vld, int nk,
                                                 int dk, int dv, KRow krow, VRow vrow) {
  constexpr int kPer = 16 / sizeof(T);
  if ((dk * sizeof(T)) % 16 != 0 || (dv * sizeof(T)) % 16 != 0) {
    load_tile_f32<T>(ks, kld, nk, dk, krow);
    load_tile_f32<T>(vs, vld, nk, dv, vrow);
    return;
  }
  const int kvec = dk / kPer, vvec = dv / kPer;
  load_vec_tiles_f32<T, 4, true>(ks, kld, kvec, nk * kvec, krow, vs, vld, vvec, nk * vvec, vrow);
}

// Merges a partial (running max m, sum s of exp(logit - m)) into (M, S).
__device__ __forceinline__ void merge_max_sum(float& M, float& S, float m, float s) {
  const float mx = fmaxf(M, m);
  S = S * expf(M - mx) + s * expf(m - mx);
  M = mx;
}

// Writes a split's partial result: running max m (natural log), sum s and unnormalised output o.
__device__ __forceinline__ void store_partial(const StepParams& p, const Split& sp, int64_t head,
                                              float m, float s) {
  const int64_t at = (sp.rg * n_splits_total(p) + sp.index) * p.h + head;
  p.part_m[at] = m;
  p.part_s[at] = s;
}

__device__ __forceinline__ float* partial_out(const StepParams& p, const Split& sp) {
  return p.part_o + (sp.rg * n_splits_total(p) + sp.index) * p.h * p.dv;
}

// FFMA attention of one split (fp32 storage, and the shapes the tensor-core kernel does not
// take): tiles of kTileKeys keys, one warp per head for the online softmax; writes the split's
// partial (and the compressed logits). smem: ffma_smem_bytes. Ends with the block synchronised.
// Not inlined: one copy of the code for the fused decode kernel's three calls (measured with the
// batched K/V loads: ~3,500 fewer SM clocks per selected and window phase there, not a change in
// step time; docs/perf-cuda-decode.md).
template <typename T>
__device__ __noinline__ void ffma_attend(const StepParams& p, const Split& sp, float* smem) {
  constexpr int kTile = static_cast<int>(kTileKeys);
  const int h = static_cast<int>(p.h), dk = static_cast<int>(p.dk), dv = static_cast<int>(p.dv);
  const int kst = dk + 1;  // odd row stride: the threads of a warp read 32 different banks
  // Cache positions of the tile's keys, computed once per key instead of once per loaded vector
  // (the selected branch's gather divides by l_sel).
  int64_t* pos = reinterpret_cast<int64_t*>(smem);  // [kTile]
  float* qs = smem + 2 * kTile;                     // [h][dk], pre-scaled
  float* ks = qs + h * dk;                          // [kTile][dk + 1]
  float* vs = ks + kTile * kst;                     // [kTile][dv]
  float* lg = vs + kTile * dv;                      // [h][kTile]
  float* acc = lg + h * kTile;                      // [h][dv]
  float* m = acc + h * dv;                          // [h]
  float* s = m + h;                                 // [h]
  float* corr = s + h;                              // [h]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  const T* q = static_cast<const T*>(p.q) + (sp.r * p.H + sp.g * p.h) * p.dk;
  for (int i = threadIdx.x; i < h * dk; i += blockDim.x) qs[i] = to_f32(q[i]) * p.scale;
  for (int i = threadIdx.x; i < h * dv; i += blockDim.x) acc[i] = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    m[i] = -FLT_MAX;
    s[i] = 0.f;
  }
  float* logits_out = sp.branch == 0 ? p.cmp_logits + sp.rg * p.h * p.cap_cmp : nullptr;
  const T* K = static_cast<const T*>(sp.K);
  const T* V = static_cast<const T*>(sp.V);
  for (int64_t j0 = sp.start; j0 < sp.start + sp.n; j0 += kTile) {
    const int nk = static_cast<int>(min(kTileKeys, sp.start + sp.n - j0));
    if (threadIdx.x < nk) pos[threadIdx.x] = key_pos(sp, j0 + threadIdx.x);
    __syncthreads();
    load_kv_tile_f32<T>(
        ks, kst, vs, dv, nk, dk, dv, [&](int j) { return K + pos[j] * dk; },
        [&](int j) { return V + pos[j] * dv; });
    __syncthreads();
    for (int i = threadIdx.x; i < h * kTile; i += blockDim.x) {
      const int hh = i / kTile, j = i % kTile;
      float a = -FLT_MAX;
      if (j < nk) {
        const float* qq = qs + hh * dk;
        const float* kk = ks + j * kst;
        float acc4[4] = {0.f, 0.f, 0.f, 0.f};  // four chains instead of one
        int e = 0;
        for (; e + 4 <= dk; e += 4) {
#pragma unroll
          for (int u = 0; u < 4; ++u) acc4[u] += qq[e + u] * kk[e + u];
        }
        for (; e < dk; ++e) acc4[0] += qq[e] * kk[e];
        a = (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]);
        if (logits_out) logits_out[hh * p.cap_cmp + j0 + j] = a;
      }
      lg[i] = a;
    }
    __syncthreads();
    for (int hh = warp; hh < h; hh += n_warps) {
      float x[kTile / 32], mt = m[hh];
      for (int k = 0; k < kTile / 32; ++k) mt = fmaxf(mt, x[k] = lg[hh * kTile + lane + 32 * k]);
      for (int off = 16; off > 0; off /= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      float sum = 0.f;
      for (int k = 0; k < kTile / 32; ++k) {
        const int j = lane + 32 * k;
        const float e = j < nk ? expf(x[k] - mt) : 0.f;
        lg[hh * kTile + j] = e;
        sum += e;
      }
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        const float c = expf(m[hh] - mt);
        corr[hh] = c;
        s[hh] = s[hh] * c + sum;
        m[hh] = mt;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < h * dv; i += blockDim.x) {
      const int hh = i / dv, e = i % dv;
      const float* pr = lg + hh * kTile;
      float a4[4] = {0.f, 0.f, 0.f, 0.f};
      int j = 0;
      for (; j + 4 <= nk; j += 4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) a4[u] += pr[j + u] * vs[(j + u) * dv + e];
      }
      for (; j < nk; ++j) a4[0] += pr[j] * vs[j * dv + e];
      acc[i] = acc[i] * corr[hh] + ((a4[0] + a4[1]) + (a4[2] + a4[3]));
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < h; i += blockDim.x) store_partial(p, sp, i, m[i], s[i]);
  float* out = partial_out(p, sp);
  for (int i = threadIdx.x; i < h * dv; i += blockDim.x) out[i] = acc[i];
  __syncthreads();  // the caller may reuse smem
}

// FFMA split attention: one split per block.
template <typename T>
__global__ void __launch_bounds__(128)
    nsa_attn_split_kernel(const __grid_constant__ StepParams p, int phase) {
  extern __shared__ float smem[];
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  __shared__ int32_t blocks_s[64];
  Split sp;
  if (!split_range<T>(p, phase, sp)) return;
  stage_blocks(p, sp, blocks_s);
  ffma_attend<T>(p, sp, smem);
}

// Shared-memory bytes of nsa_attn_split_kernel.
inline size_t ffma_smem_bytes(int64_t h, int64_t dk, int64_t dv) {
  return sizeof(float) * static_cast<size_t>(2 * kTileKeys + h * dk + kTileKeys * (dk + 1) +
                                             kTileKeys * dv + h * kTileKeys + h * dv + 3 * h);
}

// --- 5. LSE combine of the three branches and gate mix ----------------------------------------
// Element `at` of the gated output o from the three branch outputs (zero-gated ones left out),
// and with p.compute_all the branch outputs themselves (only read back for inspection).
template <typename T>
__device__ __forceinline__ void write_gated(const StepParams& p, int64_t at, const float* gate,
                                            const float (&out)[3]) {
  if (p.compute_all) {
    p.o_cmp[at] = out[0];
    p.o_sel[at] = out[1];
    p.o_win[at] = out[2];
  }
  float o = 0.f;
  for (int k = 0; k < 3; ++k) {
    if (gate[k] != 0.f) o += gate[k] * out[k];
  }
  static_cast<T*>(p.o)[at] = from_f32<T>(o);
}

// Heads [hh0, hh0 + nh) of (row r, group g). weight: [nh][3][ws] floats, ws >= the splits of
// every branch. The partials are read through L2 (__ldcg): in the fused decode kernel other
// blocks of the same launch wrote them.
template <typename T>
__device__ __forceinline__ void combine_heads(const StepParams& p, int64_t r, int64_t g,
                                              int64_t hh0, int64_t nh, float* weight, int64_t ws) {
  const int64_t rg = r * p.G + g;
  // Independent loads first, so their latencies overlap.
  const float gate[3] = {p.gates[rg * 3], p.gates[rg * 3 + 1], p.gates[rg * 3 + 2]};
  const int64_t sel_tokens = p.reads[rg * 3 + 1];
  const RowInfo ri = row_info(p, r);
  const int64_t n_cmp = num_cmp(ri.L, p.l, p.d);
  const int64_t n_win = p.w > 0 ? min(p.w, ri.L) : 0;
  const int64_t first[3] = {0, p.n_cmp_splits + p.n_win_splits, p.n_cmp_splits};
  int64_t count[3] = {splits_used(n_cmp, p.n_cmp_splits), splits_used(sel_tokens, p.n_sel_splits),
                      splits_used(n_win, p.n_win_splits)};
  for (int k = 0; k < 3; ++k) {
    if (!p.compute_all && gate[k] == 0.f) count[k] = 0;  // skipped branch: no partials written
  }
  const int64_t NS = n_splits_total(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  // One warp per (head, branch): max and sum over the splits, each lane's online over its
  // splits, then merged across the warp (one round trip to L2 for m and s, not three).
  for (int64_t task = warp; task < nh * 3; task += n_warps) {
    const int64_t hh = hh0 + task / 3;
    const int k = static_cast<int>(task % 3);
    const float* pm = p.part_m + (rg * NS + first[k]) * p.h + hh;
    const float* ps = p.part_s + (rg * NS + first[k]) * p.h + hh;
    float* wk = weight + task * ws;
    float M = -FLT_MAX, S = 0.f, m0 = -FLT_MAX;  // m0: the lane's first split's max
    for (int64_t sp = lane; sp < count[k]; sp += 32) {
      const float m = __ldcg(pm + sp * p.h);
      if (sp == lane) m0 = m;
      merge_max_sum(M, S, m, __ldcg(ps + sp * p.h));
    }
    for (int off = 16; off > 0; off /= 2) {
      merge_max_sum(M, S, __shfl_xor_sync(0xffffffffu, M, off),
                    __shfl_xor_sync(0xffffffffu, S, off));
    }
    for (int64_t sp = lane; sp < count[k]; sp += 32) {
      const float m = sp == lane ? m0 : __ldcg(pm + sp * p.h);  // reloaded past 32 splits
      wk[sp] = S > 0.f ? expf(m - M) / S : 0.f;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nh * p.dv; i += blockDim.x) {
    const int64_t j = div32(i, p.dv), hh = hh0 + j, e = mod32(i, p.dv);
    // The first eight splits of all three branches load before any sum (__ldcg is volatile
    // asm: loads and sums interleaved would wait one L2 round trip per split); further splits
    // eight at a time.
    constexpr int kBatch = 8;
    const int64_t stride = p.h * p.dv;
    const float* po[3];
    const float* wk[3];
    int n[3];
    float v[3][kBatch], out[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      po[k] = p.part_o + ((rg * NS + first[k]) * p.h + hh) * p.dv + e;
      wk[k] = weight + (j * 3 + k) * ws;
      n[k] = static_cast<int>(count[k]);
#pragma unroll
      for (int u = 0; u < kBatch; ++u) v[k][u] = u < n[k] ? __ldcg(po[k] + u * stride) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
#pragma unroll
      for (int u = 0; u < kBatch; ++u) out[k] += u < n[k] ? wk[k][u] * v[k][u] : 0.f;
      for (int s0 = kBatch; s0 < n[k]; s0 += kBatch) {
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          v[k][u] = s0 + u < n[k] ? __ldcg(po[k] + (s0 + u) * stride) : 0.f;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) out[k] += s0 + u < n[k] ? wk[k][u + s0] * v[k][u] : 0.f;
      }
    }
    write_gated<T>(p, (r * p.H + g * p.h + hh) * p.dv + e, gate, out);
  }
}

// Counts one finished unit (a combine block, or a (row, group) of the fused decode kernel); the
// last of n advances the device length by p.advance: every unit has read the length by then,
// and nothing later in the step reads it. Called by one thread.
__device__ __forceinline__ void finish_step(const StepParams& p, uint32_t n) {
  if (p.len_out == nullptr) return;
  __threadfence();
  if (atomicAdd(p.done, 1u) == n - 1) {
    *p.len_out += p.advance;
    *p.done = 0;
  }
}

// One (row, head) per block, of 96 to 256 threads (dv rounded up to a warp). The bounds are
// stated for the largest block (4 x 256 threads per SM), which caps registers at 64: then 8
// blocks of 128 threads (dv 128) fit an SM and the 1,024 blocks of B = 16 at 64 heads run in one
// wave (70 registers made it 7 and 1.1 waves).
template <typename T>
__global__ void __launch_bounds__(256, 4) nsa_combine_kernel(const __grid_constant__ StepParams p) {
  __shared__ float weight[3][kMaxSplits];  // exp(m_s - M) / S per split and branch
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  const int64_t r = blockIdx.x, hd = blockIdx.y;
  combine_heads<T>(p, r, div32(hd, p.h), mod32(hd, p.h), 1, &weight[0][0], kMaxSplits);
  if (p.len_out == nullptr) return;
  __syncthreads();
  if (threadIdx.x == 0) finish_step(p, gridDim.x * gridDim.y);
}

}  // namespace nsa::cuda
