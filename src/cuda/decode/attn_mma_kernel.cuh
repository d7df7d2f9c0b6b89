// Tensor-core split attention for 16-bit storage: the h <= 16 query heads of a group form the
// M = 16 rows of the MMA, so each 64-key K/V tile is loaded once into shared memory and used by
// every head of the group (the paper's group-centric kernel). S = Q K^T and O += P V run as
// bf16/fp16 WMMA with fp32 accumulation; the online softmax is fp32, one warp per 4 heads.
#pragma once

#include <mma.h>

#include "cuda/decode/step_kernels.cuh"

namespace nsa::cuda {

constexpr int kMmaKeys = 64;  // keys per tile
constexpr int kMmaRows = 16;  // MMA rows = padded heads of a group
constexpr int kMmaPad = 8;    // elements of row padding (16 bytes) against bank conflicts

// Shared-memory bytes of nsa_attn_split_mma_kernel for head dims dk, dv.
__host__ __device__ inline size_t mma_smem_bytes(int64_t dk, int64_t dv) {
  const int64_t halfs = kMmaRows * (dk + kMmaPad) + kMmaKeys * (dk + kMmaPad) +
                        kMmaKeys * (dv + kMmaPad) + kMmaRows * (kMmaKeys + kMmaPad);
  const int64_t floats = kMmaRows * kMmaKeys + 2 * kMmaRows * dv + 3 * kMmaRows;
  return static_cast<size_t>(halfs * 2 + floats * 4);
}

// Copies `rows` rows of `width` 16-bit elements (width % 8 == 0) into shared memory with row
// stride ld, 16 bytes per access; rows in [rows, kMmaKeys) are zeroed.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int64_t ld, const T* src, int64_t rows,
                                          int64_t width) {
  // Loads are staged in registers, kStage per thread in flight, before the shared stores: a
  // load-store loop would wait one memory latency per iteration.
  constexpr int kStage = 8;
  const int vec = static_cast<int>(width / 8), total = kMmaKeys * vec;
  const uint4* s4 = reinterpret_cast<const uint4*>(src);
  for (int base = threadIdx.x; base < total; base += kStage * blockDim.x) {
    uint4 r[kStage];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      r[u] = i < total && i / vec < rows ? __ldg(s4 + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * blockDim.x;
      if (i < total) reinterpret_cast<uint4*>(dst + (i / vec) * ld)[i % vec] = r[u];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(128) nsa_attn_split_mma_kernel(StepParams p, int phase) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Split sp;
  if (!split_range<T>(p, phase, sp)) return;
  const int64_t h = p.h, dk = p.dk, dv = p.dv;
  const int64_t ldq = dk + kMmaPad, ldv = dv + kMmaPad, ldp = kMmaKeys + kMmaPad;
  T* qs = reinterpret_cast<T*>(smem_raw);                     // [16][ldq]
  T* ks = qs + kMmaRows * ldq;                                // [64][ldq]
  T* vs = ks + kMmaKeys * ldq;                                // [64][ldv]
  T* ps = vs + kMmaKeys * ldv;                                // [16][ldp] probabilities
  float* sc = reinterpret_cast<float*>(ps + kMmaRows * ldp);  // [16][64] logits
  float* oacc = sc + kMmaRows * kMmaKeys;                     // [16][dv]
  float* otmp = oacc + kMmaRows * dv;                         // [16][dv]
  float* m = otmp + kMmaRows * dv;                            // [16]
  float* s = m + kMmaRows;                                    // [16]
  float* corr = s + kMmaRows;                                 // [16]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(p.q) + (sp.r * p.H + sp.g * h) * dk;
  for (int i = threadIdx.x; i < kMmaRows * dk; i += blockDim.x) {
    const int row = i / static_cast<int>(dk), e = i % static_cast<int>(dk);
    qs[row * ldq + e] = row < h ? q[row * dk + e] : from_f32<T>(0.f);
  }
  for (int64_t i = threadIdx.x; i < kMmaRows * dv; i += blockDim.x) oacc[i] = 0.f;
  if (threadIdx.x < kMmaRows) {
    m[threadIdx.x] = -FLT_MAX;
    s[threadIdx.x] = 0.f;
  }
  float* logits_out = sp.branch == 0 ? p.cmp_logits + sp.rg * h * p.cap_cmp : nullptr;
  const T* K = static_cast<const T*>(sp.K);
  const T* V = static_cast<const T*>(sp.V);
  for (int64_t k0 = sp.start; k0 < sp.end; k0 += kMmaKeys) {
    const int64_t nk = min(static_cast<int64_t>(kMmaKeys), sp.end - k0);
    __syncthreads();
    load_tile(ks, ldq, K + k0 * dk, nk, dk);
    load_tile(vs, ldv, V + k0 * dv, nk, dv);
    __syncthreads();
    {  // S[16][64] = Q K^T: warp w computes keys [16 w, 16 w + 16)
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int64_t kk = 0; kk < dk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, qs + kk, static_cast<unsigned>(ldq));
        wmma::load_matrix_sync(b, ks + warp * 16 * ldq + kk, static_cast<unsigned>(ldq));
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sc + warp * 16, acc, kMmaKeys, wmma::mem_row_major);
    }
    __syncthreads();
    for (int row = warp * 4; row < warp * 4 + 4; ++row) {  // online softmax, one warp per 4 rows
      float x[2], mt = m[row];
      for (int k = 0; k < 2; ++k) {
        const int j = lane + 32 * k;
        x[k] = j < nk && row < h ? sc[row * kMmaKeys + j] * p.scale : -FLT_MAX;
        if (logits_out != nullptr && j < nk && row < h) logits_out[row * p.cap_cmp + k0 + j] = x[k];
        mt = fmaxf(mt, x[k]);
      }
      for (int off = 16; off > 0; off /= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      float sum = 0.f;
      for (int k = 0; k < 2; ++k) {
        const int j = lane + 32 * k;
        const float e = j < nk && row < h ? expf(x[k] - mt) : 0.f;
        sum += e;
        ps[row * ldp + j] = from_f32<T>(e);
      }
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        const float c = row < h ? expf(m[row] - mt) : 1.f;
        corr[row] = c;
        s[row] = s[row] * c + sum;
        m[row] = mt;
      }
    }
    __syncthreads();
    for (int64_t nt = warp; nt < dv / 16; nt += 4) {  // O_tile[16][dv] = P V
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < kMmaKeys; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, ps + kk, static_cast<unsigned>(ldp));
        wmma::load_matrix_sync(b, vs + kk * ldv + nt * 16, static_cast<unsigned>(ldv));
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(otmp + nt * 16, acc, static_cast<unsigned>(dv), wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kMmaRows * dv; i += blockDim.x) {
      oacc[i] = oacc[i] * corr[i / static_cast<int>(dv)] + otmp[i];
    }
  }
  __syncthreads();
  const int64_t base = (sp.rg * n_splits_total(p) + sp.index) * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    p.part_m[base + i] = m[i];
    p.part_s[base + i] = s[i];
  }
  for (int64_t i = threadIdx.x; i < h * dv; i += blockDim.x) p.part_o[base * dv + i] = oacc[i];
}

}  // namespace nsa::cuda
