// Math shared by every backend: compressed-token counts, overlap weights, selection rules,
// reads accounting and RoPE (SPEC.md sections 2, 3 and 5).
#pragma once

#include <cstdint>
#include <vector>

#include "nsa/config.h"

namespace nsa::core {

// Compressed tokens that exist once L raw tokens are in: 0 if L < l, else (L - l)/d + 1.
inline int64_t num_cmp(int64_t L, int64_t l, int64_t d) { return L < l ? 0 : (L - l) / d + 1; }

// True when appending the token that makes the count L emits compressed token (L - l)/d.
inline bool emits_cmp(int64_t L, int64_t l, int64_t d) { return L >= l && (L - l) % d == 0; }

// Length of [i d, i d + l) ∩ [j l_sel, (j + 1) l_sel).
inline int64_t overlap(int64_t i, int64_t j, int64_t l, int64_t d, int64_t l_sel) {
  const int64_t lo = std::max(i * d, j * l_sel);
  const int64_t hi = std::min(i * d + l, (j + 1) * l_sel);
  return hi > lo ? hi - lo : 0;
}

// Adds sum_i p[i] * overlap(i, j) / l into score[j] for j < num_blocks (SPEC.md "scores").
void add_block_scores(const float* p_cmp, int64_t n_cmp, const Config& c, double* score,
                      int64_t num_blocks);

// Selection for a query at position t from complete-block scores score[0 .. (t+1)/l_sel).
// Writes the selected blocks ascending into out[0 .. n_sel), -1 padded; returns the count.
int64_t select_blocks(const double* score, int64_t t, const Config& c, int32_t* out);

// Raw tokens covered by the selected blocks, each clamped to end at t + 1.
int64_t selected_tokens(const int32_t* blocks, int64_t count, int64_t t, int64_t l_sel);

// Per-step reads (SPEC.md section 5) for a query at position t.
struct Reads {
  int64_t cmp = 0, sel = 0, win = 0;
  int64_t total() const { return cmp + sel + win; }
};
Reads actual_reads(int64_t t, int64_t sel_tokens, const Config& c);
int64_t expected_reads(int64_t t, const Config& c);

// Tokens of the selected blocks of a query at position t, whichever blocks win: the current
// block (t mod l_sel + 1 tokens) is always selected and every other selected block is complete,
// so it is t + 1 while the sequence has at most n_sel blocks, then (n_sel - 1) l_sel + t mod
// l_sel + 1.
int64_t selected_tokens_at(int64_t t, const Config& c);

// Keys read by the attention of one group over a prefill of positions [0, T) (SPEC.md section 5
// reads, summed over the queries); the attention FLOPs are 2 * B * heads * this * (dk + dv).
int64_t prefill_reads(int64_t T, const Config& c);

// Interleaved-pair RoPE of one head of size dk at absolute position pos, in place.
void rope_inplace(float* x, int64_t dk, int64_t pos, double theta);

}  // namespace nsa::core
