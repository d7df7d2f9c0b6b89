// Shared block math: compressed counts, overlap mapping (against brute force and the paper's
// Eq. 9), selection rules and reads.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "core/blocks.h"
#include "cuda/decode/step_params.h"
#include "test_util.h"

namespace nsa {
namespace {

Config block_config(int64_t l, int64_t d, int64_t l_sel, int64_t n_sel = 16) {
  Config c;
  c.l = l;
  c.d = d;
  c.l_sel = l_sel;
  c.n_sel = n_sel;
  return c;
}

TEST(Blocks, NumCmpAndEmission) {
  EXPECT_EQ(core::num_cmp(0, 32, 16), 0);
  EXPECT_EQ(core::num_cmp(31, 32, 16), 0);
  EXPECT_EQ(core::num_cmp(32, 32, 16), 1);
  EXPECT_EQ(core::num_cmp(47, 32, 16), 1);
  EXPECT_EQ(core::num_cmp(48, 32, 16), 2);
  EXPECT_EQ(core::num_cmp(1024, 32, 16), 63);
  // Emission happens exactly where num_cmp grows.
  for (int64_t L = 1; L < 300; ++L) {
    EXPECT_EQ(core::emits_cmp(L, 32, 16),
              core::num_cmp(L, 32, 16) == core::num_cmp(L - 1, 32, 16) + 1)
        << L;
  }
}

TEST(Blocks, OverlapMatchesBruteForceCount) {
  for (auto [l, d, ls] :
       {std::tuple{32, 16, 64}, {8, 4, 16}, {16, 16, 16}, {1, 1, 1}, {24, 8, 48}, {32, 8, 32}}) {
    for (int64_t i = 0; i < 40; ++i) {
      for (int64_t j = 0; j < 40; ++j) {
        int64_t count = 0;
        for (int64_t p = i * d; p < i * d + l; ++p) count += (p >= j * ls && p < (j + 1) * ls);
        ASSERT_EQ(core::overlap(i, j, l, d, ls), count)
            << l << " " << d << " " << ls << " " << i << " " << j;
      }
    }
  }
}

// SPEC: with the defaults, p_slc[j] = p[4j-1]/2 + p[4j] + p[4j+1] + p[4j+2] + p[4j+3]/2.
TEST(Blocks, DefaultScoresMatchSpecFormula) {
  const Config c = block_config(32, 16, 64);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(0, 1);
  std::vector<float> p(61);
  for (float& v : p) v = u(rng);
  const int64_t nb = 16;
  std::vector<double> s(nb, 0.0);
  core::add_block_scores(p.data(), 61, c, s.data(), nb);
  auto at = [&](int64_t i) { return i >= 0 && i < 61 ? double(p[size_t(i)]) : 0.0; };
  for (int64_t j = 0; j < nb; ++j) {
    const double want =
        at(4 * j - 1) / 2 + at(4 * j) + at(4 * j + 1) + at(4 * j + 2) + at(4 * j + 3) / 2;
    EXPECT_NEAR(s[size_t(j)], want, 1e-12) << j;
  }
}

// The paper's Eq. 9 with its index offset corrected, sum_m sum_n p[(l'/d) j + (l'/d - 1) - m - n],
// counts each compressed token by its overlap in units of d: it is (l/d) times SPEC's score, so
// the ranking is the same.
TEST(Blocks, ScoresMatchPaperEq9Multiplicity) {
  for (auto [l, d, ls] :
       {std::tuple{32, 16, 64}, {8, 4, 16}, {16, 16, 16}, {16, 8, 64}, {32, 32, 64}}) {
    const Config c = block_config(l, d, ls);
    std::mt19937 rng(l * 100 + d);
    std::uniform_real_distribution<float> u(0, 1);
    const int64_t n = 97;
    std::vector<float> p(n);
    for (float& v : p) v = u(rng);
    const int64_t nb = (n * d + l) / ls + 1;
    std::vector<double> s(size_t(nb), 0.0), eq9(size_t(nb), 0.0);
    core::add_block_scores(p.data(), n, c, s.data(), nb);
    const int64_t a = ls / d, b = l / d;
    for (int64_t j = 0; j < nb; ++j) {
      for (int64_t m = 0; m < a; ++m) {
        for (int64_t k = 0; k < b; ++k) {
          const int64_t i = a * j + (a - 1) - m - k;
          if (i >= 0 && i < n) eq9[size_t(j)] += p[size_t(i)];
        }
      }
    }
    std::vector<int64_t> r1(static_cast<size_t>(nb)), r2(static_cast<size_t>(nb));
    std::iota(r1.begin(), r1.end(), 0);
    std::iota(r2.begin(), r2.end(), 0);
    std::stable_sort(r1.begin(), r1.end(),
                     [&](auto x, auto y) { return s[size_t(x)] > s[size_t(y)]; });
    std::stable_sort(r2.begin(), r2.end(),
                     [&](auto x, auto y) { return eq9[size_t(x)] > eq9[size_t(y)]; });
    for (int64_t j = 0; j < nb; ++j) {
      EXPECT_NEAR(eq9[size_t(j)], s[size_t(j)] * double(l) / double(d), 1e-9) << j;
    }
    EXPECT_EQ(r1, r2);
  }
}

std::vector<int32_t> select(const std::vector<double>& score, int64_t t, const Config& c) {
  std::vector<int32_t> out(size_t(c.n_sel));
  const int64_t n = core::select_blocks(score.data(), t, c, out.data());
  for (int64_t k = n; k < c.n_sel; ++k) EXPECT_EQ(out[size_t(k)], -1);
  out.resize(size_t(n));
  return out;
}

TEST(Selection, ForcedBlocksAndDedup) {
  const Config c = block_config(32, 16, 64, 16);
  std::vector<double> score(64, 0.0);
  EXPECT_EQ(select(score, 0, c), (std::vector<int32_t>{0}));      // c = 0: {0, 0, -1} -> {0}
  EXPECT_EQ(select(score, 63, c), (std::vector<int32_t>{0}));     // block 0 complete but forced
  EXPECT_EQ(select(score, 64, c), (std::vector<int32_t>{0, 1}));  // c = 1: {0, 1, 0} -> {0, 1}
  EXPECT_EQ(select(score, 130, c), (std::vector<int32_t>{0, 1, 2}));
}

TEST(Selection, TopByScoreThenAscending) {
  const Config c = block_config(32, 16, 64, 5);
  std::vector<double> score(64, 0.0);
  score[3] = 0.5;
  score[7] = 0.9;
  score[2] = 0.7;
  score[5] = 0.1;
  // t = 64*10 + 5: c = 10, forced {0, 10, 9}; complete blocks 0..9; take 2 of the candidates.
  EXPECT_EQ(select(score, 645, c), (std::vector<int32_t>{0, 2, 7, 9, 10}));
}

TEST(Selection, NSelEqualToForcedTakesNoCandidates) {
  const Config c = block_config(32, 16, 64, 3);
  std::vector<double> score(64, 1.0);
  score[4] = 100.0;
  EXPECT_EQ(select(score, 64 * 8 + 3, c), (std::vector<int32_t>{0, 7, 8}));
}

TEST(Selection, TiesGoToLowerIndex) {
  const Config c = block_config(32, 16, 64, 5);
  std::vector<double> score(64, 0.25);
  EXPECT_EQ(select(score, 64 * 9 + 1, c), (std::vector<int32_t>{0, 1, 2, 8, 9}));
  score[6] = 0.5;
  EXPECT_EQ(select(score, 64 * 9 + 1, c), (std::vector<int32_t>{0, 1, 6, 8, 9}));
}

TEST(Selection, PartialCurrentBlockIsForcedNotCandidate) {
  const Config c = block_config(32, 16, 64, 16);
  std::vector<double> score(64, 0.0);
  // t = 200: blocks 0, 1, 2 complete (192 tokens), block 3 partial and forced.
  EXPECT_EQ(select(score, 200, c), (std::vector<int32_t>{0, 1, 2, 3}));
  // Exactly at a block end the current block is complete and still forced once.
  EXPECT_EQ(select(score, 255, c), (std::vector<int32_t>{0, 1, 2, 3}));
}

TEST(Selection, FewerBlocksThanNSel) {
  const Config c = block_config(32, 16, 64, 16);
  std::vector<double> score(64, 0.0);
  EXPECT_EQ(select(score, 64 * 5 + 2, c).size(), 6u);
}

TEST(Selection, ClampsTokensAtTPlusOne) {
  const int32_t blocks[] = {0, 2, 3};
  EXPECT_EQ(core::selected_tokens(blocks, 3, 64 * 3 + 9, 64), 64 + 64 + 10);
  const int32_t one[] = {0};
  EXPECT_EQ(core::selected_tokens(one, 1, 0, 64), 1);
}

TEST(Reads, ActualAndExpected) {
  const Config c = block_config(32, 16, 64, 16);  // w = 512 default
  const int32_t blocks[] = {0, 1, 2};
  const int64_t t = 150;
  const auto r = core::actual_reads(t, core::selected_tokens(blocks, 3, t, 64), c);
  EXPECT_EQ(r.cmp, (151 - 32) / 16 + 1);
  EXPECT_EQ(r.sel, 151);
  EXPECT_EQ(r.win, 151);
  EXPECT_EQ(core::expected_reads(t, c), r.cmp + 16 * 64 + 151);
  EXPECT_LE(r.total(), core::expected_reads(t, c));
}

}  // namespace
}  // namespace nsa

// The CUDA kernels split each branch's keys with these two functions on the host (workspace,
// plan) and on the device (split ranges, combine counts); they must tile the keys exactly.
TEST(Blocks, SplitChunksTileTheKeysWithWholeTiles) {
  using nsa::cuda::kTileKeys;
  for (int64_t splits : {1, 2, 3, 7, 13, 64, 256}) {
    for (int64_t n : {1, 2, 63, 64, 65, 127, 128, 1000, 4096, 4097, 65536, 1 << 20}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " splits " << splits);
      const int64_t chunk = nsa::cuda::split_chunk(n, splits);
      const int64_t used = nsa::cuda::splits_used(n, splits);
      EXPECT_EQ(chunk % kTileKeys, 0);
      EXPECT_GE(chunk, kTileKeys);
      EXPECT_GE(used, 1);
      EXPECT_LE(used, splits);           // never more splits than launched
      EXPECT_GE(used * chunk, n);        // every key is in a split
      EXPECT_LT((used - 1) * chunk, n);  // and no used split is empty
      // The smallest whole-tile chunk that fits: one tile less would need more splits.
      if (chunk > kTileKeys) {
        EXPECT_GT((n + chunk - kTileKeys - 1) / (chunk - kTileKeys), splits);
      }
    }
  }
  EXPECT_EQ(nsa::cuda::splits_used(0, 8), 0);
}

// The kernels divide in-sequence counts and indices in 32 bits (div32, mod32): exact for every
// pair below 2^31, which the backend guarantees by refusing longer contexts.
TEST(Blocks, ThirtyTwoBitDivisionMatchesSixtyFourBit) {
  const int64_t big = (int64_t{1} << 31) - 1;
  const int64_t as[] = {0, 1, 15, 16, 17, 65535, 65536, 1 << 20, 123456789, big - 1, big};
  const int64_t bs[] = {1, 2, 3, 16, 32, 64, 96, 4097, 1 << 16, big};
  for (int64_t a : as) {
    for (int64_t b : bs) {
      SCOPED_TRACE(::testing::Message() << a << " / " << b);
      EXPECT_EQ(nsa::cuda::div32(a, b), a / b);
      EXPECT_EQ(nsa::cuda::mod32(a, b), a % b);
    }
  }
}
