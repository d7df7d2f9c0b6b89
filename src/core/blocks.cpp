// Shared NSA block math; see blocks.h and SPEC.md sections 3 and 5.
#include "core/blocks.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace nsa::core {

void add_block_scores(const float* p_cmp, int64_t n_cmp, const Config& c, double* score,
                      int64_t num_blocks) {
  const double inv_l = 1.0 / static_cast<double>(c.l);
  for (int64_t i = 0; i < n_cmp; ++i) {
    const int64_t first = (i * c.d) / c.l_sel;
    const int64_t last = std::min((i * c.d + c.l - 1) / c.l_sel, num_blocks - 1);
    for (int64_t j = first; j <= last; ++j) {
      score[j] += static_cast<double>(p_cmp[i]) *
                  static_cast<double>(overlap(i, j, c.l, c.d, c.l_sel)) * inv_l;
    }
  }
}

int64_t select_blocks(const double* score, int64_t t, const Config& c, int32_t* out) {
  const int64_t cur = t / c.l_sel;
  const int64_t complete = (t + 1) / c.l_sel;
  int64_t forced[3];
  int64_t n_forced = 0;
  for (int64_t j : {int64_t{0}, cur, cur - 1}) {
    if (j < 0 || j > cur) continue;
    if (std::find(forced, forced + n_forced, j) == forced + n_forced) forced[n_forced++] = j;
  }
  auto is_forced = [&](int64_t j) {
    return std::find(forced, forced + n_forced, j) != forced + n_forced;
  };
  std::vector<int64_t> cand;
  cand.reserve(static_cast<size_t>(complete));
  for (int64_t j = 0; j < complete; ++j) {
    if (!is_forced(j)) cand.push_back(j);
  }
  const int64_t take = std::min<int64_t>(c.n_sel - n_forced, static_cast<int64_t>(cand.size()));
  auto better = [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  };
  std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), better);
  std::vector<int64_t> sel(forced, forced + n_forced);
  sel.insert(sel.end(), cand.begin(), cand.begin() + take);
  std::sort(sel.begin(), sel.end());
  for (int64_t k = 0; k < c.n_sel; ++k) {
    out[k] = k < static_cast<int64_t>(sel.size())
                 ? static_cast<int32_t>(sel[static_cast<size_t>(k)])
                 : -1;
  }
  return static_cast<int64_t>(sel.size());
}

int64_t selected_tokens(const int32_t* blocks, int64_t count, int64_t t, int64_t l_sel) {
  int64_t n = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t start = blocks[k] * l_sel;
    n += std::min(start + l_sel, t + 1) - start;
  }
  return n;
}

Reads actual_reads(int64_t t, int64_t sel_tokens, const Config& c) {
  const int64_t L = t + 1;
  return {num_cmp(L, c.l, c.d), sel_tokens, std::min(c.w, L)};
}

int64_t selected_tokens_at(int64_t t, const Config& c) {
  return std::min(t + 1, (c.n_sel - 1) * c.l_sel + t % c.l_sel + 1);
}

int64_t prefill_reads(int64_t T, const Config& c) {
  int64_t sum = 0;
  for (int64_t t = 0; t < T; ++t) sum += actual_reads(t, selected_tokens_at(t, c), c).total();
  return sum;
}

int64_t expected_reads(int64_t t, const Config& c) {
  const int64_t L = t + 1;
  return num_cmp(L, c.l, c.d) + c.n_sel * c.l_sel + std::min(c.w, L);
}

void rope_inplace(float* x, int64_t dk, int64_t pos, double theta) {
  for (int64_t i = 0; i < dk / 2; ++i) {
    const double a = static_cast<double>(pos) *
                     std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dk));
    const double cs = std::cos(a), sn = std::sin(a);
    const double x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = static_cast<float>(x0 * cs - x1 * sn);
    x[2 * i + 1] = static_cast<float>(x0 * sn + x1 * cs);
  }
}

}  // namespace nsa::core
