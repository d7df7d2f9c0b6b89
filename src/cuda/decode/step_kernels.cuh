// Device code of one NSA step (decode, or a chunk of prefill rows): RoPE + cache append + gate,
// compressed-token emission, split attention (cmp / win / sel), scoring + top-n selection, and
// the gated combine. Each K/V tile is loaded once into shared memory for all heads of a group.
#pragma once

#include <cfloat>

#include "cuda/common/types.cuh"
#include "cuda/decode/step_params.h"

namespace nsa::cuda {

constexpr int kKeyTile = 64;  // keys per shared-memory tile of the FFMA attention kernel

struct RowInfo {
  int64_t r, b, t, L;
};

__device__ __forceinline__ RowInfo row_info(const StepParams& p, int64_t r) {
  const int64_t row = p.row0 + r;
  const int64_t t = *p.len + row % p.T;
  return {r, row / p.T, t, t + 1};
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

// --- 1. RoPE and cache append (grid: rows x chunks of the row's work) -------------------------
template <typename T>
__global__ void nsa_append_kernel(StepParams p) {
  const RowInfo ri = row_info(p, blockIdx.x);
  const float* pr = p.proj + ri.r * p.P;
  T* q = static_cast<T*>(p.q) + ri.r * p.H * p.dk;
  const int half = static_cast<int>(p.dk / 2);
  const int first = blockIdx.y * blockDim.x + threadIdx.x;
  const int stride = gridDim.y * blockDim.x;
  // Rotate (q heads, then the three keys) pair by pair; angles in double (positions reach 1e5).
  const int n_pairs = static_cast<int>((p.H + 3 * p.G) * half);
  for (int i = first; i < n_pairs; i += stride) {
    const int vec = i / half, j = i % half;
    const double a = static_cast<double>(ri.t) *
                     pow(p.rope_theta, -2.0 * static_cast<double>(j) / static_cast<double>(p.dk));
    double sn, cs;
    sincos(a, &sn, &cs);
    const float* src;
    T* dst;
    if (vec < p.H) {
      src = pr + vec * p.dk;
      dst = q + vec * p.dk;
    } else {
      const int64_t kv = (vec - p.H) / p.G, g = (vec - p.H) % p.G;  // kv: 0 cmp, 1 sel, 2 win
      src = pr + p.H * p.dk + kv * p.G * (p.dk + p.dv) + g * p.dk;
      void* base = kv == 0 ? p.k_cmp_raw : kv == 1 ? p.k_sel : p.k_win;
      dst = static_cast<T*>(base) + cache_at(p, ri.b, g, ri.t, p.dk, p.cap);
    }
    const double x0 = src[2 * j], x1 = src[2 * j + 1];
    dst[2 * j] = from_f32<T>(static_cast<float>(x0 * cs - x1 * sn));
    dst[2 * j + 1] = from_f32<T>(static_cast<float>(x0 * sn + x1 * cs));
  }
  const int G = static_cast<int>(p.G), dv = static_cast<int>(p.dv);
  const int n_vals = 3 * G * dv;
  for (int i = first; i < n_vals; i += stride) {
    const int kv = i / (G * dv), g = (i / dv) % G, e = i % dv;
    const float v = pr[p.H * p.dk + kv * p.G * (p.dk + p.dv) + p.G * p.dk + g * p.dv + e];
    void* base = kv == 0 ? p.v_cmp_raw : kv == 1 ? p.v_sel : p.v_win;
    static_cast<T*>(base)[cache_at(p, ri.b, g, ri.t, p.dv, p.cap) + e] = from_f32<T>(v);
  }
}

// --- 2. Compressed-token emission and the gate, per (row, group) ------------------------------
template <typename T>
__global__ void nsa_emit_gate_kernel(StepParams p) {
  extern __shared__ float smem[];  // u[dk], hid[g_hid]
  const RowInfo ri = row_info(p, blockIdx.x);
  const int64_t g = blockIdx.y;
  if (ri.L >= p.l && (ri.L - p.l) % p.d == 0) {
    const int64_t i = (ri.L - p.l) / p.d;
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
  if (p.gates == nullptr) return;  // cache filling: no queries
  // Gate from the mean of the group's rotated queries (SPEC section 2, step 4).
  const T* q = static_cast<const T*>(p.q) + (ri.r * p.H + g * p.h) * p.dk;
  float* u = smem;
  float* hid = smem + p.dk;
  for (int64_t e = threadIdx.x; e < p.dk; e += blockDim.x) {
    float s = 0.f;
    for (int64_t j = 0; j < p.h; ++j) s += to_f32(q[j * p.dk + e]);
    u[e] = s / static_cast<float>(p.h);
  }
  __syncthreads();
  // One warp per output unit; lanes split the dot product (coalesced weight rows).
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int64_t i = warp; i < p.g_hid; i += n_warps) {
    float a = 0.f;
    for (int64_t e = lane; e < p.dk; e += 32) a += p.fc1_w[i * p.dk + e] * u[e];
    for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
    a += p.fc1_b[i];
    if (lane == 0) hid[i] = a / (1.f + expf(-a));
  }
  __syncthreads();
  __shared__ float z[3];
  for (int64_t k = warp; k < 3; k += n_warps) {
    float a = 0.f;
    for (int64_t i = lane; i < p.g_hid; i += 32) a += p.fc2_w[k * p.g_hid + i] * hid[i];
    for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (lane == 0) z[k] = a + p.fc2_b[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float* gate = p.gates + (ri.r * p.G + g) * 3;
    if (p.gate_sigmoid) {
      for (int k = 0; k < 3; ++k) gate[k] = 1.f / (1.f + expf(-z[k]));
    } else {
      const float m = fmaxf(z[0], fmaxf(z[1], z[2])) / p.gate_temp;
      float e[3], s = 0.f;
      for (int k = 0; k < 3; ++k) s += (e[k] = expf(z[k] / p.gate_temp - m));
      for (int k = 0; k < 3; ++k) gate[k] = e[k] / s;
    }
  }
}

// --- 3. Split attention: one (row, group, key range) per block, all h heads at once ------------
// phase 0: splits [0, n_cmp_splits) are compressed attention (logits kept for scoring), then
// n_win_splits window splits. phase 1: n_sel splits, one per selected block.
// The key range [start, end) of one attention split and where its keys live. Returns false when
// the split has no keys or its branch is gated off.
struct Split {
  int64_t rg, r, g, index, start, end;
  int branch;  // 0 cmp, 1 sel, 2 win
  const void* K;
  const void* V;
};

template <typename T>
__device__ __forceinline__ bool split_range(const StepParams& p, int phase, Split& sp) {
  sp.rg = blockIdx.x;
  sp.r = sp.rg / p.G;
  sp.g = sp.rg % p.G;
  const RowInfo ri = row_info(p, sp.r);
  sp.index = blockIdx.y;
  sp.start = sp.end = 0;
  const T* K;
  const T* V;
  int64_t cap = p.cap;
  if (phase == 0 && sp.index < p.n_cmp_splits) {
    sp.branch = 0;
    sp.start = sp.index * kCmpChunk;
    sp.end = min(sp.start + kCmpChunk, num_cmp(ri.L, p.l, p.d));
    K = static_cast<const T*>(p.k_cmp);
    V = static_cast<const T*>(p.v_cmp);
    cap = p.cap_cmp;
  } else if (phase == 0) {
    sp.branch = 2;
    const int64_t ws = max(int64_t{0}, ri.t - p.w + 1);
    sp.start = ws + (sp.index - p.n_cmp_splits) * kWinChunk;
    sp.end = p.w > 0 ? min(sp.start + kWinChunk, ri.L) : 0;
    K = static_cast<const T*>(p.k_win);
    V = static_cast<const T*>(p.v_win);
  } else {
    sp.branch = 1;
    const int32_t blk = p.sel_blocks[sp.rg * p.n_sel + sp.index];
    if (blk >= 0) {
      sp.start = static_cast<int64_t>(blk) * p.l_sel;
      sp.end = min(sp.start + p.l_sel, ri.L);
    }
    sp.index += p.n_cmp_splits + p.n_win_splits;
    K = static_cast<const T*>(p.k_sel);
    V = static_cast<const T*>(p.v_sel);
  }
  if (sp.start >= sp.end || !branch_needed(p, p.gates + sp.rg * 3, sp.branch)) return false;
  sp.K = K + cache_at(p, ri.b, sp.g, 0, p.dk, cap);
  sp.V = V + cache_at(p, ri.b, sp.g, 0, p.dv, cap);
  return true;
}

// Reads src[0, n) as f32 with kStage loads per thread in flight, then hands each to store(i, v).
template <typename T, typename Store>
__device__ __forceinline__ void stage_load(const T* src, int n, Store store) {
  constexpr int kStage = 8;
  for (int base = threadIdx.x; base < n; base += kStage * blockDim.x) {
    float r[kStage];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      r[u] = i < n ? to_f32(src[i]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      if (i < n) store(i, r[u]);
    }
  }
}

// FFMA split attention (fp32 storage, or head groups the MMA path does not take). Tiles of
// kKeyTile keys; 32-bit indices inside the block; one warp per head for the online softmax.
template <typename T>
__global__ void __launch_bounds__(128) nsa_attn_split_kernel(StepParams p, int phase) {
  extern __shared__ float smem[];
  Split sp;
  if (!split_range<T>(p, phase, sp)) return;
  const int h = static_cast<int>(p.h), dk = static_cast<int>(p.dk), dv = static_cast<int>(p.dv);
  const int kst = dk + 1;
  float* qs = smem;                 // [h][dk], pre-scaled
  float* ks = qs + h * dk;          // [kKeyTile][dk + 1]
  float* vs = ks + kKeyTile * kst;  // [kKeyTile][dv]
  float* lg = vs + kKeyTile * dv;   // [h][kKeyTile]
  float* acc = lg + h * kKeyTile;   // [h][dv]
  float* m = acc + h * dv;          // [h]
  float* s = m + h;                 // [h]
  float* corr = s + h;              // [h]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  const T* q = static_cast<const T*>(p.q) + (sp.r * p.H + sp.g * p.h) * p.dk;
  for (int i = threadIdx.x; i < h * dk; i += blockDim.x) qs[i] = to_f32(q[i]) * p.scale;
  for (int i = threadIdx.x; i < h * dv; i += blockDim.x) acc[i] = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    m[i] = -FLT_MAX;
    s[i] = 0.f;
  }
  float* logits_out = sp.branch == 0 ? p.cmp_logits + sp.rg * p.h * p.cap_cmp : nullptr;
  for (int64_t k0 = sp.start; k0 < sp.end; k0 += kKeyTile) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(kKeyTile), sp.end - k0));
    const T* K = static_cast<const T*>(sp.K) + k0 * p.dk;
    const T* V = static_cast<const T*>(sp.V) + k0 * p.dv;
    __syncthreads();
    stage_load(K, nk * dk, [&](int i, float v) { ks[(i / dk) * kst + i % dk] = v; });
    stage_load(V, nk * dv, [&](int i, float v) { vs[i] = v; });
    __syncthreads();
    for (int i = threadIdx.x; i < h * kKeyTile; i += blockDim.x) {
      const int hh = i / kKeyTile, j = i % kKeyTile;
      float a = -FLT_MAX;
      if (j < nk) {
        const float* qq = qs + hh * dk;
        const float* kk = ks + j * kst;
        a = 0.f;
        for (int e = 0; e < dk; ++e) a += qq[e] * kk[e];
        if (logits_out) logits_out[hh * p.cap_cmp + k0 + j] = a;
      }
      lg[i] = a;
    }
    __syncthreads();
    for (int hh = warp; hh < h; hh += n_warps) {
      float x[kKeyTile / 32], mt = m[hh];
      for (int k = 0; k < kKeyTile / 32; ++k)
        mt = fmaxf(mt, x[k] = lg[hh * kKeyTile + lane + 32 * k]);
      for (int off = 16; off > 0; off /= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      float sum = 0.f;
      for (int k = 0; k < kKeyTile / 32; ++k) {
        const int j = lane + 32 * k;
        const float e = j < nk ? expf(x[k] - mt) : 0.f;
        lg[hh * kKeyTile + j] = e;
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
      const float* pr = lg + hh * kKeyTile;
      float a = acc[i] * corr[hh];
      for (int j = 0; j < nk; ++j) a += pr[j] * vs[j * dv + e];
      acc[i] = a;
    }
  }
  __syncthreads();
  const int64_t base = (sp.rg * n_splits_total(p) + sp.index) * p.h;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    p.part_m[base + i] = m[i];
    p.part_s[base + i] = s[i];
  }
  for (int i = threadIdx.x; i < h * dv; i += blockDim.x) p.part_o[base * p.dv + i] = acc[i];
}

// --- 4. cmp/win combine, block scores, top-n selection, reads -------------------------------
__device__ __forceinline__ bool better(float va, int64_t ja, float vb, int64_t jb) {
  return va > vb || (va == vb && ja < jb);
}

__global__ void nsa_select_kernel(StepParams p) {
  extern __shared__ float smem[];  // M[h], S[h], score[cap / l_sel + 1]
  __shared__ float red_v[32];
  __shared__ int64_t red_j[32];
  __shared__ int64_t chosen[64];
  __shared__ int64_t n_chosen;
  const int64_t rg = blockIdx.x, r = rg / p.G;
  const RowInfo ri = row_info(p, r);
  const float* gate = p.gates + rg * 3;
  const bool need_scores = branch_needed(p, gate, 0);
  const bool need_sel = p.compute_all || gate[1] != 0.f;
  const int64_t h = p.h;
  float* M = smem;
  float* S = M + h;
  float* score = S + h;
  const int64_t n_cmp = num_cmp(ri.L, p.l, p.d);
  const int64_t ns_cmp = need_scores ? (n_cmp + kCmpChunk - 1) / kCmpChunk : 0;
  const int64_t n_win = p.w > 0 ? min(p.w, ri.L) : 0;

  {  // one warp per head: max and sum over the compressed splits
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    const int64_t NS = n_splits_total(p);
    for (int64_t hh = warp; hh < h; hh += n_warps) {
      const float* pm = p.part_m + rg * NS * h + hh;
      const float* pss = p.part_s + rg * NS * h + hh;
      float mx = -FLT_MAX;
      for (int64_t k = lane; k < ns_cmp; k += 32) mx = fmaxf(mx, pm[k * h]);
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      float sum = 0.f;
      for (int64_t k = lane; k < ns_cmp; k += 32) sum += pss[k * h] * expf(pm[k * h] - mx);
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        M[hh] = mx;
        S[hh] = sum;
      }
    }
  }
  __syncthreads();
  int32_t* blocks = p.sel_blocks + rg * p.n_sel;
  if (!need_sel) {
    for (int64_t k = threadIdx.x; k < p.n_sel; k += blockDim.x) blocks[k] = -1;
    if (threadIdx.x == 0) {
      p.sel_count[rg] = 0;
      int32_t* rd = p.reads + rg * 3;
      rd[0] = static_cast<int32_t>(n_cmp);
      rd[1] = 0;
      rd[2] = static_cast<int32_t>(n_win);
    }
    return;
  }
  // Group score of each complete block. The overlap weights do not depend on the head, so first
  // sum p_cmp over the heads (in place, over head 0's logits), then spread it over the blocks.
  const int64_t nb = ri.L / p.l_sel;
  float* logits = p.cmp_logits + rg * h * p.cap_cmp;
  for (int64_t i = threadIdx.x; i < n_cmp; i += blockDim.x) {
    float ps = 0.f;
    for (int64_t hh = 0; hh < h; ++hh) ps += expf(logits[hh * p.cap_cmp + i] - M[hh]) / S[hh];
    logits[i] = ps;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
    const int64_t lo_num = j * p.l_sel - p.l + 1;
    const int64_t i_lo = lo_num <= 0 ? 0 : (lo_num + p.d - 1) / p.d;
    const int64_t i_hi = min(n_cmp - 1, ((j + 1) * p.l_sel - 1) / p.d);
    float sc = 0.f;
    for (int64_t i = i_lo; i <= i_hi; ++i) {
      sc += logits[i] * static_cast<float>(overlap(i, j, p.l, p.d, p.l_sel)) /
            static_cast<float>(p.l);
    }
    score[j] = sc;
  }
  __syncthreads();
  const int64_t cur = ri.t / p.l_sel;
  int64_t forced[3], nf = 0;
  const int64_t cand_forced[3] = {0, cur, cur - 1};
  for (int64_t j : cand_forced) {
    bool dup = j < 0;
    for (int64_t k = 0; k < nf; ++k) dup = dup || forced[k] == j;
    if (!dup) forced[nf++] = j;
  }
  int64_t forced_complete = 0;
  for (int64_t k = 0; k < nf; ++k) forced_complete += forced[k] < nb;
  if (threadIdx.x == 0) {
    for (int64_t k = 0; k < nf; ++k)
      if (forced[k] < nb) score[forced[k]] = -1.f;  // scores are >= 0: -1 marks "not a candidate"
    n_chosen = 0;
  }
  __syncthreads();
  const int64_t take = min(p.n_sel - nf, nb - forced_complete);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = (blockDim.x + 31) / 32;
  for (int64_t it = 0; it < take; ++it) {
    float bv = -2.f;
    int64_t bj = INT64_MAX;
    for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
      if (score[j] >= 0.f && better(score[j], j, bv, bj)) {
        bv = score[j];
        bj = j;
      }
    }
    for (int off = 16; off > 0; off /= 2) {
      const float ov = __shfl_down_sync(0xffffffffu, bv, off);
      const int64_t oj = __shfl_down_sync(0xffffffffu, bj, off);
      if (better(ov, oj, bv, bj)) {
        bv = ov;
        bj = oj;
      }
    }
    if (lane == 0) {
      red_v[warp] = bv;
      red_j[warp] = bj;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 1; k < n_warps; ++k) {
        if (better(red_v[k], red_j[k], bv, bj)) {
          bv = red_v[k];
          bj = red_j[k];
        }
      }
      chosen[n_chosen++] = bj;
      score[bj] = -1.f;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int64_t all[67];
    int64_t n = 0;
    for (int64_t k = 0; k < nf; ++k) all[n++] = forced[k];
    for (int64_t k = 0; k < n_chosen; ++k) all[n++] = chosen[k];
    for (int64_t a = 1; a < n; ++a) {  // insertion sort, n <= n_sel
      const int64_t v = all[a];
      int64_t b = a - 1;
      for (; b >= 0 && all[b] > v; --b) all[b + 1] = all[b];
      all[b + 1] = v;
    }
    int64_t tokens = 0;
    for (int64_t k = 0; k < p.n_sel; ++k) {
      blocks[k] = k < n ? static_cast<int32_t>(all[k]) : -1;
      if (k < n) tokens += min((all[k] + 1) * p.l_sel, ri.L) - all[k] * p.l_sel;
    }
    p.sel_count[rg] = static_cast<int32_t>(n);
    int32_t* rd = p.reads + rg * 3;
    rd[0] = static_cast<int32_t>(n_cmp);
    rd[1] = static_cast<int32_t>(tokens);
    rd[2] = static_cast<int32_t>(n_win);
    atomicAdd(p.reads_acc + 0, static_cast<unsigned long long>(n_cmp));
    atomicAdd(p.reads_acc + 1, static_cast<unsigned long long>(tokens));
    atomicAdd(p.reads_acc + 2, static_cast<unsigned long long>(n_win));
  }
}

// --- 5. LSE combine of the three branches and gate mix, per (row, head) -----------------------
constexpr int kMaxSplits = 256;  // per branch; checked on the host

template <typename T>
__global__ void nsa_combine_kernel(StepParams p) {
  __shared__ float weight[3][kMaxSplits];  // exp(m_s - M) / S per split and branch
  const int64_t r = blockIdx.x, hd = blockIdx.y, g = hd / p.h, hh = hd % p.h, rg = r * p.G + g;
  const RowInfo ri = row_info(p, r);
  const float* gate = p.gates + rg * 3;
  const int64_t n_cmp = num_cmp(ri.L, p.l, p.d);
  const int64_t n_win = p.w > 0 ? min(p.w, ri.L) : 0;
  const int64_t first[3] = {0, p.n_cmp_splits + p.n_win_splits, p.n_cmp_splits};
  int64_t count[3] = {(n_cmp + kCmpChunk - 1) / kCmpChunk, p.sel_count[rg],
                      (n_win + kWinChunk - 1) / kWinChunk};
  for (int k = 0; k < 3; ++k) {
    if (!p.compute_all && gate[k] == 0.f) count[k] = 0;  // skipped branch: no partials written
  }
  const int64_t NS = n_splits_total(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp < 3) {  // one warp per branch: max and sum over the splits
    const int k = warp;
    const float* pm = p.part_m + (rg * NS + first[k]) * p.h + hh;
    const float* ps = p.part_s + (rg * NS + first[k]) * p.h + hh;
    float M = -FLT_MAX;
    for (int64_t sp = lane; sp < count[k]; sp += 32) M = fmaxf(M, pm[sp * p.h]);
    for (int off = 16; off > 0; off /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float S = 0.f;
    for (int64_t sp = lane; sp < count[k]; sp += 32) S += ps[sp * p.h] * expf(pm[sp * p.h] - M);
    for (int off = 16; off > 0; off /= 2) S += __shfl_xor_sync(0xffffffffu, S, off);
    for (int64_t sp = lane; sp < count[k]; sp += 32)
      weight[k][sp] = S > 0.f ? expf(pm[sp * p.h] - M) / S : 0.f;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < p.dv; e += blockDim.x) {
    float out[3];
    for (int k = 0; k < 3; ++k) {
      const float* po = p.part_o + ((rg * NS + first[k]) * p.h + hh) * p.dv + e;
      float o = 0.f;
      for (int64_t sp = 0; sp < count[k]; ++sp) o += weight[k][sp] * po[sp * p.h * p.dv];
      out[k] = o;
    }
    const int64_t at = (r * p.H + hd) * p.dv + e;
    p.o_cmp[at] = out[0];
    p.o_sel[at] = out[1];
    p.o_win[at] = out[2];
    float o = 0.f;
    for (int k = 0; k < 3; ++k) {
      if (gate[k] != 0.f) o += gate[k] * out[k];
    }
    static_cast<T*>(p.o)[at] = from_f32<T>(o);
  }
}

// Advances the device length after every kernel of the step has read it.
__global__ void nsa_advance_kernel(int64_t* len, int64_t by) { *len += by; }

}  // namespace nsa::cuda
