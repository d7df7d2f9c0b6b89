// Parameters of the CUDA step kernels (decode, and prefill in row chunks). Raw pointers with
// shapes; kernels never see the layer. Rows r in [0, R) are rows row0 + r of the call's B*T.
#pragma once

#include <cstdint>

#include "cuda/common/index_math.h"

namespace nsa::cuda {

// Each branch's keys of one (row, group) are spread over at most n_*_splits thread blocks
// (planned on the host from the batch and the SM count); a split covers a multiple of
// kTileKeys keys, so the key count per split is decided on the device from the actual length.
constexpr int64_t kTileKeys = 64;
constexpr int64_t kMaxSplits = 256;  // per branch
constexpr int kFusedStamps = 8;      // StepParams::stamps entries

struct StepParams {
  // Shapes
  int64_t B, T, row0, R;  // call has B*T rows (row = b*T + tt); this launch covers R of them
  int64_t H, G, h, dk, dv, dim, P;  // P = projection width H*dk + 3*G*(dk+dv)
  int64_t l, d, l_sel, n_sel, w, g_hid;
  int64_t cap, cap_cmp;  // cache capacity in tokens and in compressed tokens
  int64_t n_cmp_splits, n_win_splits, n_sel_splits;  // splits per (row, group) of each branch
  int gate_sigmoid;
  float gate_temp;
  float scale;              // 1/sqrt(dk)
  const double* rope_freq;  // [dk / 2] theta^(-2 j / dk), computed on the host as the CPU does
  int compute_all;          // 1: never skip zero-gated branches (inspection)
  int pdl;                  // 1: launched with programmatic dependent launch
  // 1 (tiled prefill): the sel pass runs one split per (row, group) and writes the gated
  // output o itself from the single cmp and window partials (no combine kernel).
  int sel_fused;
  // 1 (tiled prefill): the sel pass takes its (row, group) pairs group-major (block x: group
  // x / R, row x % R), so the blocks running at once gather from one group's K/V (42 MB at 64k,
  // which L2 holds) rather than from all groups'.
  int sel_group_major;
  // 1 (tiled prefill, sel_fused): the forced blocks (0, the current and the previous) are
  // attended apart, by tiles of queries (nsa_prefill_fsel_kernel, the sel partial slot); the sel
  // pass gathers only the other selected blocks and merges that partial by log-sum-exp.
  int sel_forced_apart;

  const int64_t* len;  // [1] tokens per sequence in the cache before this call
  int64_t* len_out;    // [1] advanced by `advance` by the combine's last block (or null)
  uint32_t* done;      // [1] combine blocks (or fused (row, group)s) finished; zero between
                       // launches
  uint32_t* rg_done;   // [R, G] fused and short decode: blocks of the (row, group) finished;
                       // zero between launches
  int fused_decode;    // 1: the step runs as nsa_fused_decode_kernel (decode, T = 1)
  // 1: the step runs as nsa_short_decode_kernel (decode, T = 1, a short cache): n_sel_splits =
  // n_win_splits = the cache's selection blocks (one split slot per block), n_cmp_splits = 1.
  int short_decode;
  // Development aid: the fused kernel's block (0, 0) (the short kernel's block of (row 0, group
  // 0) that holds the new token) writes its SM clock at each phase boundary here
  // ([kFusedStamps], unwritten entries keep their value); null: no stamps.
  long long* stamps;
  int64_t advance;

  // Inputs and weights (storage type unless noted)
  const float* proj;  // [R, P] f32: x W_in^T for this launch's rows
  const float* fc1_w;
  const float* fc1_b;  // [g_hid, dk], [g_hid] f32
  const float* fc2_w;
  const float* fc2_b;  // [3, g_hid], [3] f32

  // Cache, [B, G, cap, dk|dv] (cmp stream [B, G, cap_cmp, dk|dv]), storage type
  void* k_cmp_raw;
  void* v_cmp_raw;
  void* k_sel;
  void* v_sel;
  void* k_win;
  void* v_win;
  void* k_cmp;
  void* v_cmp;

  // Workspace (f32 unless noted)
  void* q;              // [R, H, dk] storage type, rotated
  float* gates;         // [R, G, 3]
  float* cmp_logits;    // [R, G, h, cap_cmp]
  float* block_scores;  // [R, G, nb_cap] group score of each selection block
  int64_t nb_cap;       // cap / l_sel + 1
  float* part_m;        // [R, G, n_splits_total, h]
  float* part_s;        // [R, G, n_splits_total, h]
  float* part_o;        // [R, G, n_splits_total, h, dv]
  int32_t* sel_blocks;  // [R, G, n_sel], -1 = unused
  int32_t* sel_count;   // [R, G]
  int32_t* reads;       // [R, G, 3]
  float* o_cmp;
  float* o_sel;
  float* o_win;  // [R, H, dv]
  void* o;       // [R, H*dv] storage type, gated sum (input of the output projection)
};

NSA_HOST_DEVICE inline int64_t n_splits_total(const StepParams& p) {
  return p.n_cmp_splits + p.n_win_splits + p.n_sel_splits;
}

// Keys per split when n >= 0 keys go to at most `splits` splits: a multiple of kTileKeys.
NSA_HOST_DEVICE inline int64_t split_chunk(int64_t n, int64_t splits) {
  const int64_t per = div32(n + splits - 1, splits);
  const int64_t tiles = (per + kTileKeys - 1) / kTileKeys;
  return (tiles < 1 ? 1 : tiles) * kTileKeys;
}

// Splits that hold keys when n keys go to at most `splits` splits.
NSA_HOST_DEVICE inline int64_t splits_used(int64_t n, int64_t splits) {
  if (n <= 0) return 0;
  const int64_t chunk = split_chunk(n, splits);
  return div32(n + chunk - 1, chunk);
}

}  // namespace nsa::cuda
