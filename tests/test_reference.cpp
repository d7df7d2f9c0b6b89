// The CPU reference against invariants: dense-attention equivalence in degenerate configs,
// causality, group-shared selection, prefill == decode continuation, reads, edge cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <set>

#include "core/blocks.h"
#include "test_util.h"

namespace nsa {
namespace {

using test::make_layer;
using test::Oracle;
using test::rel_l2;
using test::small_config;

struct Outs {
  Tensor y;
  Inspection ins;
};

Outs prefill_all(Layer& layer, const Tensor& x) {
  KVCache cache = layer.new_cache(x.dim(0));
  Outs r;
  r.ins.want = InspectRequest::all();
  r.y = layer.prefill(cache, x, &r.ins);
  return r;
}

Tensor slice_t(const Tensor& x, int64_t t0, int64_t n) {
  const int64_t B = x.dim(0), T = x.dim(1), D = x.dim(2);
  Tensor s(DType::kF32, {B, n, D});
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(x.data<float>() + (b * T + t0) * D, n * D, s.data<float>() + b * n * D);
  return s;
}

// Prefill of k tokens, then one decode step per remaining token; outputs concatenated over t.
Outs prefill_then_decode(Layer& layer, const Tensor& x, int64_t k) {
  const int64_t B = x.dim(0), T = x.dim(1);
  KVCache cache = layer.new_cache(B);
  std::vector<Outs> parts;
  for (int64_t t0 = 0; t0 < T;) {
    const int64_t n = t0 == 0 ? k : 1;
    Outs r;
    r.ins.want = InspectRequest::all();
    r.y = t0 == 0 ? layer.prefill(cache, slice_t(x, 0, k), &r.ins)
                  : layer.decode(cache, slice_t(x, t0, 1), &r.ins);
    parts.push_back(std::move(r));
    t0 += n;
  }
  EXPECT_EQ(cache.length(), T);
  auto cat = [&](auto get) {
    const Tensor& first = get(parts[0]);
    Shape s = first.shape();
    s[1] = T;
    Tensor out(first.dtype(), s);
    const size_t row = first.nbytes() / size_t(B * first.dim(1));
    int64_t t0 = 0;
    for (auto& p : parts) {
      const Tensor& src = get(p);
      const int64_t n = src.dim(1);
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(out.raw() + size_t(b * T + t0) * row, src.raw() + size_t(b * n) * row,
                    row * size_t(n));
      t0 += n;
    }
    return out;
  };
  Outs all;
  all.y = cat([](Outs& r) -> const Tensor& { return r.y; });
  all.ins.gates = cat([](Outs& r) -> const Tensor& { return r.ins.gates; });
  all.ins.sel_blocks = cat([](Outs& r) -> const Tensor& { return r.ins.sel_blocks; });
  all.ins.o_cmp = cat([](Outs& r) -> const Tensor& { return r.ins.o_cmp; });
  all.ins.o_sel = cat([](Outs& r) -> const Tensor& { return r.ins.o_sel; });
  all.ins.o_win = cat([](Outs& r) -> const Tensor& { return r.ins.o_win; });
  all.ins.reads = cat([](Outs& r) -> const Tensor& { return r.ins.reads; });
  return all;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Dense causal attention per head over branch `kname`/`vname`, computed by the oracle.
Tensor dense_branch(const Config& c, const std::map<std::string, Tensor>& w, const Tensor& x,
                    const std::string& kname, const std::string& vname) {
  Oracle o{c, w};
  const int64_t B = x.dim(0), T = x.dim(1), H = c.heads, h = c.heads_per_group();
  Tensor out(DType::kF32, {B, T, H, c.dv});
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x.data<float>() + b * T * c.dim;
    auto Q = o.heads("W_Q.weight", xb, T, H, c.dk, true);
    auto K = o.heads(kname, xb, T, c.groups, c.dk, true);
    auto V = o.heads(vname, xb, T, c.groups, c.dv, false);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int64_t> pos(size_t(t + 1));
      std::iota(pos.begin(), pos.end(), 0);
      for (int64_t hd = 0; hd < H; ++hd) {
        auto v = Oracle::attend(Q[size_t(t)], hd * c.dk, c.dk, K, V, hd / h, c.dv, pos);
        for (int64_t k = 0; k < c.dv; ++k)
          out.data<float>()[((b * T + t) * H + hd) * c.dv + k] = float(v[size_t(k)]);
      }
    }
  }
  return out;
}

TEST(Reference, WindowOnlyEqualsDenseWhenWindowCoversAll) {
  Config c = small_config();
  c.w = 40;
  const auto w = random_weights(c, 11);
  auto wf = w;
  force_gate(wf, 2);
  Layer layer(c, wf);
  const Tensor x = random_normal({2, 40, c.dim}, 5);
  Outs r = prefill_all(layer, x);
  const Tensor dense = dense_branch(c, w, x, "W_K_win.weight", "W_V_win.weight");
  EXPECT_LT(rel_l2(r.ins.o_win, dense), 1e-5);
  // With one-hot gates, y is the output projection of o_win alone: compare y too.
  for (int64_t i = 0; i < r.ins.gates.numel(); ++i)
    EXPECT_EQ(r.ins.gates.data<float>()[i], i % 3 == 2 ? 1.f : 0.f);
  Oracle o{c, w};
  Tensor y_ref(DType::kF32, r.y.shape());
  for (int64_t row = 0; row < 80; ++row) {
    auto y = o.project("out.weight", dense.data<float>() + row * c.heads * c.dv);
    for (int64_t k = 0; k < c.dim; ++k) y_ref.data<float>()[row * c.dim + k] = float(y[size_t(k)]);
  }
  EXPECT_LT(rel_l2(r.y, y_ref), 1e-5);
}

TEST(Reference, SelectionOnlyEqualsDenseWithUnitBlocks) {
  Config c = small_config();
  c.l = c.d = c.l_sel = 1;
  c.n_sel = 64;
  const auto w = random_weights(c, 12);
  auto wf = w;
  force_gate(wf, 1);
  Layer layer(c, wf);
  const Tensor x = random_normal({2, 64, c.dim}, 6);
  Outs r = prefill_all(layer, x);
  EXPECT_LT(rel_l2(r.ins.o_sel, dense_branch(c, w, x, "W_K_sel.weight", "W_V_sel.weight")), 1e-5);
}

TEST(Reference, CompressedOnlyEqualsDenseWithUnitBlocks) {
  Config c = small_config();
  c.l = c.d = 1;
  const auto w = random_weights(c, 13);
  auto wf = w;
  force_gate(wf, 0);
  Layer layer(c, wf);
  const Tensor x = random_normal({2, 50, c.dim}, 7);
  Outs r = prefill_all(layer, x);
  EXPECT_LT(rel_l2(r.ins.o_cmp, dense_branch(c, w, x, "W_K_cmp.weight", "W_V_cmp.weight")), 1e-5);
}

// Changing x at positions > t changes nothing at positions <= t, in every output.
TEST(Reference, CausalInPrefillAndDecode) {
  const Config c = small_config();
  Layer layer = make_layer(c, 21);
  const int64_t T = 90;
  const Tensor x = random_normal({1, T, c.dim}, 8);
  for (int64_t t : {0, 7, 31, 50, 88}) {
    Tensor x2 = x;
    const Tensor noise = random_normal({1, T, c.dim}, 100 + uint64_t(t));
    for (int64_t i = (t + 1) * c.dim; i < T * c.dim; ++i)
      x2.data<float>()[i] += noise.data<float>()[i];
    for (int64_t k : {T, int64_t{20}}) {
      Outs a = prefill_then_decode(layer, x, k);
      Outs b = prefill_then_decode(layer, x2, k);
      auto prefix_equal = [&](const Tensor& p, const Tensor& q) {
        const size_t n = p.nbytes() / size_t(T) * size_t(t + 1);
        return std::memcmp(p.raw(), q.raw(), n) == 0;
      };
      EXPECT_TRUE(prefix_equal(a.y, b.y)) << t << " " << k;
      EXPECT_TRUE(prefix_equal(a.ins.o_cmp, b.ins.o_cmp)) << t;
      EXPECT_TRUE(prefix_equal(a.ins.o_sel, b.ins.o_sel)) << t;
      EXPECT_TRUE(prefix_equal(a.ins.o_win, b.ins.o_win)) << t;
      EXPECT_TRUE(prefix_equal(a.ins.gates, b.ins.gates)) << t;
      EXPECT_TRUE(prefix_equal(a.ins.sel_blocks, b.ins.sel_blocks)) << t;
      // ...and the future really did change (the test can fail).
      EXPECT_FALSE(same_bytes(a.y, b.y));
    }
  }
}

// Every head of a group attends over exactly the group's selected tokens, and the selection is
// the top-n of the group score computed independently from the compressed attention.
TEST(Reference, GroupSharedSelectionMatchesOracle) {
  for (int64_t H : {4, 8}) {
    Config c = small_config();
    c.heads = H;
    c.n_sel = 4;
    const auto w = random_weights(c, 30 + uint64_t(H));
    Layer layer(c, w);
    const int64_t T = 150, h = c.heads_per_group();
    const Tensor x = random_normal({1, T, c.dim}, 9);
    Outs r = prefill_all(layer, x);
    Oracle o{c, w};
    auto Q = o.heads("W_Q.weight", x.data<float>(), T, H, c.dk, true);
    auto Kc = o.heads("W_K_cmp.weight", x.data<float>(), T, c.groups, c.dk, true);
    auto Vc = o.heads("W_V_cmp.weight", x.data<float>(), T, c.groups, c.dv, false);
    auto Ks = o.heads("W_K_sel.weight", x.data<float>(), T, c.groups, c.dk, true);
    auto Vs = o.heads("W_V_sel.weight", x.data<float>(), T, c.groups, c.dv, false);
    // Compressed tokens: means of l consecutive rotated keys / values.
    std::vector<std::vector<double>> KC, VC;
    for (int64_t i = 0; i < core::num_cmp(T, c.l, c.d); ++i) {
      std::vector<double> k(size_t(c.groups * c.dk), 0.0), v(size_t(c.groups * c.dv), 0.0);
      for (int64_t p = i * c.d; p < i * c.d + c.l; ++p) {
        for (size_t e = 0; e < k.size(); ++e) k[e] += Kc[size_t(p)][e] / double(c.l);
        for (size_t e = 0; e < v.size(); ++e) v[e] += Vc[size_t(p)][e] / double(c.l);
      }
      KC.push_back(k);
      VC.push_back(v);
    }
    int near_ties = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t g = 0; g < c.groups; ++g) {
        const int32_t* blk = r.ins.sel_blocks.data<int32_t>() + (t * c.groups + g) * c.n_sel;
        std::vector<int64_t> pos;
        std::set<int64_t> chosen;
        for (int64_t k = 0; k < c.n_sel && blk[k] >= 0; ++k) {
          chosen.insert(blk[k]);
          for (int64_t p = blk[k] * c.l_sel; p < std::min((blk[k] + 1) * c.l_sel, t + 1); ++p)
            pos.push_back(p);
        }
        // Group score from independent p_cmp, by brute-force overlap counting.
        const int64_t nc = core::num_cmp(t + 1, c.l, c.d), nb = (t + 1) / c.l_sel;
        std::vector<double> score(size_t(nb), 0.0);
        for (int64_t j = 0; j < h; ++j) {
          const int64_t hd = g * h + j;
          std::vector<double> s;
          double m = -INFINITY, sum = 0;
          for (int64_t i = 0; i < nc; ++i) {
            double d = 0;
            for (int64_t e = 0; e < c.dk; ++e)
              d += Q[size_t(t)][size_t(hd * c.dk + e)] * KC[size_t(i)][size_t(g * c.dk + e)];
            s.push_back(d / std::sqrt(double(c.dk)));
            m = std::max(m, s.back());
          }
          for (double& v : s) sum += (v = std::exp(v - m));
          for (int64_t i = 0; i < nc; ++i)
            for (int64_t jb = 0; jb < nb; ++jb)
              for (int64_t p = i * c.d; p < i * c.d + c.l; ++p)
                if (p / c.l_sel == jb) score[size_t(jb)] += s[size_t(i)] / sum / double(c.l);
          // The head's o_sel is attention over exactly the group's tokens.
          auto want = Oracle::attend(Q[size_t(t)], hd * c.dk, c.dk, Ks, Vs, g, c.dv, pos);
          const float* got = r.ins.o_sel.data<float>() + (t * H + hd) * c.dv;
          for (int64_t e = 0; e < c.dv; ++e)
            EXPECT_NEAR(got[e], want[size_t(e)], 1e-5) << t << " " << hd;
        }
        // Chosen candidates score at least as high as any complete unchosen candidate.
        const int64_t cur = t / c.l_sel;
        double min_chosen = INFINITY, max_other = -INFINITY;
        for (int64_t jb = 0; jb < nb; ++jb) {
          if (jb == 0 || jb == cur || jb == cur - 1) {
            EXPECT_TRUE(chosen.contains(jb)) << t;
            continue;
          }
          (chosen.contains(jb) ? min_chosen : max_other) =
              chosen.contains(jb) ? std::min(min_chosen, score[size_t(jb)])
                                  : std::max(max_other, score[size_t(jb)]);
        }
        EXPECT_GE(min_chosen, max_other - 1e-6) << t;
        near_ties += std::abs(min_chosen - max_other) < 1e-6;
        EXPECT_TRUE(chosen.contains(cur) && chosen.contains(0));
      }
    }
    EXPECT_LT(near_ties, 5);
  }
}

// prefill(T) == prefill(k) + (T - k) decode steps for every output, for k below l, at emission
// boundaries, at block boundaries and elsewhere.
TEST(Reference, PrefillEqualsDecodeContinuation) {
  const Config c = small_config();  // l = 8, d = 4, l_sel = 16
  for (int64_t B : {1, 3}) {
    Layer layer = make_layer(c, 40 + uint64_t(B));
    const int64_t T = 75;
    const Tensor x = random_normal({B, T, c.dim}, 10 + uint64_t(B));
    const Outs full = prefill_all(layer, x);
    for (int64_t k : {1, 3, 7, 8, 12, 16, 33, 64, 74}) {
      const Outs part = prefill_then_decode(layer, x, k);
      EXPECT_LT(rel_l2(part.y, full.y), 1e-6) << k;
      EXPECT_LT(rel_l2(part.ins.o_cmp, full.ins.o_cmp), 1e-6) << k;
      EXPECT_LT(rel_l2(part.ins.o_sel, full.ins.o_sel), 1e-6) << k;
      EXPECT_LT(rel_l2(part.ins.o_win, full.ins.o_win), 1e-6) << k;
      EXPECT_LT(rel_l2(part.ins.gates, full.ins.gates), 1e-6) << k;
      EXPECT_TRUE(same_bytes(part.ins.sel_blocks, full.ins.sel_blocks)) << k;
      EXPECT_TRUE(same_bytes(part.ins.reads, full.ins.reads)) << k;
    }
  }
}

TEST(Reference, ReadsFollowSpecSection5) {
  Config c = small_config();
  c.w = 20;
  Layer layer = make_layer(c, 50);
  const int64_t T = 130;
  const Outs r = prefill_then_decode(layer, random_normal({2, T, c.dim}, 11), 5);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t g = 0; g < c.groups; ++g) {
        const int64_t at = (b * T + t) * c.groups + g;
        const int32_t* rd = r.ins.reads.data<int32_t>() + at * 3;
        const int32_t* blk = r.ins.sel_blocks.data<int32_t>() + at * c.n_sel;
        std::set<int64_t> tokens;
        for (int64_t k = 0; k < c.n_sel; ++k)
          for (int64_t p = blk[k] * c.l_sel; blk[k] >= 0 && p < (blk[k] + 1) * c.l_sel && p <= t;
               ++p)
            tokens.insert(p);
        const int64_t L = t + 1;
        EXPECT_EQ(rd[0], L < c.l ? 0 : (L - c.l) / c.d + 1);
        EXPECT_EQ(rd[1], int64_t(tokens.size()));
        EXPECT_EQ(rd[2], std::min<int64_t>(c.w, L));
        EXPECT_LE(rd[0] + rd[1] + rd[2], core::expected_reads(t, c));
        // Whichever blocks win, their token count is fixed (prefill work accounting).
        EXPECT_EQ(rd[1], core::selected_tokens_at(t, c)) << "t " << t;
      }
    }
  }
  int64_t sum = 0;  // the same over every query of one sequence and group
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* rd = r.ins.reads.data<int32_t>() + t * c.groups * 3;
    sum += rd[0] + rd[1] + rd[2];
  }
  EXPECT_EQ(sum, core::prefill_reads(T, c));
}

TEST(Reference, EdgeCasesAreFiniteAndExact) {
  Config c = small_config();
  // T = 1 and t < l: no compressed token is visible, so o_cmp is exactly zero.
  {
    Layer layer = make_layer(c, 60);
    const Outs r = prefill_then_decode(layer, random_normal({1, 5, c.dim}, 12), 1);
    for (int64_t i = 0; i < r.ins.o_cmp.numel(); ++i) ASSERT_EQ(r.ins.o_cmp.data<float>()[i], 0.f);
    for (int64_t i = 0; i < r.y.numel(); ++i) ASSERT_TRUE(std::isfinite(r.y.data<float>()[i]));
    // At t = 0 selection and window both see only token 0: o_sel and o_win are v_sel[0], v_win[0].
    Oracle o{c, random_weights(c, 60)};
    const Tensor x1 = slice_t(random_normal({1, 5, c.dim}, 12), 0, 1);
    auto vs = o.project("W_V_sel.weight", x1.data<float>());
    auto vw = o.project("W_V_win.weight", x1.data<float>());
    for (int64_t hd = 0; hd < c.heads; ++hd)
      for (int64_t e = 0; e < c.dv; ++e) {
        const int64_t g = hd / c.heads_per_group();
        EXPECT_NEAR(r.ins.o_sel.data<float>()[hd * c.dv + e], vs[size_t(g * c.dv + e)], 1e-5);
        EXPECT_NEAR(r.ins.o_win.data<float>()[hd * c.dv + e], vw[size_t(g * c.dv + e)], 1e-5);
      }
  }
  // w = 0: o_win is exactly zero and reads win = 0.
  {
    c.w = 0;
    Layer layer = make_layer(c, 61);
    const Outs r = prefill_all(layer, random_normal({1, 40, c.dim}, 13));
    for (int64_t i = 0; i < r.ins.o_win.numel(); ++i) ASSERT_EQ(r.ins.o_win.data<float>()[i], 0.f);
    for (int64_t i = 0; i < r.ins.reads.numel(); i += 3)
      ASSERT_EQ(r.ins.reads.data<int32_t>()[i + 2], 0);
    for (int64_t i = 0; i < r.y.numel(); ++i) ASSERT_TRUE(std::isfinite(r.y.data<float>()[i]));
  }
  // w = 1: o_win is the token's own value.
  {
    c.w = 1;
    const auto w = random_weights(c, 62);
    Layer layer(c, w);
    const Tensor x = random_normal({1, 30, c.dim}, 14);
    const Outs r = prefill_all(layer, x);
    Oracle o{c, w};
    for (int64_t t = 0; t < 30; ++t) {
      auto v = o.project("W_V_win.weight", x.data<float>() + t * c.dim);
      for (int64_t hd = 0; hd < c.heads; ++hd)
        for (int64_t e = 0; e < c.dv; ++e)
          EXPECT_NEAR(r.ins.o_win.data<float>()[(t * c.heads + hd) * c.dv + e],
                      v[size_t(hd / c.heads_per_group() * c.dv + e)], 1e-5);
    }
  }
}

// H = G (one head per group) and sigmoid gates go through the same invariants.
TEST(Reference, OneHeadPerGroupAndSigmoidGate) {
  Config c = small_config();
  c.heads = c.groups = 3;
  c.gate = GateKind::kSigmoid;
  Layer layer = make_layer(c, 70);
  const Tensor x = random_normal({1, 60, c.dim}, 15);
  const Outs full = prefill_all(layer, x);
  const Outs part = prefill_then_decode(layer, x, 9);
  EXPECT_LT(rel_l2(part.y, full.y), 1e-6);
  for (int64_t i = 0; i < full.ins.gates.numel(); ++i) {
    const float gv = full.ins.gates.data<float>()[i];
    EXPECT_TRUE(gv > 0.f && gv < 1.f);
  }
}

// Each sequence of a batch is independent: B = 3 equals three B = 1 runs.
TEST(Reference, BatchSequencesAreIndependent) {
  const Config c = small_config();
  Layer layer = make_layer(c, 80);
  const int64_t T = 70;
  const Tensor x = random_normal({3, T, c.dim}, 16);
  const Outs batched = prefill_then_decode(layer, x, 20);
  for (int64_t b = 0; b < 3; ++b) {
    Tensor xb(DType::kF32, {1, T, c.dim});
    std::copy_n(x.data<float>() + b * T * c.dim, T * c.dim, xb.data<float>());
    const Outs single = prefill_then_decode(layer, xb, 20);
    EXPECT_LT(
        test::rel_l2(batched.y.data<float>() + b * T * c.dim, single.y.data<float>(), T * c.dim),
        1e-6);
    EXPECT_EQ(0,
              std::memcmp(batched.ins.sel_blocks.data<int32_t>() + b * T * c.groups * c.n_sel,
                          single.ins.sel_blocks.data<int32_t>(), single.ins.sel_blocks.nbytes()));
  }
  // Different inputs really give different outputs per sequence.
  EXPECT_GT(test::rel_l2(batched.y.data<float>(), batched.y.data<float>() + T * c.dim, T * c.dim),
            0.1);
}

// A zero gate skips the branch without changing y: the forced one-hot layer's y equals the
// output projection of that branch computed with every branch on.
TEST(Reference, ZeroGatedBranchesAreSkippedExactly) {
  const Config c = small_config();
  for (int branch = 0; branch < 3; ++branch) {
    auto w = random_weights(c, 90);
    force_gate(w, branch);
    Layer layer(c, w);
    const Tensor x = random_normal({1, 70, c.dim}, 17);
    KVCache cache = layer.new_cache(1);
    const Tensor y_skip = layer.prefill(cache, x);  // no inspection: zero-gated branches skipped
    const Outs r = prefill_all(layer, x);
    EXPECT_TRUE(same_bytes(y_skip, r.y)) << branch;
  }
}

// Low-precision storage stays close to fp32 (rounding weights, activations and cache).
TEST(Reference, Bf16AndFp16StorageCloseToFp32) {
  const Config c = small_config();
  const Tensor x = random_normal({2, 80, c.dim}, 18);
  Layer f32 = make_layer(c, 99);
  const Outs ref = prefill_all(f32, x);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    Layer low = make_layer(c, 99, -1, dt);
    const Outs r = prefill_all(low, x);
    const double err = rel_l2(r.y, ref.y);
    EXPECT_LT(err, dt == DType::kBF16 ? 3e-2 : 4e-3) << to_string(dt);
    EXPECT_GT(err, 0.0);
  }
}

}  // namespace
}  // namespace nsa
