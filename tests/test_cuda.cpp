// The CUDA backend against the CPU reference on random inputs: prefill followed by decode steps
// across emission and block boundaries, every head-group size and head dim of the decode issue,
// fp32/bf16/fp16 storage, B = 1 and 3; plus the graph-replayed decode path and determinism.
// Every test skips where no CUDA device is present.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>

#include "nsa/init.h"
#include "nsa/layer.h"
#include "test_util.h"

namespace nsa {
namespace {

#define REQUIRE_GPU() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device"

struct Case {
  int64_t H, G, dk, dv, B, S0, steps;
  DType dtype;
  int64_t l_sel = 64;
  int64_t S1 = 0;          // > 0: a second prefill of S1 tokens after the first, before the steps
  int64_t l = 32, d = 16;  // compression block and stride
  int64_t n_sel = 16;
  int64_t dim = 64;  // the model dimension (the projections' K and N)
};

std::string name(const Case& c) {
  return fmt::format("H{} G{} dk{} dv{} B{} S0 {}{} steps {} {} l {} d {} l_sel {} n_sel {}", c.H,
                     c.G, c.dk, c.dv, c.B, c.S0, c.S1 > 0 ? fmt::format(" S1 {}", c.S1) : "",
                     c.steps, to_string(c.dtype), c.l, c.d, c.l_sel, c.n_sel) +
         (c.dim != 64 ? fmt::format(" dim {}", c.dim) : "");
}

Config case_config(const Case& k) {
  Config c;  // l 32, d 16, l_sel 64, n_sel 16, w 512
  c.dim = k.dim;
  c.heads = k.H;
  c.groups = k.G;
  c.dk = k.dk;
  c.dv = k.dv;
  c.gate_hidden = k.dk / 2;
  c.l_sel = k.l_sel;
  c.n_sel = k.n_sel;
  c.l = k.l;
  c.d = k.d;
  return c;
}

LayerOptions gpu_options(DType dtype = DType::kF32) {
  LayerOptions o;
  o.device = Device::kCuda;
  o.dtype = dtype;
  return o;
}

// Sets an environment variable for its lifetime (the backend reads its knobs when a layer is
// built), and removes it again even when a test assertion returns early.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { ::setenv(name, value, 1); }
  ~ScopedEnv() { ::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

// The three decode paths: the step kernels, the short-context kernel (the default where the
// cache is short) and the fused kernel, each selected by its knobs.
struct DecodePath {
  const char* name;
  const char* short_decode;  // NSA_CUDA_SHORT_DECODE
  const char* fused;         // NSA_CUDA_FUSED_DECODE
};
constexpr DecodePath kDecodePaths[] = {
    {"step kernels", "off", "off"}, {"short kernel", "auto", "off"}, {"fused kernel", "off", "on"}};

// Both knobs of a decode path for its lifetime.
class ScopedPath {
 public:
  explicit ScopedPath(const DecodePath& p)
      : short_("NSA_CUDA_SHORT_DECODE", p.short_decode), fused_("NSA_CUDA_FUSED_DECODE", p.fused) {}

 private:
  ScopedEnv short_, fused_;
};

Tensor rows(const Tensor& x, int64_t t0, int64_t n) {
  const int64_t B = x.dim(0), T = x.dim(1), D = x.dim(2);
  Tensor s(DType::kF32, {B, n, D});
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(s.data<float>() + b * n * D, x.data<float>() + (b * T + t0) * D,
                sizeof(float) * size_t(n * D));
  return s;
}

struct Outs {
  std::vector<Tensor> y, sel, reads, o_cmp, o_sel, o_win, gates;
};

// Prefills of S0 (then S1, if > 0) tokens, then one decode step per remaining token.
Outs run(Layer& layer, const Tensor& x, int64_t S0, int64_t S1 = 0) {
  Outs o;
  KVCache cache = layer.new_cache(x.dim(0));
  for (int64_t t = 0; t < x.dim(1);) {
    Inspection ins;
    ins.want = InspectRequest::all();
    const int64_t n = t == 0 ? S0 : t == S0 && S1 > 0 ? S1 : 1;
    o.y.push_back(n > 1 || t == 0 ? layer.prefill(cache, rows(x, t, n), &ins)
                                  : layer.decode(cache, rows(x, t, 1), &ins));
    o.sel.push_back(std::move(ins.sel_blocks));
    o.reads.push_back(std::move(ins.reads));
    o.o_cmp.push_back(std::move(ins.o_cmp));
    o.o_sel.push_back(std::move(ins.o_sel));
    o.o_win.push_back(std::move(ins.o_win));
    o.gates.push_back(std::move(ins.gates));
    t += n;
  }
  return o;
}

// Relative L2 over the rows (b, t) whose selection agrees in every group; returns the error and
// counts the (b, t, g) selections that differ.
double masked_rel_l2(const Tensor& a, const Tensor& ref, const Tensor& sel_a, const Tensor& sel_ref,
                     int64_t& mismatched_groups, int64_t& compared_rows) {
  const int64_t rows_n = a.dim(0) * a.dim(1), per = a.numel() / rows_n;
  const int64_t G = sel_a.dim(2), n_sel = sel_a.dim(3);
  double num = 0, den = 0;
  for (int64_t r = 0; r < rows_n; ++r) {
    bool same = true;
    for (int64_t g = 0; g < G; ++g) {
      const bool eq = std::memcmp(sel_a.data<int32_t>() + (r * G + g) * n_sel,
                                  sel_ref.data<int32_t>() + (r * G + g) * n_sel,
                                  sizeof(int32_t) * size_t(n_sel)) == 0;
      mismatched_groups += !eq;
      same = same && eq;
    }
    if (!same) continue;
    ++compared_rows;
    for (int64_t i = 0; i < per; ++i) {
      const double x = a.data<float>()[r * per + i], y = ref.data<float>()[r * per + i];
      if (!std::isfinite(x)) return INFINITY;
      num += (x - y) * (x - y);
      den += y * y;
    }
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

void check_case(const Case& k) {
  SCOPED_TRACE(name(k));
  const Config c = case_config(k);
  const auto w = random_weights(c, 1000 + uint64_t(k.H * 7 + k.dk));
  LayerOptions cpu_opt;
  cpu_opt.dtype = k.dtype;
  Layer cpu(c, w, cpu_opt), gpu(c, w, gpu_options(k.dtype));
  const Tensor x = random_normal({k.B, k.S0 + k.S1 + k.steps, c.dim}, 77 + uint64_t(k.S0));
  const Outs a = run(gpu, x, k.S0, k.S1), ref = run(cpu, x, k.S0, k.S1);
  const double tol = k.dtype == DType::kF32 ? 1e-4 : 2e-2;
  int64_t mismatched = 0, total_groups = 0, compared = 0, total_rows = 0;
  double worst = 0;
  for (size_t i = 0; i < a.y.size(); ++i) {
    SCOPED_TRACE(fmt::format("call {}", i));
    int64_t m = 0, cr = 0;
    const double err = masked_rel_l2(a.y[i], ref.y[i], a.sel[i], ref.sel[i], m, cr);
    worst = std::max(worst, err);
    EXPECT_LT(err, tol);
    for (const auto* pair : {&a.o_cmp, &a.o_win, &a.gates}) {
      const auto& other = pair == &a.o_cmp ? ref.o_cmp : pair == &a.o_win ? ref.o_win : ref.gates;
      EXPECT_LT(test::rel_l2((*pair)[i], other[i]), tol);
    }
    int64_t m2 = 0, cr2 = 0;
    EXPECT_LT(masked_rel_l2(a.o_sel[i], ref.o_sel[i], a.sel[i], ref.sel[i], m2, cr2), tol);
    EXPECT_EQ(0, std::memcmp(a.reads[i].raw(), ref.reads[i].raw(), a.reads[i].nbytes()))
        << "reads differ";
    mismatched += m;
    total_groups += a.sel[i].numel() / c.n_sel;
    compared += cr;
    total_rows += a.y[i].dim(0) * a.y[i].dim(1);
  }
  fmt::print("[ cuda     ] {}: worst rel L2 of y {:.2e}, {} of {} selections differ\n", name(k),
             worst, mismatched, total_groups);
  // Selections differ only at near-ties of the fp32 (GPU) and fp64 (CPU) group scores: rare.
  EXPECT_LE(mismatched, std::max<int64_t>(2, total_groups / (k.dtype == DType::kF32 ? 200 : 50)))
      << mismatched << " of " << total_groups << " selections differ";
  EXPECT_GE(compared * 10, total_rows * 9);
}

// Every decode path: the step kernels, the short-context kernel (where the cache is short; the
// longer cases fall back to the step kernels) and the fused kernel at every length.
TEST(Cuda, DecodeMatchesCpuAcrossShapes) {
  REQUIRE_GPU();
  for (const DecodePath& path : kDecodePaths) {
    SCOPED_TRACE(path.name);
    const ScopedPath mode(path);
    const Case cases[] = {
        {2, 2, 32, 32, 3, 1, 40, DType::kF32},     // h = 1, first emission and block at t = 31, 63
        {4, 2, 64, 64, 3, 60, 12, DType::kF32},    // h = 2, crosses the block boundary at 64
        {8, 2, 128, 128, 1, 700, 9, DType::kF32},  // h = 4, window (512) smaller than the context
        {16, 1, 192, 128, 1, 1000, 4, DType::kF32},   // h = 16, the paper's head dims
        {16, 1, 192, 128, 1, 4990, 12, DType::kF32},  // contexts to 5001, 16 selected of 78 blocks
        {32, 2, 128, 128, 3, 300, 4, DType::kF32},    // h = 16, B = 3
    };
    for (const Case& k : cases) check_case(k);
  }
}

// More selection blocks than the selection kernel has threads (259 at l_sel 32, 518 at l_sel 16):
// the top-n by radix select, also with n_sel 64 (61 to take); fewer blocks take the one-pass rank
// selection, which every other case covers.
TEST(Cuda, SelectionOverManyBlocksMatchesCpu) {
  REQUIRE_GPU();
  const Case cases[] = {
      {4, 2, 64, 64, 1, 8300, 3, DType::kF32, 32},
      {4, 2, 64, 64, 1, 8300, 3, DType::kBF16, 32},
      {4, 2, 64, 64, 2, 8300, 3, DType::kF32, 16, 0, 16, 8},
      {4, 2, 64, 64, 1, 8300, 3, DType::kF32, 32, 0, 32, 16, 64},
      {4, 2, 64, 64, 1, 8300, 3, DType::kBF16, 32, 0, 32, 16, 64},
  };
  for (const Case& k : cases) check_case(k);
}

// A context short enough for racecheck (the 8300-token cases outlast its time limit) that still
// takes the radix select: 262 selection blocks of 8 tokens (l 8, d 4), with random scores, so the
// passes can stop early where the boundary digit holds exactly the blocks still wanted.
TEST(Cuda, SelectionRadixShortContextMatchesCpu) {
  REQUIRE_GPU();
  const Case cases[] = {
      {4, 2, 32, 32, 1, 2100, 2, DType::kF32, 8, 0, 8, 4},
      {4, 2, 32, 32, 2, 2100, 2, DType::kBF16, 8, 0, 8, 4, 32},
  };
  for (const Case& k : cases) check_case(k);
}

// Zero input: q = 0, so every compressed logit is 0 and every interior selection block scores
// the same. The top-n must break the ties by the lower block index, as the CPU reference does:
// there the radix select's passes over the index bits decide (with random scores they never do).
// 259 blocks at l_sel 32 take the radix path; bf16 storage takes the tiled prefill's own top-n.
TEST(Cuda, SelectionTiesTakeTheLowerBlocks) {
  REQUIRE_GPU();
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    const Case k{4, 2, 64, 64, 2, 8300, 3, dtype, 32};
    SCOPED_TRACE(name(k));
    const Config c = case_config(k);
    const auto w = random_weights(c, 4242);
    LayerOptions cpu_opt;
    cpu_opt.dtype = dtype;
    Layer cpu(c, w, cpu_opt), gpu(c, w, gpu_options(dtype));
    Tensor x(DType::kF32, {k.B, k.S0 + k.steps, c.dim});
    std::memset(x.raw(), 0, x.nbytes());
    const Outs a = run(gpu, x, k.S0), ref = run(cpu, x, k.S0);
    for (size_t i = 0; i < a.sel.size(); ++i) {
      SCOPED_TRACE(fmt::format("call {}", i));
      ASSERT_EQ(a.sel[i].nbytes(), ref.sel[i].nbytes());
      EXPECT_EQ(0, std::memcmp(a.sel[i].raw(), ref.sel[i].raw(), a.sel[i].nbytes()))
          << "selections differ";
      EXPECT_EQ(0, std::memcmp(a.reads[i].raw(), ref.reads[i].raw(), a.reads[i].nbytes()))
          << "reads differ";
    }
    // The ties went to the lower blocks: the last decode step (t = S0 + steps - 1) of sequence 0,
    // group 0 holds blocks 0 .. n_sel - 3 and its current and previous block.
    const Tensor& last = a.sel.back();
    const int32_t* s0 = last.data<int32_t>();
    const int64_t t = k.S0 + k.steps - 1, cur = t / k.l_sel;
    for (int64_t e = 0; e + 2 < c.n_sel; ++e) EXPECT_EQ(s0[e], e) << "entry " << e;
    EXPECT_EQ(s0[c.n_sel - 2], cur - 1);
    EXPECT_EQ(s0[c.n_sel - 1], cur);
  }
}

// The fused decode kernel with 16-bit storage (it attends with FFMA whatever the storage) and
// selection blocks that are not 64 keys long; small enough for compute-sanitizer.
TEST(Cuda, FusedDecodeSmall) {
  REQUIRE_GPU();
  const ScopedEnv mode("NSA_CUDA_FUSED_DECODE", "on");
  const Case cases[] = {
      {4, 2, 64, 64, 2, 150, 4, DType::kBF16},
      {2, 2, 32, 32, 3, 1, 34, DType::kF16},             // from the first token
      {16, 1, 192, 128, 1, 300, 3, DType::kBF16, 32},    // l_sel 32
      {8, 2, 128, 128, 2, 200, 3, DType::kF16, 96},      // l_sel 96
      {8, 2, 64, 64, 2, 100, 3, DType::kF32, 64, 1100},  // a second prefill, then decode
  };
  for (const Case& k : cases) check_case(k);
}

// The short-context kernel (NSA_CUDA_SHORT_DECODE=on: a step it cannot take is an error, so
// every step here ran through it): every head-group size, 16-bit and fp32 storage, from the
// first token, across emissions, block boundaries and the cache's growth to 2048 tokens (32
// selection blocks, 127 compressed tokens), other l_sel, l and d, a second prefill. Small enough
// for compute-sanitizer.
TEST(Cuda, ShortDecodeMatchesCpu) {
  REQUIRE_GPU();
  const ScopedEnv mode("NSA_CUDA_SHORT_DECODE", "on");
  const Case cases[] = {
      {4, 2, 64, 64, 1, 1000, 40, DType::kF32},                // the seed's shape, cap 1024 -> 2048
      {4, 2, 64, 64, 3, 1, 40, DType::kBF16},                  // from the first token, B = 3
      {2, 2, 32, 32, 3, 60, 12, DType::kF16},                  // h = 1
      {32, 2, 64, 64, 1, 500, 12, DType::kBF16},               // h = 16
      {8, 2, 128, 128, 2, 700, 9, DType::kBF16},               // h = 4, window inside the context
      {4, 2, 64, 64, 1, 300, 8, DType::kBF16, 32},             // l_sel 32: 32 selection blocks
      {8, 2, 64, 64, 2, 200, 3, DType::kF16, 96},              // l_sel 96
      {4, 2, 64, 64, 1, 200, 20, DType::kBF16, 64, 0, 16, 8},  // l 16, d 8
      {8, 2, 64, 64, 2, 100, 3, DType::kF32, 64, 800},         // a second prefill, then decode
  };
  for (const Case& k : cases) check_case(k);
}

// NSA_CUDA_SHORT_DECODE=on where the cache is too long for the short kernel: a clear error.
TEST(Cuda, ShortDecodeOnRefusesLongCaches) {
  REQUIRE_GPU();
  const ScopedEnv mode("NSA_CUDA_SHORT_DECODE", "on");
  const Config c = case_config({4, 2, 64, 64, 1, 0, 0, DType::kBF16});
  Layer gpu(c, random_weights(c, 43), gpu_options(DType::kBF16));
  KVCache cache = gpu.new_cache(1);
  gpu.fill_random(cache, 4096, 1);
  try {
    gpu.decode(cache, random_normal({1, 1, c.dim}, 44));
    FAIL() << "no error for a 4096-token cache";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NSA_CUDA_SHORT_DECODE"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("selection blocks"), std::string::npos) << e.what();
  }
}

// Building a GPU layer of shape k with knob=value set must fail with an error naming the knob.
void expect_knob_rejected(const char* knob, const char* value, const Case& k) {
  const ScopedEnv env(knob, value);
  const Config c = case_config(k);
  try {
    Layer gpu(c, random_weights(c, 3), gpu_options(k.dtype));
    FAIL() << "no error for " << knob << "=" << value;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(knob), std::string::npos) << e.what();
  }
}

TEST(Cuda, FusedDecodeKnobIsChecked) {
  REQUIRE_GPU();
  expect_knob_rejected("NSA_CUDA_FUSED_DECODE", "sometimes", {4, 2, 64, 64, 1, 0, 0, DType::kF32});
  expect_knob_rejected("NSA_CUDA_SHORT_DECODE", "sometimes", {4, 2, 64, 64, 1, 0, 0, DType::kF32});
}

TEST(Cuda, LowPrecisionStorageMatchesCpuRounding) {
  REQUIRE_GPU();
  const Case cases[] = {
      {4, 2, 64, 64, 3, 60, 12, DType::kBF16},
      {16, 1, 192, 128, 1, 2000, 6, DType::kBF16},
      {8, 2, 128, 128, 1, 700, 6, DType::kF16},
      {2, 2, 32, 32, 3, 1, 40, DType::kF16},
      {32, 2, 128, 128, 3, 300, 4, DType::kBF16},   // h = 16, B = 3
      {16, 1, 192, 128, 1, 4990, 8, DType::kBF16},  // contexts up to 4998
      {8, 4, 64, 64, 2, 1500, 6, DType::kF16},      // h = 2, G = 4
      // l_sel 32 and 96: 64-key tiles gather rows from two selected blocks
      {16, 1, 192, 128, 2, 2000, 6, DType::kBF16, 32},
      {8, 2, 128, 128, 1, 1500, 6, DType::kF16, 96},
  };
  for (const Case& k : cases) check_case(k);
}

// Head dims without a tensor-core kernel, and groups of more than 16 heads, take the FFMA kernel
// with 16-bit storage.
TEST(Cuda, LowPrecisionFallbackShapesMatchCpu) {
  REQUIRE_GPU();
  const Case cases[] = {
      {8, 2, 48, 80, 2, 700, 6, DType::kBF16},
      {32, 1, 64, 64, 1, 500, 4, DType::kF16},
  };
  for (const Case& k : cases) check_case(k);
}

// Small tensor-core cases, automatic and fixed split sizes: the compute-sanitizer run of
// scripts/device_run.sh covers the pipelined kernel with these.
TEST(Cuda, TensorCorePathSmall) {
  REQUIRE_GPU();
  for (const char* stages : {"2", "3"}) {
    const ScopedEnv ring("NSA_CUDA_TC_STAGES", stages);
    for (const char* tiles : {"", "2"}) {  // "": the automatic plan
      SCOPED_TRACE(
          fmt::format("NSA_CUDA_TC_STAGES={} NSA_CUDA_TILES_PER_SPLIT='{}'", stages, tiles));
      std::optional<ScopedEnv> split;
      if (*tiles != 0) split.emplace("NSA_CUDA_TILES_PER_SPLIT", tiles);
      const Case cases[] = {
          {16, 1, 192, 128, 2, 300, 4, DType::kBF16},
          {4, 2, 64, 64, 2, 150, 4, DType::kF16},
      };
      for (const Case& k : cases) check_case(k);
    }
  }
}

// Splits of several tiles each (double-buffered tile pipeline, several splits per branch),
// which the automatic plan gives only at large batches.
TEST(Cuda, MultiTileSplitsMatchCpu) {
  REQUIRE_GPU();
  for (const char* tiles : {"2", "5"}) {
    SCOPED_TRACE(fmt::format("NSA_CUDA_TILES_PER_SPLIT={}", tiles));
    const ScopedEnv split("NSA_CUDA_TILES_PER_SPLIT", tiles);
    const Case cases[] = {
        {16, 1, 192, 128, 2, 4990, 6, DType::kBF16},
        {8, 2, 64, 64, 2, 3000, 6, DType::kF32},
    };
    for (const Case& k : cases) check_case(k);
  }
}

// The projections of steps of up to 4 rows run as the backend's own GEMV (cuBLAS beyond, and
// with NSA_CUDA_GEMV=0): 16-byte loads where the model dimension allows (64), element loads
// where it does not (61), B = 1 and 3 (GEMV) and 5 (cuBLAS), against the CPU reference.
TEST(Cuda, FewRowProjectionsMatchCpu) {
  REQUIRE_GPU();
  const ScopedEnv path("NSA_CUDA_SHORT_DECODE", "off");
  for (const char* gemv : {"1", "0"}) {
    SCOPED_TRACE(fmt::format("NSA_CUDA_GEMV={}", gemv));
    const ScopedEnv knob("NSA_CUDA_GEMV", gemv);
    for (const int64_t dim : {64, 61}) {
      const Case cases[] = {
          {4, 2, 64, 64, 1, 300, 3, DType::kF32, 64, 0, 32, 16, 16, dim},
          {4, 2, 64, 64, 3, 300, 3, DType::kBF16, 64, 0, 32, 16, 16, dim},
          {4, 2, 64, 64, 5, 100, 2, DType::kF16, 64, 0, 32, 16, 16, dim},
      };
      for (const Case& k : cases) check_case(k);
    }
  }
}

// The tiled prefill (16-bit storage, h dividing 16): the prompt lengths of issue 5 at the decode
// issue's shapes, every head-group size it takes, then decode steps on the cache it left.
TEST(Cuda, TiledPrefillMatchesCpu) {
  REQUIRE_GPU();
  const Case cases[] = {
      {16, 1, 192, 128, 1, 4096, 3, DType::kBF16},       // h = 16, the paper's head dims
      {16, 1, 192, 128, 1, 1, 3, DType::kF16},           // T = 1 (the step kernels)
      {16, 1, 192, 128, 3, 17, 3, DType::kBF16},         // before the first compressed token
      {32, 2, 128, 128, 3, 1013, 3, DType::kF16},        // h = 16, B = 3, G = 2
      {2, 2, 32, 32, 3, 177, 3, DType::kF16},            // h = 1: 64 queries per tile
      {4, 2, 64, 64, 1, 1013, 3, DType::kBF16},          // h = 2
      {8, 2, 128, 128, 2, 177, 3, DType::kF16},          // h = 4
      {16, 2, 64, 64, 1, 4096, 2, DType::kF16},          // h = 8, 64 blocks to choose from
      {16, 1, 192, 128, 1, 1013, 2, DType::kBF16, 32},   // l_sel 32
      {8, 2, 64, 64, 2, 700, 2, DType::kBF16, 64, 333},  // a second prefill onto a cache
      // Other overlap patterns of compressed tokens and selection blocks: l 48 (three strides
      // per token), d 8 (eight tokens per block), l = l_sel.
      {16, 1, 192, 128, 1, 1013, 2, DType::kBF16, 64, 0, 48, 16},
      {16, 1, 192, 128, 1, 2100, 2, DType::kF16, 64, 0, 32, 8},
      {8, 2, 64, 64, 1, 777, 2, DType::kBF16, 32, 0, 32, 16},
  };
  for (const Case& k : cases) check_case(k);
}

// Blocks of 12 warps (NSA_CUDA_PREFILL_WARPS=12: three warpgroups, Q as a shared-memory wgmma
// operand) and of 8 warps (two warpgroups), where the wgmma path runs its default 4-warp
// blocks (Hopper, dv 128); elsewhere the 8-warp kernels run and these cases check those again.
// h = 16 and 8 (12 / 24 or 8 / 16 queries per tile), T across tile and launch boundaries, B > 1,
// a second prefill onto a cache, then decode steps.
TEST(Cuda, TiledPrefillOtherWarpCountsMatchCpu) {
  REQUIRE_GPU();
  for (const char* w : {"12", "8"}) {
    SCOPED_TRACE(std::string("NSA_CUDA_PREFILL_WARPS=") + w);
    const ScopedEnv warps("NSA_CUDA_PREFILL_WARPS", w);
    const Case cases[] = {
        {16, 1, 192, 128, 1, 4096, 2, DType::kBF16},
        {16, 1, 192, 128, 3, 17, 2, DType::kF16},
        {32, 2, 128, 128, 2, 1013, 2, DType::kF16},
        {16, 2, 128, 128, 1, 2100, 2, DType::kBF16},      // h = 8
        {16, 1, 192, 128, 1, 1013, 2, DType::kBF16, 32},  // l_sel 32
        {16, 1, 192, 128, 2, 700, 2, DType::kBF16, 64, 333},
    };
    for (const Case& k : cases) check_case(k);
  }
}

TEST(Cuda, PrefillWarpsKnobIsChecked) {
  REQUIRE_GPU();
  expect_knob_rejected("NSA_CUDA_PREFILL_WARPS", "16", {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_KERNEL_TIMES", "3", {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_SEL_FORCED", "both", {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_PREFILL_PREPARE", "rows",
                       {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_PREFILL_WORKSPACE_MB", "0",
                       {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_PREFILL_WORKSPACE_MB", "64MB",
                       {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_PREFILL_CHUNK", "12abc", {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_OVERLAP_LAUNCHES", "yes",
                       {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
  expect_knob_rejected("NSA_CUDA_HOST_TIMES", "on", {16, 1, 192, 128, 1, 0, 0, DType::kBF16});
}

// Launches of a few rows each (NSA_CUDA_PREFILL_CHUNK): tiles cut at launch boundaries, several
// launches per sequence, B > 1; and the row-step prefill (NSA_CUDA_PREFILL=rows) it replaced.
// Small enough for compute-sanitizer (scripts/device_run.sh).
TEST(Cuda, TiledPrefillSmall) {
  REQUIRE_GPU();
  {
    const ScopedEnv chunk("NSA_CUDA_PREFILL_CHUNK", "37");
    const Case cases[] = {
        {16, 1, 192, 128, 2, 300, 2, DType::kBF16},
        {4, 2, 64, 64, 2, 150, 2, DType::kF16},
    };
    for (const Case& k : cases) check_case(k);
  }
  check_case({2, 2, 32, 32, 2, 150, 2, DType::kF16});  // h = 1: 128 queries per tile
  for (const char* w : {"12", "8"}) {  // 12- and 8-warp blocks (the wgmma path's default: 4)
    const ScopedEnv warps("NSA_CUDA_PREFILL_WARPS", w);
    const ScopedEnv chunk("NSA_CUDA_PREFILL_CHUNK", "37");
    check_case({16, 1, 192, 128, 2, 300, 2, DType::kBF16});
  }
  {
    // The selected pass gathering the forced blocks too (NSA_CUDA_SEL_FORCED=gather; the default
    // attends to them apart, by tiles of queries).
    const ScopedEnv gather("NSA_CUDA_SEL_FORCED", "gather");
    const ScopedEnv chunk("NSA_CUDA_PREFILL_CHUNK", "37");
    check_case({16, 1, 192, 128, 2, 300, 2, DType::kBF16});
  }
  {
    // Launches sized by a small workspace budget (NSA_CUDA_PREFILL_WORKSPACE_MB=1: a few rows
    // each at these shapes), as the 1 GiB default sizes them at long prompts.
    const ScopedEnv budget("NSA_CUDA_PREFILL_WORKSPACE_MB", "1");
    check_case({16, 1, 192, 128, 2, 300, 2, DType::kBF16});
  }
  {
    // One launch at a time (NSA_CUDA_OVERLAP_LAUNCHES=0; by default the host copies a launch's
    // output while the next launch runs).
    const ScopedEnv serial("NSA_CUDA_OVERLAP_LAUNCHES", "0");
    const ScopedEnv chunk("NSA_CUDA_PREFILL_CHUNK", "37");
    check_case({16, 1, 192, 128, 2, 300, 2, DType::kBF16});
  }
  {
    // Rows prepared by the decode step's kernel (NSA_CUDA_PREFILL_PREPARE=fused; the default
    // streams RoPE and the append, and computes the gates by a GEMM and a gate kernel).
    const ScopedEnv prepare("NSA_CUDA_PREFILL_PREPARE", "fused");
    const ScopedEnv chunk("NSA_CUDA_PREFILL_CHUNK", "37");
    check_case({16, 1, 192, 128, 2, 300, 2, DType::kBF16});
  }
  {
    // The kernels with phase clocks (NSA_CUDA_KERNEL_TIMES=2) compute the same results.
    const ScopedEnv clocks("NSA_CUDA_KERNEL_TIMES", "2");
    check_case({16, 1, 192, 128, 1, 300, 2, DType::kBF16});
  }
  const ScopedEnv rows_path("NSA_CUDA_PREFILL", "rows");
  check_case({16, 1, 192, 128, 1, 300, 2, DType::kBF16});
}

TEST(Cuda, OneHotGatesSkipBranchesExactly) {
  REQUIRE_GPU();
  Config c = case_config({8, 2, 64, 64, 2, 0, 0, DType::kF32});
  // fp32: the row-step prefill; bf16: the tiled prefill. The decode step through every path.
  for (int combo = 0; combo < 6; ++combo) {
    const DType dtype = combo % 2 == 0 ? DType::kF32 : DType::kBF16;
    const DecodePath& path = kDecodePaths[combo / 2];
    const ScopedPath mode(path);
    const double tol = dtype == DType::kF32 ? 1e-4 : 2e-2;
    for (int branch = 0; branch < 3; ++branch) {
      SCOPED_TRACE(fmt::format("{} branch {} {}", to_string(dtype), branch, path.name));
      auto w = random_weights(c, 5);
      force_gate(w, branch);
      LayerOptions cpu_opt;
      cpu_opt.dtype = dtype;
      Layer gpu(c, w, gpu_options(dtype)), cpu(c, w, cpu_opt);
      const Tensor x = random_normal({2, 300, c.dim}, 9);
      KVCache gc = gpu.new_cache(2), cc = cpu.new_cache(2);
      // No inspection: zero-gated branches are skipped on the device.
      EXPECT_LT(test::rel_l2(gpu.prefill(gc, x), cpu.prefill(cc, x)), tol);
      const Tensor x1 = random_normal({2, 1, c.dim}, 10);
      EXPECT_LT(test::rel_l2(gpu.decode(gc, x1), cpu.decode(cc, x1)), tol);
    }
  }
}

void graph_decode_case() {
  const Config c = case_config({8, 2, 64, 64, 3, 0, 0, DType::kF32});
  const auto w = random_weights(c, 21);
  Layer gpu(c, w, gpu_options()), cpu(c, w);
  const Tensor x = random_normal({3, 200, c.dim}, 22);
  KVCache gc = gpu.new_cache(3), cc = cpu.new_cache(3);
  gpu.prefill(gc, x);
  cpu.prefill(cc, x);
  std::vector<Tensor> steps;
  for (int i = 0; i < 20; ++i) steps.push_back(random_normal({3, 1, c.dim}, 100 + uint64_t(i)));
  const auto ms = gpu.time_decode(gc, steps, 5);
  EXPECT_EQ(ms.size(), 15u);
  for (double v : ms) EXPECT_GT(v, 0.0);
  for (const Tensor& s : steps) cpu.decode(cc, s);
  EXPECT_EQ(gc.length(), cc.length());
  const Tensor last = random_normal({3, 1, c.dim}, 999);
  Inspection gi, ci;
  gi.want = ci.want = InspectRequest::all();
  EXPECT_LT(test::rel_l2(gpu.decode(gc, last, &gi), cpu.decode(cc, last, &ci)), 1e-4);
  EXPECT_EQ(0, std::memcmp(gi.reads.raw(), ci.reads.raw(), gi.reads.nbytes()));
}

// The graph-replayed timing path leaves the cache exactly where plain decode steps would: through
// every decode path.
TEST(Cuda, GraphDecodeContinuesLikePlainDecode) {
  REQUIRE_GPU();
  for (const DecodePath& path : kDecodePaths) {
    SCOPED_TRACE(path.name);
    const ScopedPath mode(path);
    graph_decode_case();
  }
}

TEST(Cuda, DecodeIsDeterministic) {
  REQUIRE_GPU();
  const Config c = case_config({16, 1, 192, 128, 2, 0, 0, DType::kBF16});
  Layer gpu(c, random_weights(c, 31), gpu_options(DType::kBF16));
  const Tensor x = random_normal({2, 3000, c.dim}, 32);
  Tensor y[2];
  for (auto& yy : y) {
    KVCache cache = gpu.new_cache(2);
    gpu.prefill(cache, x);
    yy = gpu.decode(cache, random_normal({2, 1, c.dim}, 33));
  }
  EXPECT_EQ(0, std::memcmp(y[0].raw(), y[1].raw(), y[0].nbytes()));
}

// A context whose block scores do not fit the selection kernel's shared memory is refused
// before anything is allocated, with the limit named.
TEST(Cuda, ContextBeyondTheSelectionLimitIsAClearError) {
  REQUIRE_GPU();
  const Config c = case_config({4, 2, 64, 64, 1, 0, 0, DType::kBF16});
  Layer gpu(c, random_weights(c, 41), gpu_options(DType::kBF16));
  KVCache cache = gpu.new_cache(1);
  try {
    gpu.fill_random(cache, int64_t{4} << 20, 1);
    FAIL() << "no error for a 4M-token context";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the CUDA backend's limit"), std::string::npos)
        << e.what();
  }
}

TEST(Cuda, RunCliOnCuda) {
  REQUIRE_GPU();
  const std::string dir = testing::TempDir();
  const std::string cli = NSA_CLI;
  std::ofstream(dir + "/cuda_cfg.json")
      << R"({"dim": 32, "heads": 4, "groups": 2, "dk": 8, "dv": 8})";
  ASSERT_EQ(0, std::system((cli + " init --config " + dir + "/cuda_cfg.json --weights " + dir +
                            "/cw.st --input " + dir + "/cx.st --B 2 --T 90")
                               .c_str()));
  ASSERT_EQ(0, std::system((cli + " run --device cuda --dtype bf16 --prefill 40 --config " + dir +
                            "/cuda_cfg.json --weights " + dir + "/cw.st --input " + dir +
                            "/cx.st --out " + dir + "/cy.st")
                               .c_str()));
}

}  // namespace
}  // namespace nsa
