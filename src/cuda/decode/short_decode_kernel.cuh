// The whole attention of a decode step at short contexts in one kernel with few dependent round
// trips to memory (the default where the cache holds at most kShortMaxChunks selection blocks;
// docs/perf-cuda-decode.md, v37).
//
// Grid (row, group) x (C + 1) blocks, C = the selection blocks ("chunks") the cache can hold.
// Block y < C owns chunk y: the raw positions [y l_sel, (y + 1) l_sel). Because a chunk block is
// tied to a block index, not to a rank in the selected list, it can load its chunk's selected and
// window keys before the selection is known: every block issues all its loads (its projection
// row, the gate's weights, the compressed keys, the raw rows of an emission, its chunk's K/V
// tiles) in one batch right after it reads the length, then works from shared memory: RoPE,
// emission, gate, compressed logits, scores and top-n (every block computes the same selection),
// and its chunk's selected and window partials. Block C does the compressed branch. The last
// block of a (row, group) to finish combines and gates. Critical path: the length, one batch of
// loads, the partial stores and a counter, the combine's loads.
#pragma once

#include "cuda/decode/attn_tc_kernel.cuh"
#include "cuda/decode/select_kernels.cuh"

namespace nsa::cuda {

constexpr int kShortThreads = 256;
constexpr int64_t kShortMaxChunks = 32;  // selection blocks of the cache (one mask bit each)
constexpr int64_t kShortMaxCmp = 128;    // compressed tokens of the cache
constexpr int64_t kShortMaxTile = 128;   // l_sel

NSA_HOST_DEVICE inline int64_t short_align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Shared-memory layout of nsa_short_decode_kernel: byte offsets, the same on the host (bytes) and
// on the device. Key rows are padded by 16 bytes (k_ld elements), so the threads of a warp, each
// reading 16 bytes of a different key, hit different banks.
struct ShortLayout {
  int64_t k_ld;
  int64_t proj;  // f32 [h + 3][dk] q heads, k_cmp, k_sel, k_win; [3][dv] values
  int64_t fc1_w, fc1_b, fc2_w, fc2_b;  // f32, as StepParams
  int64_t freq;                        // f64 [3][dk / 2] RoPE frequencies, cos, sin
  int64_t k_cmp;                       // T [cap_cmp][k_ld]
  int64_t raw_k;                       // T [l][dk] raw cmp keys of an emission
  int64_t v_cmp, raw_v;                // compressed block: T [cap_cmp][dv], [l][dv]
  int64_t k_sel, v_sel, k_win, v_win;  // chunk blocks (same region): T [l_sel][k_ld], [l_sel][dv]
  int64_t lg_cmp;                      // f32 [h][cap_cmp] compressed logits, then exp(x - M)
  int64_t lg_tile;                     // f32 [2][h][l_sel] the chunk's sel and window logits
  int64_t u, hid;                      // f32 [dk], [g_hid]
  int64_t stats;                       // f32 [2][h]: max and sum of the compressed softmax
  int64_t weight;                      // f32 [h][3][kShortMaxChunks] the combine's split weights
  int64_t bytes;
};

NSA_HOST_DEVICE inline ShortLayout short_layout(int64_t h, int64_t dk, int64_t dv, int64_t g_hid,
                                                int64_t l, int64_t l_sel, int64_t cap_cmp,
                                                int64_t esize) {
  ShortLayout s{};
  s.k_ld = dk + 16 / esize;
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t o = at;
    at += short_align16(bytes);
    return o;
  };
  s.proj = take(4 * ((h + 3) * dk + 3 * dv));
  s.fc1_w = take(4 * g_hid * dk);
  s.fc1_b = take(4 * g_hid);
  s.fc2_w = take(4 * 3 * g_hid);
  s.fc2_b = take(4 * 3);
  s.freq = take(8 * 3 * (dk / 2));
  s.k_cmp = take(esize * cap_cmp * s.k_ld);
  s.raw_k = take(esize * l * dk);
  const int64_t region = at;  // the compressed block's values, or a chunk block's tiles
  s.v_cmp = take(esize * cap_cmp * dv);
  s.raw_v = take(esize * l * dv);
  const int64_t end_cmp = at;
  at = region;
  s.k_sel = take(esize * l_sel * s.k_ld);
  s.v_sel = take(esize * l_sel * dv);
  s.k_win = take(esize * l_sel * s.k_ld);
  s.v_win = take(esize * l_sel * dv);
  at = at > end_cmp ? at : end_cmp;
  s.lg_cmp = take(4 * h * cap_cmp);
  s.lg_tile = take(4 * 2 * h * l_sel);
  s.u = take(4 * dk);
  s.hid = take(4 * g_hid);
  s.stats = take(4 * 2 * h);
  s.weight = take(4 * h * 3 * kShortMaxChunks);
  s.bytes = at;
  return s;
}

// Rows [0, rows) of row_bytes each (a multiple of 16, as are both strides and addresses) from
// src into shared memory at dst, as 16-byte cp.async copies spread over the block.
__device__ __forceinline__ void short_copy_rows(void* dst, int64_t dst_stride, const void* src,
                                                int64_t src_stride, int64_t rows,
                                                int64_t row_bytes) {
  const int chunks = static_cast<int>(row_bytes / 16), n = static_cast<int>(rows) * chunks;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int r = i / chunks, c = i % chunks;
    cp_async16(smem_addr(static_cast<char*>(dst) + r * dst_stride + c * 16),
               static_cast<const char*>(src) + r * src_stride + c * 16, true);
  }
}

// n 4-byte words from src into shared memory at dst (arrays of any length).
__device__ __forceinline__ void short_copy_words(void* dst, const void* src, int64_t n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                     smem_addr(static_cast<char*>(dst) + 4 * i)),
                 "l"(static_cast<const char*>(src) + 4 * i));
  }
}

// q . k over dk elements: q f32 in shared memory, k a padded key row (16-byte aligned).
template <typename T>
__device__ __forceinline__ float short_dot(const float* q, const T* k, int dk) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  float a[4] = {0.f, 0.f, 0.f, 0.f};
  for (int e = 0; e < dk; e += kPer) {
    const uint4 raw = *reinterpret_cast<const uint4*>(k + e);
    const T* kv = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < kPer; ++u) a[u % 4] += q[e + u] * to_f32(kv[u]);
  }
  return (a[0] + a[1]) + (a[2] + a[3]);
}

// sum_j pr[j] v[j][e] over n rows of width dv, with four independent sums (one sum would be a
// chain of dependent FMAs).
template <typename T>
__device__ __forceinline__ float short_pv(const float* pr, const T* vt, int n, int dv, int e) {
  float a[4] = {0.f, 0.f, 0.f, 0.f};
  int j = 0;
  for (; j + 4 <= n; j += 4) {
#pragma unroll
    for (int q = 0; q < 4; ++q) a[q] += pr[j + q] * to_f32(vt[(j + q) * dv + e]);
  }
  for (; j < n; ++j) a[0] += pr[j] * to_f32(vt[j * dv + e]);
  return (a[0] + a[1]) + (a[2] + a[3]);
}

// Max and sum of exp(x - max) of x[0, n), replaced by exp(x - max), by one warp (n >= 1).
__device__ __forceinline__ void short_softmax_row(float* x, int n, float& m_out, float& s_out) {
  const int lane = threadIdx.x % 32;
  float m = -FLT_MAX;
  for (int j = lane; j < n; j += 32) m = fmaxf(m, x[j]);
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float s = 0.f;
  for (int j = lane; j < n; j += 32) {
    const float e = expf(x[j] - m);
    x[j] = e;
    s += e;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  m_out = m;
  s_out = s;
}

template <typename T>
__global__ void __launch_bounds__(kShortThreads)
    nsa_short_decode_kernel(const __grid_constant__ StepParams p) {
  extern __shared__ __align__(16) unsigned char short_smem[];
  unsigned char* smem = short_smem;
  __shared__ float gate[3];
  __shared__ uint32_t sel_mask;
  __shared__ bool last;
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  const long long clock0 = clock64();
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int lane = tid % 32, warp = tid / 32, n_warps = nthreads / 32;
  const int64_t rg = blockIdx.x, r = div32(rg, p.G), g = mod32(rg, p.G);
  const int C = static_cast<int>(p.n_sel_splits), y = static_cast<int>(blockIdx.y);
  const bool cmp_block = y == C;
  const int h = static_cast<int>(p.h), dk = static_cast<int>(p.dk), dv = static_cast<int>(p.dv);
  const int g_hid = static_cast<int>(p.g_hid), l = static_cast<int>(p.l);
  const int l_sel = static_cast<int>(p.l_sel), cap_cmp = static_cast<int>(p.cap_cmp);
  constexpr int es = static_cast<int>(sizeof(T));
  const ShortLayout lay = short_layout(h, dk, dv, g_hid, l, l_sel, cap_cmp, es);
  const int k_ld = static_cast<int>(lay.k_ld);
  auto at = [&](int64_t off) { return smem + off; };
  float* proj = reinterpret_cast<float*>(at(lay.proj));
  T* kc = reinterpret_cast<T*>(at(lay.k_cmp));
  T* raw_k = reinterpret_cast<T*>(at(lay.raw_k));
  T* vc = reinterpret_cast<T*>(at(lay.v_cmp));
  T* raw_v = reinterpret_cast<T*>(at(lay.raw_v));
  T* tile_k[2] = {reinterpret_cast<T*>(at(lay.k_sel)), reinterpret_cast<T*>(at(lay.k_win))};
  T* tile_v[2] = {reinterpret_cast<T*>(at(lay.v_sel)), reinterpret_cast<T*>(at(lay.v_win))};
  float* lg_cmp = reinterpret_cast<float*>(at(lay.lg_cmp));
  float* lg_tile = reinterpret_cast<float*>(at(lay.lg_tile));
  float* u = reinterpret_cast<float*>(at(lay.u));
  float* hid = reinterpret_cast<float*>(at(lay.hid));
  float* stats = reinterpret_cast<float*>(at(lay.stats));  // [2][h]
  float* weight = reinterpret_cast<float*>(at(lay.weight));
  const float* fc1_w = reinterpret_cast<const float*>(at(lay.fc1_w));
  const float* fc1_b = reinterpret_cast<const float*>(at(lay.fc1_b));
  const float* fc2_w = reinterpret_cast<const float*>(at(lay.fc2_w));
  const float* fc2_b = reinterpret_cast<const float*>(at(lay.fc2_b));
  double* freq = reinterpret_cast<double*>(at(lay.freq));

  const RowInfo ri = row_info(p, r);
  const int t = static_cast<int>(ri.t), L = static_cast<int>(ri.L);
  const int lo = y * l_sel;  // the chunk's first position
  // Every block, live or not, counts itself once it is done with the length (finish_step).
  auto finish_block = [&]() {
    if (tid == 0) finish_step(p, gridDim.x * gridDim.y);
  };
  const int chunks_live = (L + l_sel - 1) / l_sel;
  if (!cmp_block && lo >= L) {  // a chunk past the context: nothing to do
    finish_block();
    return;
  }
  // Development aid (NSA_CUDA_KERNEL_TIMES=1): SM clocks at the phase boundaries of the block of
  // (row 0, group 0) that holds the new token.
  const bool stamping = p.stamps != nullptr && rg == 0 && y == t / l_sel && tid == 0;
  auto stamp = [&](int i) {
    if (stamping) p.stamps[i] = clock64();
  };
  if (stamping) p.stamps[0] = clock0;
  stamp(1);
  const int n_cmp_old = static_cast<int>(num_cmp(L - 1, p.l, p.d));
  const bool emit = L >= l && (L - l) % p.d == 0;
  const int n_cmp = n_cmp_old + (emit ? 1 : 0);
  const bool has_t = !cmp_block && t < lo + l_sel;  // this chunk holds the new token
  const int sel_rows = cmp_block ? 0 : min(l_sel, L - lo);
  const int w_lo = p.w > 0 ? max(lo, t - static_cast<int>(p.w) + 1) : L;
  const int win_rows = cmp_block || p.w == 0 ? 0 : max(0, min(lo + l_sel, L) - w_lo);

  // --- One batch of loads: everything below works from shared memory ---------------------------
  {
    const float* pr = p.proj + ri.r * p.P;
    const int64_t H = p.H, G = p.G;
    short_copy_rows(proj, 0, pr + g * h * dk, 0, 1, int64_t{4} * h * dk);
    for (int kv = 0; kv < 3; ++kv) {
      const float* base = pr + H * dk + kv * G * (dk + dv);
      short_copy_rows(proj + (h + kv) * dk, 0, base + g * dk, 0, 1, int64_t{4} * dk);
      short_copy_rows(proj + (h + 3) * dk + kv * dv, 0, base + G * dk + g * dv, 0, 1,
                      int64_t{4} * dv);
    }
    short_copy_rows(at(lay.fc1_w), 0, p.fc1_w, 0, 1, int64_t{4} * g_hid * dk);
    short_copy_words(at(lay.fc1_b), p.fc1_b, g_hid);
    short_copy_words(at(lay.fc2_w), p.fc2_w, 3 * g_hid);
    short_copy_words(at(lay.fc2_b), p.fc2_b, 3);
    short_copy_words(freq, p.rope_freq, dk);  // dk / 2 doubles
    const T* kc_g = static_cast<const T*>(p.k_cmp) + cache_at(p, ri.b, g, 0, dk, p.cap_cmp);
    short_copy_rows(kc, int64_t{es} * k_ld, kc_g, int64_t{es} * dk, n_cmp_old, int64_t{es} * dk);
    if (emit) {  // raw cmp keys (values: the compressed block) of positions L - l .. L - 2
      const T* rk = static_cast<const T*>(p.k_cmp_raw) + cache_at(p, ri.b, g, L - l, dk, p.cap);
      short_copy_rows(raw_k, int64_t{es} * dk, rk, int64_t{es} * dk, l - 1, int64_t{es} * dk);
    }
    if (cmp_block) {
      const T* vc_g = static_cast<const T*>(p.v_cmp) + cache_at(p, ri.b, g, 0, dv, p.cap_cmp);
      short_copy_rows(vc, int64_t{es} * dv, vc_g, int64_t{es} * dv, n_cmp_old, int64_t{es} * dv);
      if (emit) {
        const T* rv = static_cast<const T*>(p.v_cmp_raw) + cache_at(p, ri.b, g, L - l, dv, p.cap);
        short_copy_rows(raw_v, int64_t{es} * dv, rv, int64_t{es} * dv, l - 1, int64_t{es} * dv);
      }
    } else {
      // The chunk's selected rows and its window rows, the new token's row excepted (it comes
      // from this block's projection below).
      const void* srcs[2][2] = {{p.k_sel, p.v_sel}, {p.k_win, p.v_win}};
      const int first[2] = {lo, w_lo}, n[2] = {sel_rows, win_rows};
      for (int k = 0; k < 2; ++k) {
        const int rows = n[k] - (has_t && n[k] > 0 ? 1 : 0);
        const T* ks = static_cast<const T*>(srcs[k][0]) + cache_at(p, ri.b, g, first[k], dk, p.cap);
        const T* vs = static_cast<const T*>(srcs[k][1]) + cache_at(p, ri.b, g, first[k], dv, p.cap);
        short_copy_rows(tile_k[k], int64_t{es} * k_ld, ks, int64_t{es} * dk, rows,
                        int64_t{es} * dk);
        short_copy_rows(tile_v[k], int64_t{es} * dv, vs, int64_t{es} * dv, rows, int64_t{es} * dv);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }
  stamp(2);

  // --- RoPE of the group's queries and the new token's keys, and the new token's rows ---------
  const int half = dk / 2;
  double* cs = freq + half;
  double* sn = cs + half;
  for (int j = tid; j < half; j += nthreads)
    sincos(static_cast<double>(t) * freq[j], &sn[j], &cs[j]);
  __syncthreads();
  // The new token's row in this block's arrays: raw cmp row l - 1 (an emission), sel row, window
  // row; block 0 also appends it to the cache.
  auto token_row = [&](int kv, bool key) -> T* {
    const int width = key ? k_ld : dv;
    if (kv == 0) {
      if (!emit) return nullptr;
      return key ? raw_k + (l - 1) * dk : cmp_block ? raw_v + (l - 1) * dv : nullptr;
    }
    if (!has_t) return nullptr;
    return kv == 1        ? (key ? tile_k[0] : tile_v[0]) + (t - lo) * width
           : win_rows > 0 ? (key ? tile_k[1] : tile_v[1]) + (t - w_lo) * width
                          : nullptr;
  };
  auto cache_row = [&](int kv, bool key) -> T* {
    void* base = kv == 0   ? (key ? p.k_cmp_raw : p.v_cmp_raw)
                 : kv == 1 ? (key ? p.k_sel : p.v_sel)
                           : (key ? p.k_win : p.v_win);
    return static_cast<T*>(base) + cache_at(p, ri.b, g, t, key ? dk : dv, p.cap);
  };
  for (int i = tid; i < (h + 3) * half; i += nthreads) {
    const int vec = i / half, j = i % half;
    float* x = proj + vec * dk;  // q heads, then the cmp, sel and window keys
    const double x0 = x[2 * j], x1 = x[2 * j + 1];
    const T y0 = from_f32<T>(static_cast<float>(x0 * cs[j] - x1 * sn[j]));
    const T y1 = from_f32<T>(static_cast<float>(x0 * sn[j] + x1 * cs[j]));
    x[2 * j] = to_f32(y0);  // as stored
    x[2 * j + 1] = to_f32(y1);
    if (vec >= h) {
      if (T* d = token_row(vec - h, true); d != nullptr) {
        d[2 * j] = y0;
        d[2 * j + 1] = y1;
      }
      if (y == 0) {
        T* c = cache_row(vec - h, true);
        c[2 * j] = y0;
        c[2 * j + 1] = y1;
      }
    }
  }
  for (int i = tid; i < 3 * dv; i += nthreads) {
    const int kv = i / dv, e = i % dv;
    const T v = from_f32<T>(proj[(h + 3) * dk + i]);
    if (T* d = token_row(kv, false); d != nullptr) d[e] = v;
    if (y == 0) cache_row(kv, false)[e] = v;
  }
  __syncthreads();

  // --- Emission (into this block's compressed rows; the compressed block appends it), gate input
  if (emit) {
    const int64_t i_new = n_cmp_old;
    for (int e = tid; e < dk + (cmp_block ? dv : 0); e += nthreads) {
      const bool key = e < dk;
      const int width = key ? dk : dv, col = key ? e : e - dk;
      const T* raw = key ? raw_k : raw_v;
      float s = 0.f;
      for (int pos = 0; pos < l; ++pos) s += to_f32(raw[pos * width + col]);
      const T m = from_f32<T>(s / static_cast<float>(l));
      if (key) {
        kc[i_new * k_ld + col] = m;
      } else {
        vc[i_new * dv + col] = m;
      }
      if (cmp_block) {
        static_cast<T*>(key ? p.k_cmp
                            : p.v_cmp)[cache_at(p, ri.b, g, i_new, width, p.cap_cmp) + col] = m;
      }
    }
  }
  for (int e = tid; e < dk; e += nthreads) {
    float s = 0.f;
    for (int j = 0; j < h; ++j) s += proj[j * dk + e];
    u[e] = s / static_cast<float>(h);
  }
  __syncthreads();
  stamp(3);

  // --- Gate's hidden layer; compressed logits ---------------------------------------------------
  for (int i = warp; i < g_hid; i += n_warps) {
    float a = 0.f;
    for (int e = lane; e < dk; e += 32) a += fc1_w[i * dk + e] * u[e];
    for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
    if (lane == 0) {
      const float z = a + fc1_b[i];
      hid[i] = z / (1.f + expf(-z));
    }
  }
  const float scale = p.scale;
  for (int task = tid; task < h * n_cmp; task += nthreads) {
    const int hh = task / n_cmp, i = task % n_cmp;
    lg_cmp[hh * cap_cmp + i] = short_dot(proj + hh * dk, kc + i * k_ld, dk) * scale;
  }
  __syncthreads();

  // --- Gates (warp 0); the compressed softmax per head (the other warps) -----------------------
  if (warp == 0) {
    float z[3];
    for (int k = 0; k < 3; ++k) {
      float a = 0.f;
      for (int i = lane; i < g_hid; i += 32) a += fc2_w[k * g_hid + i] * hid[i];
      for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
      z[k] = a + fc2_b[k];
    }
    if (lane == 0) write_gates(p, gate, z);
  } else if (n_cmp > 0) {
    for (int hh = warp - 1; hh < h; hh += n_warps - 1) {
      float m, s;
      short_softmax_row(lg_cmp + hh * cap_cmp, n_cmp, m, s);
      if (lane == 0) {
        stats[hh] = m;
        stats[h + hh] = s;
      }
    }
  }
  __syncthreads();
  stamp(4);
  const bool need_cmp = p.compute_all || gate[0] != 0.f;
  const bool need_sel = p.compute_all || gate[1] != 0.f;
  const bool need_win = p.w > 0 && (p.compute_all || gate[2] != 0.f);

  // --- Scores and the top-n, the same in every block -------------------------------------------
  const int nb = L / l_sel;  // complete selection blocks
  if (need_sel && warp == 0) {
    // One warp, no barrier: lane j scores selection block j (nb <= 32) straight from the
    // compressed softmax (the head-summed p_cmp of each overlapping compressed token, spread by
    // overlap), then ranks it among the candidates by shuffles.
    float sc = 0.f;
    if (lane < nb) {
      const int64_t j = lane, lo_num = j * l_sel - p.l + 1;
      const int64_t i_lo = lo_num <= 0 ? 0 : div32(lo_num + p.d - 1, p.d);
      const int64_t i_hi = min(int64_t{n_cmp} - 1, div32((j + 1) * l_sel - 1, p.d));
      for (int64_t i = i_lo; i <= i_hi; ++i) {
        float ps = 0.f;
        for (int hh = 0; hh < h; ++hh) ps += lg_cmp[hh * cap_cmp + i] * (1.f / stats[h + hh]);
        sc += ps * static_cast<float>(overlap(i, j, p.l, p.d, p.l_sel)) / static_cast<float>(p.l);
      }
    }
    const Forced fb = forced_blocks(t, nb, l_sel, p.n_sel);
    bool is_forced = false;
    for (int k = 0; k < fb.n; ++k) is_forced = is_forced || fb.block[k] == lane;
    // Forced blocks and lanes past nb hold key 0: never a candidate, never above one.
    const uint64_t key = lane < nb && !is_forced ? rank_key(sc, lane) : 0ull;
    int above = 0;
    for (int k = 0; k < nb; ++k) above += __shfl_sync(0xffffffffu, key, k) > key;
    uint32_t mask = __ballot_sync(0xffffffffu, key != 0ull && above < fb.take);
    for (int k = 0; k < fb.n; ++k) mask |= 1u << fb.block[k];
    if (lane == 0) sel_mask = mask;
  } else if (!need_sel && tid == 0) {
    sel_mask = 0u;
  }
  __syncthreads();
  stamp(5);
  const uint32_t mask = sel_mask;

  // --- This block's partials: the chunk's selected and window keys, or the compressed branch ---
  const int64_t NS = n_splits_total(p);
  auto part = [&](int64_t slot) { return (rg * NS + slot) * h; };
  auto pv = [&](const float* pr, const T* vt, int n, int e) { return short_pv(pr, vt, n, dv, e); };
  if (cmp_block) {
    if (need_cmp && n_cmp > 0) {
      for (int idx = tid; idx < h * dv; idx += nthreads) {
        const int hh = idx / dv, e = idx % dv;
        p.part_o[(part(0) + hh) * dv + e] = pv(lg_cmp + hh * cap_cmp, vc, n_cmp, e);
      }
      for (int hh = tid; hh < h; hh += nthreads) {
        p.part_m[part(0) + hh] = stats[hh];
        p.part_s[part(0) + hh] = stats[h + hh];
      }
    }
  } else {
    const int n[2] = {need_sel && ((mask >> y) & 1u) ? sel_rows : 0, need_win ? win_rows : 0};
    const int64_t slot[2] = {1 + C + y, 1 + y};
    for (int task = tid; task < h * (n[0] + n[1]); task += nthreads) {
      const int k = task < h * n[0] ? 0 : 1, rest = k == 0 ? task : task - h * n[0];
      const int hh = rest / n[k], j = rest % n[k];
      lg_tile[(k * h + hh) * l_sel + j] =
          short_dot(proj + hh * dk, tile_k[k] + j * k_ld, dk) * scale;
    }
    __syncthreads();
    for (int task = warp; task < 2 * h; task += n_warps) {
      const int k = task / h, hh = task % h;
      if (n[k] == 0) continue;
      float m, s;
      short_softmax_row(lg_tile + (k * h + hh) * l_sel, n[k], m, s);
      if (lane == 0) {
        p.part_m[part(slot[k]) + hh] = m;
        p.part_s[part(slot[k]) + hh] = s;
      }
    }
    __syncthreads();
    // Both tiles' outputs at once: h dv tasks each.
    const int tasks0 = n[0] > 0 ? h * dv : 0, tasks = tasks0 + (n[1] > 0 ? h * dv : 0);
    for (int task = tid; task < tasks; task += nthreads) {
      const int k = task < tasks0 ? 0 : 1, idx = k == 0 ? task : task - tasks0;
      const int hh = idx / dv, e = idx % dv;
      p.part_o[(part(slot[k]) + hh) * dv + e] =
          pv(lg_tile + (k * h + hh) * l_sel, tile_v[k], n[k], e);
    }
  }
  stamp(6);

  // --- The last live block of the (row, group) combines -----------------------------------------
  __threadfence();  // this block's partials are visible before it is counted
  __syncthreads();
  if (tid == 0) last = atomicAdd(p.rg_done + rg, 1u) == static_cast<uint32_t>(chunks_live);
  __syncthreads();
  if (!last) {
    finish_block();
    return;
  }
  __threadfence();
  // Stamp 7 (row 0, group 0): stamp 6 plus this combine's own clocks (the last block may run on
  // another SM than the stamping block; the counter's wait is left out).
  const long long combine0 = clock64();
  // Splits of each branch: lane bit k of `valid[branch]` is split k (cmp: 0; window, sel: chunk).
  const int w_first = p.w > 0 ? max(0, t - static_cast<int>(p.w) + 1) / l_sel : 0;
  uint32_t valid[3];
  valid[0] = need_cmp && n_cmp > 0 ? 1u : 0u;
  valid[1] = need_sel ? mask : 0u;
  valid[2] = 0u;
  if (need_win) {
    for (int j = w_first; j <= t / l_sel; ++j) valid[2] |= 1u << j;
  }
  auto slot_of = [&](int k, int j) -> int64_t { return k == 0 ? 0 : k == 2 ? 1 + j : 1 + C + j; };
  // The valid splits of all three branches as one list (branch, split), at most 65 entries.
  __shared__ uint8_t list_k[1 + 2 * kShortMaxChunks], list_j[1 + 2 * kShortMaxChunks];
  __shared__ int list_n;
  if (tid == 0) {
    int n = 0;
    for (int k = 0; k < 3; ++k) {
      for (uint32_t left = valid[k]; left != 0u; left &= left - 1u) {
        list_k[n] = static_cast<uint8_t>(k);
        list_j[n++] = static_cast<uint8_t>(__ffs(static_cast<int>(left)) - 1);
      }
    }
    list_n = n;
  }
  for (int task = warp; task < 3 * h; task += n_warps) {
    const int hh = task / 3, k = task % 3;
    const bool mine = (valid[k] >> lane) & 1u;
    const float m = mine ? __ldcg(p.part_m + part(slot_of(k, lane)) + hh) : -FLT_MAX;
    const float s = mine ? __ldcg(p.part_s + part(slot_of(k, lane)) + hh) : 0.f;
    float M = m;
    for (int off = 16; off > 0; off /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float S = mine ? s * expf(m - M) : 0.f;
    for (int off = 16; off > 0; off /= 2) S += __shfl_xor_sync(0xffffffffu, S, off);
    weight[(hh * 3 + k) * kShortMaxChunks + lane] = mine && S > 0.f ? expf(m - M) / S : 0.f;
  }
  __syncthreads();
  const int n_list = list_n;
  for (int idx = tid; idx < h * dv; idx += nthreads) {
    const int hh = idx / dv, e = idx % dv;
    float out[3] = {0.f, 0.f, 0.f};
    // 8 splits' loads in flight before their sums (__ldcg is not reordered; a batch of 32
    // measured slower: more code to fetch).
    constexpr int kBatch = 8;
    for (int q0 = 0; q0 < n_list; q0 += kBatch) {
      float v[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        v[q] =
            q0 + q < n_list
                ? __ldcg(p.part_o + (part(slot_of(list_k[q0 + q], list_j[q0 + q])) + hh) * dv + e)
                : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        if (q0 + q < n_list) {
          const int k = list_k[q0 + q];
          const float wv = weight[(hh * 3 + k) * kShortMaxChunks + list_j[q0 + q]] * v[q];
          out[0] += k == 0 ? wv : 0.f;
          out[1] += k == 1 ? wv : 0.f;
          out[2] += k == 2 ? wv : 0.f;
        }
      }
    }
    write_gated<T>(p, (r * p.H + g * h + hh) * dv + e, gate, out);
  }
  // The selection as the step kernels leave it: sorted blocks, count, reads; and the gates.
  int32_t* blocks = p.sel_blocks + rg * p.n_sel;
  const int n_chosen = __popc(valid[1]);
  for (int k = tid; k < p.n_sel; k += nthreads) blocks[k] = -1;
  __syncthreads();
  if (tid < 32 && ((valid[1] >> tid) & 1u)) blocks[__popc(valid[1] & ((1u << tid) - 1u))] = tid;
  if (tid == 0) {
    int tokens = 0;
    for (int j = 0; j < 32; ++j) {
      if ((valid[1] >> j) & 1u) tokens += min((j + 1) * l_sel, L) - j * l_sel;
    }
    p.sel_count[rg] = n_chosen;
    int32_t* rd = p.reads + rg * 3;
    rd[0] = n_cmp;
    rd[1] = tokens;
    rd[2] = p.w > 0 ? min(static_cast<int>(p.w), L) : 0;
    for (int k = 0; k < 3; ++k) p.gates[rg * 3 + k] = gate[k];
    p.rg_done[rg] = 0u;
    if (p.stamps != nullptr && rg == 0) {
      p.stamps[7] = __ldcg(p.stamps + 6) + (clock64() - combine0);
    }
  }
  finish_block();
}

}  // namespace nsa::cuda
