// `nsa bench decode` (SPEC.md section 6, the seed's experiment) and `nsa bench prefill`.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>

#include "commands.h"
#include "core/blocks.h"
#include "nsa/backend.h"
#include "nsa/device.h"
#include "nsa/init.h"
#include "nsa/layer.h"

namespace nsa_cli {

namespace {

using Clock = std::chrono::steady_clock;

void add_shape_flags(CLI::App* c, ShapeArgs& a, bool decode) {
  c->add_option("--B", a.B, "Batch (sequences)")->check(CLI::PositiveNumber)->capture_default_str();
  c->add_option("--dim", a.dim, "Model width")->capture_default_str();
  c->add_option("--heads", a.heads, "Query heads H")->capture_default_str();
  c->add_option("--groups", a.groups, "KV groups G")->capture_default_str();
  c->add_option("--dk", a.dk, "q/k head dim")->capture_default_str();
  c->add_option("--dv", a.dv, "v head dim")->capture_default_str();
  c->add_option("--l", a.l, "Compression block length")->capture_default_str();
  c->add_option("--d", a.d, "Compression stride")->capture_default_str();
  c->add_option("--l_sel", a.l_sel, "Selection block length")->capture_default_str();
  c->add_option("--n_sel", a.n_sel, "Selected blocks per query")->capture_default_str();
  c->add_option("--w", a.w, "Sliding window")->capture_default_str();
  c->add_option("--S_list", a.S_list, "Comma-separated context lengths")->capture_default_str();
  c->add_option("--iters", a.iters, decode ? "Timed decode steps" : "Timed prefills")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_option("--warmup", a.warmup,
                decode ? "Untimed decode steps before the timed ones" : "Untimed prefills")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c->add_option("--device", a.device, "auto (GPU when present) | cpu | cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  c->add_option("--dtype", a.dtype, "Storage dtype fp32 | bf16 | fp16")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
      ->capture_default_str();
  c->add_option("--seed", a.seed, "Random seed for weights and inputs")->capture_default_str();
  c->add_option("--threads", a.threads, "CPU threads (0 = all)")->check(CLI::NonNegativeNumber);
  if (decode) {
    c->add_option("--fill", a.fill,
                  "How each fresh cache gets its S tokens: prefill (SPEC section 6) or random "
                  "(random keys/values, for long contexts where prefill outputs are not measured)")
        ->check(CLI::IsMember({"prefill", "random"}))
        ->capture_default_str();
  }
  c->add_option("--csv", a.csv, "Write the results as CSV");
  c->add_option("--json", a.json, "Write the results and run metadata as JSON");
}

nsa::Config make_config(const ShapeArgs& a) {
  nsa::Config c;
  c.dim = a.dim;
  c.heads = a.heads;
  c.groups = a.groups;
  c.dk = a.dk;
  c.dv = a.dv;
  c.l = a.l;
  c.d = a.d;
  c.l_sel = a.l_sel;
  c.n_sel = a.n_sel;
  c.w = a.w;
  c.gate_hidden = std::max<int64_t>(1, a.dk / 2);
  c.validate();
  return c;
}

nsa::LayerOptions make_options(const ShapeArgs& a) {
  nsa::LayerOptions o;
  o.device = a.device == "auto" ? (nsa::cuda_available() ? nsa::Device::kCuda : nsa::Device::kCpu)
                                : nsa::parse_device(a.device);
  o.dtype = nsa::parse_storage_dtype(a.dtype);
  o.threads = a.threads;
  return o;
}

double mean(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class Progress {
 public:
  explicit Progress(int64_t total) : total_(total), on_(isatty(STDERR_FILENO) != 0) {}
  void step(const std::string& what) {
    ++done_;
    if (on_) fmt::print(stderr, "\r[{}/{}] {:<40}", done_, total_, what);
  }
  ~Progress() {
    if (on_) fmt::print(stderr, "\r{:<60}\r", "");
  }

 private:
  int64_t total_, done_ = 0;
  bool on_;
};

std::string metadata_device(const nsa::LayerOptions& o) {
  if (o.device == nsa::Device::kCpu) return "cpu";
  const auto d = nsa::cuda_devices();
  return d.empty() ? "cuda" : "cuda: " + d.front();
}

// --- decode -------------------------------------------------------------------------------------

struct DecodeRow {
  int64_t S = 0;
  double ms_attn = 0;  // CUDA: median ms of the attention kernels alone (no projections)
  double attn_bytes = 0;
  double ms[4] = {};      // total, cmp, sel, win: mean per step
  double median[4] = {};  // the same, median per step
  int64_t reads_actual = 0, reads_expected = 0, reads_actual_decode = 0, reads_expected_decode = 0;
};

// How each fresh cache gets its S tokens: a prefill of x [B, S, dim], or (x empty, --fill random)
// S positions of random keys/values.
struct CacheFill {
  int64_t S = 0;
  nsa::Tensor x;
};

nsa::KVCache fresh_cache(nsa::Layer& layer, const ShapeArgs& a, const CacheFill& fill) {
  nsa::KVCache cache = layer.new_cache(a.B);
  if (a.fill == "random") {
    layer.fill_random(cache, fill.S, a.seed + static_cast<uint64_t>(fill.S));
  } else {
    layer.prefill(cache, fill.x);
  }
  return cache;
}

// Per-step milliseconds of the timed decode steps on a fresh cache (the backend's own timing:
// wall clock on the CPU, CUDA events around one graph replay per step on the GPU).
std::vector<double> time_decode(nsa::Layer& layer, const ShapeArgs& a, const CacheFill& fill,
                                const std::vector<nsa::Tensor>& steps,
                                bool attention_only = false) {
  nsa::KVCache cache = fresh_cache(layer, a, fill);
  return layer.time_decode(cache, steps, a.warmup, attention_only);
}

// Reads at the timed steps, measured from the selection on a fresh cache with the same inputs.
void measure_reads(nsa::Layer& layer, const ShapeArgs& a, const nsa::Config& c,
                   const CacheFill& fill, const std::vector<nsa::Tensor>& steps, int64_t warmup,
                   DecodeRow& row) {
  nsa::KVCache cache = fresh_cache(layer, a, fill);
  nsa::Inspection ins;
  ins.want.reads = true;
  const int64_t B = a.B, G = c.groups;
  for (size_t i = 0; i < steps.size(); ++i) {
    const int64_t t = cache.length();
    layer.decode(cache, steps[i], &ins);
    if (static_cast<int64_t>(i) < warmup) continue;
    int64_t sum = 0;
    for (int64_t k = 0; k < B * G; ++k) {
      const int32_t* r = ins.reads.data<int32_t>() + k * 3;
      sum += r[0] + r[1] + r[2];
    }
    const double per = static_cast<double>(sum) / static_cast<double>(B * G);
    row.reads_actual = std::llround(per);
    row.reads_expected = nsa::core::expected_reads(t, c);
    row.reads_actual_decode += sum;
    row.reads_expected_decode += nsa::core::expected_reads(t, c) * B * G;
  }
  // The _decode columns are per (sequence, group) sums, like the per-step columns.
  row.reads_actual_decode =
      std::llround(static_cast<double>(row.reads_actual_decode) / static_cast<double>(B * G));
  row.reads_expected_decode /= B * G;
}

void write_decode_csv(const std::string& path, const std::vector<DecodeRow>& rows) {
  std::ofstream out(path);
  NSA_CHECK(out.good(), "cannot open '{}' for writing", path);
  out << "S,ms_total,ms_cmp,ms_sel,ms_win,reads_actual,reads_expected,reads_actual_decode,"
         "reads_expected_decode,ms_total_median,ms_cmp_median,ms_sel_median,ms_win_median,"
         "ms_attn_median,attn_bytes\n";
  for (const DecodeRow& r : rows) {
    out << fmt::format(
        "{},{:.3f},{:.3f},{:.3f},{:.3f},{},{},{},{},{:.4f},{:.4f},{:.4f},{:.4f},{:.4f},{:.0f}\n",
        r.S, r.ms[0], r.ms[1], r.ms[2], r.ms[3], r.reads_actual, r.reads_expected,
        r.reads_actual_decode, r.reads_expected_decode, r.median[0], r.median[1], r.median[2],
        r.median[3], r.ms_attn, r.attn_bytes);
  }
  NSA_CHECK(out.good(), "failed writing '{}'", path);
}

nlohmann::json run_metadata(const ShapeArgs& a, const nsa::Config& c, const nsa::LayerOptions& o) {
  return {{"config", nlohmann::json::parse(c.to_json())},
          {"B", a.B},
          {"iters", a.iters},
          {"warmup", a.warmup},
          {"device", metadata_device(o)},
          {"dtype", a.dtype},
          {"seed", a.seed},
          {"build", nsa::build_info()}};
}

int bench_decode(const ShapeArgs& a) {
  const nsa::Config c = make_config(a);
  const nsa::LayerOptions opt = make_options(a);
  const std::vector<int64_t> S_list = parse_int_list("--S_list", a.S_list);
  auto weights = nsa::random_weights(c, a.seed);
  std::vector<nsa::Layer> layers;
  layers.emplace_back(c, weights, opt);
  for (int branch = 0; branch < 3; ++branch) {
    auto forced = weights;
    nsa::force_gate(forced, branch);
    layers.emplace_back(c, forced, opt);
  }
  const int64_t n_steps = a.warmup + a.iters;
  NSA_CHECK(a.fill == "prefill" || a.fill == "random",
            "--fill {} is invalid; allowed: prefill, random", a.fill);
  Progress progress(static_cast<int64_t>(S_list.size()) * 5);
  std::vector<DecodeRow> rows;
  for (int64_t S : S_list) {
    DecodeRow row;
    row.S = S;
    CacheFill fill{S, {}};
    if (a.fill == "prefill") {  // --fill random draws no prefill input at all
      fill.x = nsa::random_normal({a.B, S, c.dim}, a.seed * 1000003 + static_cast<uint64_t>(S));
    }
    std::vector<nsa::Tensor> steps;
    for (int64_t i = 0; i < n_steps; ++i) {
      steps.push_back(
          nsa::random_normal({a.B, 1, c.dim}, a.seed * 7919 + static_cast<uint64_t>(S * 4096 + i)));
    }
    const char* names[] = {"total", "cmp", "sel", "win"};
    for (int k = 0; k < 4; ++k) {
      progress.step(fmt::format("S={} {}", S, names[k]));
      const std::vector<double> ms = time_decode(layers[static_cast<size_t>(k)], a, fill, steps);
      row.ms[k] = mean(ms);
      row.median[k] = median(ms);
    }
    if (opt.device == nsa::Device::kCuda) {
      row.ms_attn = median(time_decode(layers[0], a, fill, steps, true));
    }
    progress.step(fmt::format("S={} reads", S));
    measure_reads(layers[0], a, c, fill, steps, a.warmup, row);
    rows.push_back(row);
  }

  fmt::print(
      "nsa bench decode: device {}, dtype {}, B {}, dim {}, H {}, G {}, dk {}, dv {}, l {}, d {}, "
      "l_sel {}, n_sel {}, w {}, iters {}, warmup {}\n",
      metadata_device(opt), a.dtype, a.B, c.dim, c.heads, c.groups, c.dk, c.dv, c.l, c.d, c.l_sel,
      c.n_sel, c.w, a.iters, a.warmup);
  const double bw = opt.device == nsa::Device::kCuda ? nsa::cuda_copy_bandwidth_gbs() : 0.0;
  const double esize = static_cast<double>(nsa::dtype_size(opt.dtype));
  for (DecodeRow& r : rows) {
    // Bytes the attention must read per step: tokens read x B x G x (dk + dv) x element size.
    r.attn_bytes = static_cast<double>(r.reads_actual * a.B * c.groups * (c.dk + c.dv)) * esize;
  }
  fmt::print("{:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>15} {:>10} {:>9} {:>8}\n", "S",
             "ms_total", "ms_cmp", "ms_sel", "ms_win", "p50_total", "reads act/exp", "p50_attn",
             "attn_MB", "%bw");
  for (const DecodeRow& r : rows) {
    // The attention alone and its share of the copy bandwidth are measured on the GPU only;
    // elsewhere the table shows "-" rather than a zero that reads like a measurement.
    const bool attn = r.ms_attn > 0 && bw > 0;
    const std::string ms_attn = attn ? fmt::format("{:.4f}", r.ms_attn) : "-";
    const std::string pct =
        attn ? fmt::format("{:.1f}", 100.0 * r.attn_bytes / (r.ms_attn * 1e-3) / (bw * 1e9)) : "-";
    fmt::print(
        "{:>7} {:>10.4f} {:>10.4f} {:>10.4f} {:>10.4f} {:>10.4f} {:>15} {:>10} {:>9.2f} {:>8}\n",
        r.S, r.ms[0], r.ms[1], r.ms[2], r.ms[3], r.median[0],
        fmt::format("{}/{}", r.reads_actual, r.reads_expected), ms_attn, r.attn_bytes / 1e6, pct);
  }
  if (bw > 0) fmt::print("device copy bandwidth (read + write): {:.0f} GB/s\n", bw);
  if (!a.csv.empty()) write_decode_csv(a.csv, rows);
  if (!a.json.empty()) {
    nlohmann::json j = run_metadata(a, c, opt);
    j["bench"] = "decode";
    j["copy_bandwidth_gbs"] = bw;
    j["fill"] = a.fill;
    for (const DecodeRow& r : rows) {
      j["rows"].push_back({{"S", r.S},
                           {"ms_total", r.ms[0]},
                           {"ms_cmp", r.ms[1]},
                           {"ms_sel", r.ms[2]},
                           {"ms_win", r.ms[3]},
                           {"ms_total_median", r.median[0]},
                           {"ms_cmp_median", r.median[1]},
                           {"ms_sel_median", r.median[2]},
                           {"ms_win_median", r.median[3]},
                           {"reads_actual", r.reads_actual},
                           {"reads_expected", r.reads_expected},
                           {"reads_actual_decode", r.reads_actual_decode},
                           {"reads_expected_decode", r.reads_expected_decode},
                           {"ms_attn_median", r.ms_attn},
                           {"attn_bytes", r.attn_bytes}});
    }
    std::ofstream(a.json) << j.dump(2) << "\n";
  }
  return 0;
}

// --- prefill ------------------------------------------------------------------------------------

int bench_prefill(const ShapeArgs& a) {
  const nsa::Config c = make_config(a);
  const nsa::LayerOptions opt = make_options(a);
  const std::vector<int64_t> S_list = parse_int_list("--S_list", a.S_list);
  nsa::Layer layer(c, nsa::random_weights(c, a.seed), opt);
  Progress progress(static_cast<int64_t>(S_list.size()));
  struct Row {
    int64_t S;
    double ms_mean, ms_median;
    double gflop;    // attention work NSA does (reads counted per SPEC section 5)
    double ms_attn;  // median device time of the attention alone (< 0: not measured)
  };
  std::vector<Row> rows;
  for (int64_t S : S_list) {
    progress.step(fmt::format("S={}", S));
    const double gflop = 2.0 * static_cast<double>(a.B * c.heads) *
                         static_cast<double>(nsa::core::prefill_reads(S, c)) *
                         static_cast<double>(c.dk + c.dv) * 1e-9;
    const nsa::Tensor x =
        nsa::random_normal({a.B, S, c.dim}, a.seed * 1000003 + static_cast<uint64_t>(S));
    std::vector<double> ms, ms_attn;
    for (int64_t i = 0; i < a.warmup + a.iters; ++i) {
      nsa::KVCache cache = layer.new_cache(a.B);
      const auto t0 = Clock::now();
      // The output is kept past the clock: freeing it (671 MB at 64k tokens, pages touched on
      // several cores) is the caller's cost, not the prefill's (docs/perf-cuda-prefill.md).
      const nsa::Tensor y = layer.prefill(cache, x);
      const double dt = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (i >= a.warmup) {
        ms.push_back(dt);
        ms_attn.push_back(layer.backend().attention_ms());
      }
    }
    rows.push_back({S, mean(ms), median(ms), gflop, median(ms_attn)});
  }
  fmt::print(
      "nsa bench prefill: device {}, dtype {}, B {}, dim {}, H {}, G {}, dk {}, dv {}, iters {}, "
      "warmup {}\n",
      metadata_device(opt), a.dtype, a.B, c.dim, c.heads, c.groups, c.dk, c.dv, a.iters, a.warmup);
  // TFLOP/s of the attention work, over the whole layer's time (projections and host copies
  // included) and over the attention's own device time (CUDA; "-" where not measured).
  auto tflops = [](const Row& r) { return r.gflop / r.ms_median; };
  auto attn = [](double v, int prec) {
    return v >= 0 ? fmt::format("{:.{}f}", v, prec) : std::string("-");
  };
  auto attn_tflops = [](const Row& r) { return r.ms_attn > 0 ? r.gflop / r.ms_attn : -1.0; };
  fmt::print("{:>7} {:>12} {:>12} {:>14} {:>11} {:>9} {:>10} {:>12}\n", "S", "ms_prefill", "p50_ms",
             "tokens_per_s", "attn_GFLOP", "TFLOP/s", "attn_ms", "attn_TFLOP/s");
  for (const Row& r : rows) {
    fmt::print("{:>7} {:>12.3f} {:>12.3f} {:>14.0f} {:>11.1f} {:>9.2f} {:>10} {:>12}\n", r.S,
               r.ms_mean, r.ms_median, static_cast<double>(a.B * r.S) / (r.ms_median * 1e-3),
               r.gflop, tflops(r), attn(r.ms_attn, 3), attn(attn_tflops(r), 1));
  }
  // The floors of the selected branch's gather (docs/perf-cuda-prefill.md): device memory, and
  // L2 for blocks that neighbouring queries have just read.
  const bool gpu = opt.device == nsa::Device::kCuda;
  const double bw_hbm = gpu ? nsa::cuda_read_bandwidth_gbs(size_t{1} << 30, 1) : 0.0;
  const double bw_l2 = gpu ? nsa::cuda_read_bandwidth_gbs(size_t{16} << 20, 128) : 0.0;
  if (gpu) {
    fmt::print(
        "device read bandwidth: {:.0f} GB/s (1 GiB, device memory), {:.0f} GB/s (16 MiB read "
        "128 times, L2)\n",
        bw_hbm, bw_l2);
  }
  if (!a.csv.empty()) {
    std::ofstream out(a.csv);
    NSA_CHECK(out.good(), "cannot open '{}' for writing", a.csv);
    out << "S,B,ms_prefill,ms_prefill_median,tokens_per_s,attn_gflop,attn_tflops,ms_attn_median,"
           "attn_tflops_device\n";
    for (const Row& r : rows) {
      // The attention's own time stays empty where the backend does not measure it.
      const std::string ms_attn = r.ms_attn >= 0 ? fmt::format("{:.4f}", r.ms_attn) : "";
      const std::string t_attn = r.ms_attn > 0 ? fmt::format("{:.6g}", attn_tflops(r)) : "";
      out << fmt::format("{},{},{:.3f},{:.3f},{:.0f},{:.6g},{:.6g},{},{}\n", r.S, a.B, r.ms_mean,
                         r.ms_median, static_cast<double>(a.B * r.S) / (r.ms_median * 1e-3),
                         r.gflop, tflops(r), ms_attn, t_attn);
    }
  }
  if (!a.json.empty()) {
    nlohmann::json j = run_metadata(a, c, opt);
    j["bench"] = "prefill";
    j["read_bandwidth_gbs"] = bw_hbm;
    j["l2_read_bandwidth_gbs"] = bw_l2;
    for (const Row& r : rows) {
      j["rows"].push_back({{"S", r.S},
                           {"ms_prefill", r.ms_mean},
                           {"ms_prefill_median", r.ms_median},
                           {"attn_gflop", r.gflop},
                           {"attn_tflops", tflops(r)},
                           {"ms_attn_median",
                            r.ms_attn >= 0 ? nlohmann::json(r.ms_attn) : nlohmann::json(nullptr)}});
    }
    std::ofstream(a.json) << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    NSA_CHECK(used == item.size() && !item.empty() && v > 0,
              "{} '{}' is invalid: '{}' is not a positive integer", flag, text, item);
    out.push_back(v);
    pos = comma + 1;
  }
  return out;
}

void add_bench_commands(CLI::App& app, BenchCommands& cmds) {
  CLI::App* bench =
      app.add_subcommand("bench", "Benchmarks (decode: the seed's experiment; prefill)");
  bench->require_subcommand(1);
  cmds.decode = bench->add_subcommand(
      "decode", "Per-step decode latency per branch and reads (SPEC section 6)");
  add_shape_flags(cmds.decode, cmds.decode_args, true);
  cmds.prefill = bench->add_subcommand("prefill", "Prefill latency and tokens/s over S_list");
  cmds.prefill_args.iters = 3;
  cmds.prefill_args.warmup = 1;
  add_shape_flags(cmds.prefill, cmds.prefill_args, false);
}

int run_bench_commands(const BenchCommands& cmds) {
  if (cmds.decode->parsed()) return bench_decode(cmds.decode_args);
  if (cmds.prefill->parsed()) return bench_prefill(cmds.prefill_args);
  return -1;
}

}  // namespace nsa_cli
