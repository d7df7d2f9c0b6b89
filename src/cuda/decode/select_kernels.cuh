// Scoring of the selection blocks from the compressed branch's logits and the top-n selection,
// per (row, group) of a step; the forced blocks and the rank keys the prefill kernels share.
#pragma once

#include "cuda/decode/step_kernels.cuh"

namespace nsa::cuda {

// --- 4. Block scores, top-n selection, reads, per (row, group) ------------------------------
// Candidates rank by score (higher first), then block index (lower first): the 64-bit key
// (score bits + 1) << 32 | ~index orders them exactly that way and is unique (scores are >= 0,
// so their bit patterns order like the values); 0 = not a candidate.
__device__ __forceinline__ uint64_t rank_key(float score, int64_t j) {
  if (!(score >= 0.f)) return 0ull;
  return (static_cast<uint64_t>(__float_as_uint(score) + 1u) << 32) |
         (0xffffffffull - static_cast<uint64_t>(j));
}

// Scores of selection blocks [j0, j0 + kScoreBlocks) per (row, group): the group's p_cmp summed
// over its heads (the overlap weights do not depend on the head), spread by overlap. Grid:
// (row, group) x chunks of blocks, so every SM takes part in reading the logits.
constexpr int kScoreBlocks = 128;
constexpr int kScoreThreads = 256;

__host__ __device__ inline int64_t score_span(int64_t l, int64_t d, int64_t l_sel) {
  return (kScoreBlocks * l_sel + l - 1) / d + 2;  // compressed tokens one chunk overlaps
}

// Chunk `chunk` of (row, group) rg. smem: score_smem_bytes (the head-summed p_cmp of the chunk's
// span, M[h], 1/S[h]).
__device__ __forceinline__ void score_chunk(const StepParams& p, int64_t rg, int64_t chunk,
                                            float* smem) {
  const int64_t r = div32(rg, p.G);
  const RowInfo ri = row_info(p, r);
  const float* gate = p.gates + rg * 3;
  const int64_t nb = div32(ri.L, p.l_sel), j0 = chunk * kScoreBlocks;
  if (!(p.compute_all || gate[1] != 0.f) || j0 >= nb) return;
  const int64_t j1 = min(nb, j0 + kScoreBlocks), h = p.h;
  const int64_t n_cmp = num_cmp(ri.L, p.l, p.d);
  const int64_t lo_num = j0 * p.l_sel - p.l + 1;
  const int64_t i0 = lo_num <= 0 ? 0 : div32(lo_num + p.d - 1, p.d);
  const int64_t i1 = min(n_cmp, div32(j1 * p.l_sel - 1, p.d) + 1);
  float* pc = smem;  // pc[i - i0]
  float* M = pc + score_span(p.l, p.d, p.l_sel);
  float* invS = M + h;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  {  // one warp per head: max and sum over the compressed splits
    const int64_t NS = n_splits_total(p);
    const int64_t ns_cmp = splits_used(n_cmp, p.n_cmp_splits);
    for (int64_t hh = warp; hh < h; hh += n_warps) {
      const float* pm = p.part_m + rg * NS * h + hh;
      const float* pss = p.part_s + rg * NS * h + hh;
      float mx = -FLT_MAX, sum = 0.f;  // online over the lane's splits, then merged
      for (int64_t k = lane; k < ns_cmp; k += 32) merge_max_sum(mx, sum, pm[k * h], pss[k * h]);
      for (int off = 16; off > 0; off /= 2) {
        merge_max_sum(mx, sum, __shfl_xor_sync(0xffffffffu, mx, off),
                      __shfl_xor_sync(0xffffffffu, sum, off));
      }
      if (lane == 0) {
        M[hh] = mx;
        invS[hh] = 1.f / sum;
      }
    }
  }
  __syncthreads();
  const float* logits = p.cmp_logits + rg * h * p.cap_cmp;
  // kTok tokens of kHeads heads' logits in flight per thread (one round trip: the logits come
  // from DRAM, as the compressed pass's K/V stream evicts them from L2), summed in head order.
  // (Loading the first round before the (max, sum) merge above measured slower: 14 -> 19 us at
  // B = 16, 64k; docs/perf-cuda-decode.md, fifteenth session.)
  constexpr int kHeads = 16, kTok = 2;
  const int64_t stride = blockDim.x;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kTok * stride) {
    bool in[kTok];
    float ps[kTok];
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      in[t] = i + t * stride < i1;
      ps[t] = 0.f;
    }
    int64_t hh = 0;
    for (; hh + kHeads <= h; hh += kHeads) {
      float x[kTok][kHeads];
#pragma unroll
      for (int u = 0; u < kHeads; ++u) {
#pragma unroll
        for (int t = 0; t < kTok; ++t)
          x[t][u] = in[t] ? logits[(hh + u) * p.cap_cmp + i + t * stride] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kHeads; ++u) {
#pragma unroll
        for (int t = 0; t < kTok; ++t) ps[t] += expf(x[t][u] - M[hh + u]) * invS[hh + u];
      }
    }
    for (; hh < h; ++hh) {
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        if (in[t]) ps[t] += expf(logits[hh * p.cap_cmp + i + t * stride] - M[hh]) * invS[hh];
      }
    }
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (in[t]) pc[i + t * stride - i0] = ps[t];
    }
  }
  __syncthreads();
  float* out = p.block_scores + rg * p.nb_cap;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const int64_t lo = j * p.l_sel - p.l + 1;
    const int64_t i_lo = lo <= 0 ? 0 : div32(lo + p.d - 1, p.d);
    const int64_t i_hi = min(n_cmp - 1, div32((j + 1) * p.l_sel - 1, p.d));
    float sc = 0.f;
    for (int64_t i = i_lo; i <= i_hi; ++i) {
      sc += pc[i - i0] * static_cast<float>(overlap(i, j, p.l, p.d, p.l_sel)) /
            static_cast<float>(p.l);
    }
    out[j] = sc;
  }
}

__global__ void __launch_bounds__(kScoreThreads)
    nsa_score_kernel(const __grid_constant__ StepParams p) {
  extern __shared__ float smem[];
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  score_chunk(p, blockIdx.x, blockIdx.y, smem);
}

// The forced blocks of a query at position t (SPEC section 3: 0, the current and the previous
// block, de-duplicated) and how many candidates it takes: every complete block (of nb) that is
// not forced is a candidate.
struct Forced {
  int64_t block[3];
  int64_t n;     // forced blocks
  int64_t take;  // candidates to choose
};

__device__ __forceinline__ Forced forced_blocks(int64_t t, int64_t nb, int64_t l_sel,
                                                int64_t n_sel) {
  Forced f;
  f.n = 0;
  const int64_t cur = div32(t, l_sel);
  const int64_t cand[3] = {0, cur, cur - 1};
  for (int64_t j : cand) {
    bool dup = j < 0;
    for (int64_t k = 0; k < f.n; ++k) dup = dup || f.block[k] == j;
    if (!dup) f.block[f.n++] = j;
  }
  int64_t complete = 0;
  for (int64_t k = 0; k < f.n; ++k) complete += f.block[k] < nb;
  f.take = min(n_sel - f.n, nb - complete);
  return f;
}

// Shared-memory bytes of nsa_score_kernel.
inline size_t score_smem_bytes(int64_t h, int64_t l, int64_t d, int64_t l_sel) {
  return sizeof(float) * static_cast<size_t>(2 * h + score_span(l, d, l_sel));
}

constexpr int kSelectThreads = 256;

// Top-n selection per (row, group): forced blocks (0, current, previous), then the `take` best
// scored blocks, found as the take-th largest key by a radix select (up to 8 passes of 8 bits
// over the unique keys, whatever take is; it stops at the pass whose digit holds exactly the
// keys still wanted); reads of the three branches.
// (row, group) rg, with kSelectThreads threads (any multiple of 32 works); score:
// select_smem_bytes.
__device__ __forceinline__ void select_row(const StepParams& p, int64_t rg, float* score) {
  __shared__ uint32_t hist[256];
  __shared__ uint64_t prefix, mask;
  __shared__ int64_t remaining;
  __shared__ int64_t all[67];
  __shared__ int n_chosen, n_tokens, done;
  const int64_t r = div32(rg, p.G);
  // The first four scores per thread are loaded before the row's length is known (it bounds
  // them): both round trips at once. Entries past the row's blocks, up to the buffer's nb_cap,
  // are read and dropped.
  const float* src = p.block_scores + rg * p.nb_cap;
  const int64_t stride = blockDim.x;
  float v[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t j = threadIdx.x + u * stride;
    v[u] = j < p.nb_cap ? src[j] : 0.f;
  }
  const float g1 = p.gates[rg * 3 + 1];
  const RowInfo ri = row_info(p, r);
  const bool need_sel = p.compute_all || g1 != 0.f;
  const int64_t n_cmp = num_cmp(ri.L, p.l, p.d);
  const int64_t n_win = p.w > 0 ? min(p.w, ri.L) : 0;
  int32_t* blocks = p.sel_blocks + rg * p.n_sel;
  int32_t* rd = p.reads + rg * 3;
  if (!need_sel) {
    for (int64_t k = threadIdx.x; k < p.n_sel; k += blockDim.x) blocks[k] = -1;
    if (threadIdx.x == 0) {
      p.sel_count[rg] = 0;
      rd[0] = static_cast<int32_t>(n_cmp);
      rd[1] = 0;
      rd[2] = static_cast<int32_t>(n_win);
    }
    return;
  }
  const int64_t nb = div32(ri.L, p.l_sel);
  for (int64_t j = threadIdx.x; j < nb; j += 4 * stride) {  // four loads in flight per thread
    if (j != threadIdx.x) {
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = j + u * stride < nb ? src[j + u * stride] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (j + u * stride < nb) score[j + u * stride] = v[u];
  }
  const Forced fb = forced_blocks(ri.t, nb, p.l_sel, p.n_sel);
  const int64_t* forced = fb.block;
  const int64_t nf = fb.n, take = fb.take;  // candidates' scores are >= 0
  if (threadIdx.x == 0) {
    prefix = 0ull;
    mask = 0ull;
    remaining = take;
    n_chosen = 0;
    n_tokens = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t k = 0; k < nf; ++k)
      if (forced[k] < nb) score[forced[k]] = -1.f;  // -1: not a candidate
  }
  __syncthreads();
  if (take > 0 && nb <= static_cast<int64_t>(blockDim.x)) {
    // Few blocks (every one a thread): a candidate is taken when fewer than `take` candidates
    // rank above it. One pass, no barriers.
    const int64_t j = threadIdx.x;
    const uint64_t kj = j < nb ? rank_key(score[j], j) : 0ull;
    if (kj != 0ull) {
      int64_t above = 0;
      for (int64_t k = 0; k < nb; ++k) above += rank_key(score[k], k) > kj;
      if (above < take) all[nf + atomicAdd(&n_chosen, 1)] = j;
    }
  } else if (take > 0) {
    // The take-th largest key, 8 bits per pass from the top: count the candidates that match
    // the digits found so far, per next digit; the digit where the count from the top reaches
    // `remaining` is the key's; the candidates above it are all taken. When that digit's
    // candidates are exactly the `remaining` ones, they are all taken too and the passes stop
    // (the threshold is then the prefix itself: every key under it is below it).
    // The digits of a pass repeat within a warp (similar scores share their top bytes, and the
    // index's high bytes are all 0xff), so each warp adds one count per distinct digit: the
    // shared-memory atomics on one bin no longer serialise.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0u;  // any block size
    if (threadIdx.x == 0) done = 0;
    __syncthreads();
    for (int shift = 56; shift >= 0; shift -= 8) {
      const uint64_t pre = prefix, msk = mask;
      // Whole warps per step (blockDim.x is a multiple of 32), so every lane takes part in the
      // match.
      for (int64_t j0 = 0; j0 < nb; j0 += blockDim.x) {
        const int64_t j = j0 + threadIdx.x;
        const uint64_t k = j < nb ? rank_key(score[j], j) : 0ull;
        const bool hit = k != 0ull && (k & msk) == pre;
        const unsigned digit = hit ? static_cast<unsigned>(k >> shift) & 255u : 256u;
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (hit && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
      }
      __syncthreads();
      if (warp == 0) {  // lane L holds digits 255 - 8 L - u, u < 8: descending over the warp
        uint32_t c[8], sum = 0;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          sum += (c[u] = hist[255 - 8 * lane - u]);
          hist[255 - 8 * lane - u] = 0u;  // cleared for the next pass by the lane that read it
        }
        uint32_t incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off *= 2) {
          const uint32_t o = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += o;
        }
        int64_t above = incl - sum;  // candidates with a larger digit, before this lane
        const int64_t want = remaining;
        __syncwarp();  // every lane has read `remaining` before one lane rewrites it
        if (above < want && want <= static_cast<int64_t>(incl)) {
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            if (above < want && want <= above + c[u]) {
              prefix = pre | (static_cast<uint64_t>(255 - 8 * lane - u) << shift);
              mask = msk | (0xffull << shift);
              remaining = want - above;
              done = want - above == static_cast<int64_t>(c[u]);
            }
            above += c[u];
          }
        }
      }
      __syncthreads();
      if (done) break;  // the same shared value for every thread
    }
    const uint64_t kth = prefix;  // exactly `take` keys are >= kth (keys are unique)
    for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
      const uint64_t k = rank_key(score[j], j);
      if (k != 0ull && k >= kth) all[nf + atomicAdd(&n_chosen, 1)] = j;
    }
  }
  if (threadIdx.x < nf) all[threadIdx.x] = forced[threadIdx.x];
  __syncthreads();
  // Forced and chosen blocks (all distinct), placed by rank, their tokens summed; in parallel.
  const int64_t n = nf + n_chosen;
  if (threadIdx.x < n) {
    const int64_t v = all[threadIdx.x];
    int rank = 0;
    for (int64_t e = 0; e < n; ++e) rank += all[e] < v;
    blocks[rank] = static_cast<int32_t>(v);
    atomicAdd(&n_tokens, static_cast<int>(min((v + 1) * p.l_sel, ri.L) - v * p.l_sel));
  } else if (threadIdx.x < p.n_sel) {
    blocks[threadIdx.x] = -1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    p.sel_count[rg] = static_cast<int32_t>(n);
    rd[0] = static_cast<int32_t>(n_cmp);
    rd[1] = n_tokens;
    rd[2] = static_cast<int32_t>(n_win);
  }
}

__global__ void __launch_bounds__(kSelectThreads)
    nsa_select_kernel(const __grid_constant__ StepParams p) {
  extern __shared__ float score[];  // [nb]
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  select_row(p, blockIdx.x, score);
}

// Shared-memory bytes of nsa_select_kernel.
inline size_t select_smem_bytes(int64_t nb_cap) {
  return sizeof(float) * static_cast<size_t>(nb_cap);
}

}  // namespace nsa::cuda
