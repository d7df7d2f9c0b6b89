// The prefill's per-row preparation (SPEC section 2, steps 2-4) as streaming kernels: RoPE and
// the cache append of many rows at once, with the gates' inputs, then the gate MLP's first layer
// as one cuBLAS GEMM over every (row, group) and its second layer plus the gate function.
// The decode step keeps nsa_prepare_kernel (one row per block, emission inside).
//
// nsa_prefill_rope_kernel: kRopeRows rows of all groups per block. The angles of a row are
// computed once (double, as the CPU does), not once per group; every pair moves as one 8-byte
// load and one store of two elements; the mean of a group's rotated queries (as stored) stays in
// the registers of the thread that rotated them and goes to u [R, G, dk].
// cuBLAS then computes hid [R G, g_hid] = u fc1_w^T, and nsa_prefill_gate_kernel (one warp per
// (row, group)) adds fc1's bias, applies SiLU, fc2 and the gate function.
#pragma once

#include "cuda/decode/step_kernels.cuh"

namespace nsa::cuda {

constexpr int kRopeRows = 8;  // rows per block of nsa_prefill_rope_kernel
constexpr int kRopeThreads = 256;
constexpr int kRopeHeads = 8;  // query heads loaded before the first store (any h works)
constexpr int kRopeBatch = 4;  // key / value tasks per thread loaded before the first store

// Shared-memory bytes of nsa_prefill_rope_kernel: cos and sin of each row's angles (double).
inline size_t prefill_rope_smem_bytes(int64_t dk) {
  return static_cast<size_t>(kRopeRows) * static_cast<size_t>(dk) * sizeof(double);
}

// Two adjacent elements of the storage type, stored with one instruction.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T a, b;
};

// Rotation of pair (x0, x1) by the angle of (c, s), in double as the CPU reference computes it,
// rounded to the storage type.
template <typename T>
__device__ __forceinline__ Pair<T> rotate_pair(float2 x, double c, double s) {
  const double x0 = x.x, x1 = x.y;
  return {from_f32<T>(static_cast<float>(x0 * c - x1 * s)),
          from_f32<T>(static_cast<float>(x0 * s + x1 * c))};
}

// Needs dk and dv even (8-byte pairs; dk is even by SPEC, the host checks dv).
template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
    nsa_prefill_rope_kernel(const __grid_constant__ StepParams p, float* u) {
  extern __shared__ double rope_cs[];  // [kRopeRows][cos half | sin half]
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  const int half = static_cast<int>(p.dk / 2), dk = static_cast<int>(p.dk);
  const int dv2 = static_cast<int>(p.dv / 2), h = static_cast<int>(p.h);
  const int G = static_cast<int>(p.G);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRopeRows;
  const int nr = static_cast<int>(min(static_cast<int64_t>(kRopeRows), p.R - r0));
  for (int i = threadIdx.x; i < nr * half; i += blockDim.x) {
    const int rr = i / half, j = i % half;
    const double a = static_cast<double>(row_info(p, r0 + rr).t) * p.rope_freq[j];
    sincos(a, &rope_cs[rr * dk + half + j], &rope_cs[rr * dk + j]);
  }
  __syncthreads();
  // Query tasks (row, group, pair): the group's h heads of one pair, summed for the gate. The
  // loads of up to kRopeHeads heads are issued before the first store, so a thread waits on
  // memory once per task, not once per head.
  const int q_tasks = G * half;
  for (int i = threadIdx.x; i < nr * q_tasks; i += blockDim.x) {
    const int rr = i / q_tasks, task = i % q_tasks, g = task / half, j = task % half;
    const int64_t r = r0 + rr;
    const double c = rope_cs[rr * dk + j], s = rope_cs[rr * dk + half + j];
    const float* src = p.proj + r * p.P + g * h * p.dk + 2 * j;
    T* dst = static_cast<T*>(p.q) + (r * p.H + g * h) * p.dk + 2 * j;
    float u0 = 0.f, u1 = 0.f;
    for (int h0 = 0; h0 < h; h0 += kRopeHeads) {
      float2 x[kRopeHeads];
#pragma unroll
      for (int k = 0; k < kRopeHeads; ++k) {
        if (h0 + k < h) x[k] = __ldg(reinterpret_cast<const float2*>(src + (h0 + k) * dk));
      }
#pragma unroll
      for (int k = 0; k < kRopeHeads; ++k) {
        if (h0 + k < h) {
          const Pair<T> y = rotate_pair<T>(x[k], c, s);
          *reinterpret_cast<Pair<T>*>(dst + (h0 + k) * dk) = y;
          u0 += to_f32(y.a);
          u1 += to_f32(y.b);
        }
      }
    }
    *reinterpret_cast<float2*>(u + (r * p.G + g) * p.dk + 2 * j) =
        make_float2(u0 / static_cast<float>(h), u1 / static_cast<float>(h));
  }
  // Key tasks (row, key kind, group, pair) and value tasks (row, kind, group, pair): kinds 0 cmp,
  // 1 sel, 2 win; kRopeBatch tasks per thread loaded before any is stored.
  const int k_tasks = 3 * G * half, v_tasks = 3 * G * dv2, n = nr * (k_tasks + v_tasks);
  for (int i0 = threadIdx.x; i0 < n; i0 += kRopeBatch * blockDim.x) {
    float2 x[kRopeBatch];
    T* dst[kRopeBatch];
    int pair[kRopeBatch];  // the rotation's pair index and row, or -1: a value task
    int row[kRopeBatch];
#pragma unroll
    for (int b = 0; b < kRopeBatch; ++b) {
      const int i = i0 + b * static_cast<int>(blockDim.x);
      if (i >= n) continue;
      const int rr = i / (k_tasks + v_tasks), task = i % (k_tasks + v_tasks);
      const RowInfo ri = row_info(p, r0 + rr);
      const float* pr = p.proj + (r0 + rr) * p.P + p.H * p.dk;
      row[b] = rr;
      if (task < k_tasks) {
        const int kv = task / (G * half), g = task / half % G, j = task % half;
        x[b] =
            __ldg(reinterpret_cast<const float2*>(pr + kv * G * (p.dk + p.dv) + g * p.dk + 2 * j));
        void* base = kv == 0 ? p.k_cmp_raw : kv == 1 ? p.k_sel : p.k_win;
        dst[b] = static_cast<T*>(base) + cache_at(p, ri.b, g, ri.t, p.dk, p.cap) + 2 * j;
        pair[b] = j;
      } else {
        const int vt = task - k_tasks, kv = vt / (G * dv2), g = vt / dv2 % G, e = 2 * (vt % dv2);
        x[b] = __ldg(
            reinterpret_cast<const float2*>(pr + kv * G * (p.dk + p.dv) + G * p.dk + g * p.dv + e));
        void* base = kv == 0 ? p.v_cmp_raw : kv == 1 ? p.v_sel : p.v_win;
        dst[b] = static_cast<T*>(base) + cache_at(p, ri.b, g, ri.t, p.dv, p.cap) + e;
        pair[b] = -1;
      }
    }
#pragma unroll
    for (int b = 0; b < kRopeBatch; ++b) {
      if (i0 + b * static_cast<int>(blockDim.x) >= n) continue;
      const int j = pair[b], rr = row[b];
      *reinterpret_cast<Pair<T>*>(dst[b]) =
          j >= 0 ? rotate_pair<T>(x[b], rope_cs[rr * dk + j], rope_cs[rr * dk + half + j])
                 : Pair<T>{from_f32<T>(x[b].x), from_f32<T>(x[b].y)};
    }
  }
}

constexpr int kGateThreads = 256;  // 8 (row, group) vectors per block, one per warp

// hid [R G, g_hid]: u fc1_w^T without the bias (cuBLAS). One warp per (row, group): bias, SiLU,
// fc2 (lanes split the hidden units, summed by shuffles as in prepare_gates), gate function.
__global__ void __launch_bounds__(kGateThreads)
    nsa_prefill_gate_kernel(const __grid_constant__ StepParams p, const float* hid) {
  pdl_wait(p.pdl);
  pdl_launch_dependents(p.pdl);
  const int lane = threadIdx.x % 32;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * (kGateThreads / 32) + threadIdx.x / 32;
  if (v >= p.R * p.G) return;
  const int g_hid = static_cast<int>(p.g_hid);
  const float* hv = hid + v * p.g_hid;
  float z[3] = {0.f, 0.f, 0.f};
  for (int i = lane; i < g_hid; i += 32) {
    const float x = hv[i] + p.fc1_b[i];
    const float s = x / (1.f + expf(-x));
#pragma unroll
    for (int k = 0; k < 3; ++k) z[k] += p.fc2_w[k * p.g_hid + i] * s;
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    for (int off = 16; off > 0; off /= 2) z[k] += __shfl_xor_sync(0xffffffffu, z[k], off);
    z[k] += p.fc2_b[k];
  }
  if (lane == 0) write_gates(p, p.gates + v * 3, z);
}

}  // namespace nsa::cuda
