// The `nsa` command line: run, init, info, bench and summarize.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>

#include "commands.h"
#include "nsa/device.h"
#include "nsa/init.h"
#include "nsa/layer.h"
#include "nsa/safetensors.h"

namespace {

struct RunArgs {
  std::string config, weights, input, out, device = "cpu", dtype = "fp32";
  int64_t prefill = 0;  // 0 = all tokens
  int threads = 0;
};

// Concatenates per-call tensors of shape [B, t_i, ...] along dim 1.
void copy_rows(const nsa::Tensor& src, nsa::Tensor& dst, int64_t t0) {
  if (src.empty()) return;
  const int64_t B = src.dim(0), T = src.dim(1), Tall = dst.dim(1);
  const size_t row = src.nbytes() / static_cast<size_t>(B * T);
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(dst.raw() + static_cast<size_t>(b * Tall + t0) * row,
                src.raw() + static_cast<size_t>(b * T) * row, row * static_cast<size_t>(T));
  }
}

nsa::Tensor with_t(const nsa::Tensor& like, int64_t T) {
  nsa::Shape s = like.shape();
  s[1] = T;
  return nsa::Tensor(like.dtype(), s);
}

int cmd_run(const RunArgs& a) {
  nsa::LayerOptions opt;
  opt.device = nsa::parse_device(a.device);
  opt.dtype = nsa::parse_storage_dtype(a.dtype);
  opt.threads = a.threads;
  nsa::Layer layer = nsa::Layer::from_files(a.config, a.weights, opt);
  auto inputs = nsa::load_safetensors(a.input);
  auto it = inputs.find("x");
  NSA_CHECK(it != inputs.end(), "{}: no tensor named 'x' (found {} tensors)", a.input,
            inputs.size());
  const nsa::Tensor& x = it->second;
  NSA_CHECK(x.dtype() == nsa::DType::kF32, "{}: tensor 'x' has dtype {}; expected F32", a.input,
            nsa::to_string(x.dtype()));
  NSA_CHECK(x.shape().size() == 3, "{}: tensor 'x' has shape {}; expected [B, T, dim]", a.input,
            nsa::to_string(x.shape()));
  const int64_t B = x.dim(0), T = x.dim(1), dim = x.dim(2);
  NSA_CHECK(B >= 1 && T >= 1, "{}: tensor 'x' has shape {}; B and T must be >= 1", a.input,
            nsa::to_string(x.shape()));
  const int64_t n_prefill = a.prefill == 0 ? T : a.prefill;
  NSA_CHECK(n_prefill >= 1 && n_prefill <= T, "--prefill {} is invalid; allowed: 1 .. T = {}",
            a.prefill, T);

  auto slice = [&](int64_t t0, int64_t n) {
    nsa::Tensor s(nsa::DType::kF32, {B, n, dim});
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(s.data<float>() + b * n * dim, x.data<float>() + (b * T + t0) * dim,
                  static_cast<size_t>(n * dim) * sizeof(float));
    }
    return s;
  };

  nsa::KVCache cache = layer.new_cache(B);
  nsa::Inspection ins;
  ins.want = nsa::InspectRequest::all();
  std::map<std::string, nsa::Tensor> out;
  auto collect = [&](const nsa::Tensor& y, int64_t t0) {
    const std::pair<const char*, const nsa::Tensor*> parts[] = {{"y", &y},
                                                                {"gates", &ins.gates},
                                                                {"sel_blocks", &ins.sel_blocks},
                                                                {"o_cmp", &ins.o_cmp},
                                                                {"o_sel", &ins.o_sel},
                                                                {"o_win", &ins.o_win},
                                                                {"reads", &ins.reads}};
    for (auto [name, t] : parts) {
      if (!out.contains(name)) out.emplace(name, with_t(*t, T));
      copy_rows(*t, out.at(name), t0);
    }
  };
  collect(layer.prefill(cache, slice(0, n_prefill), &ins), 0);
  for (int64_t t = n_prefill; t < T; ++t) collect(layer.decode(cache, slice(t, 1), &ins), t);
  nsa::save_safetensors(a.out, out);
  return 0;
}

int cmd_init(const std::string& config_path, const std::string& weights, const std::string& input,
             int64_t B, int64_t T, uint64_t seed) {
  const nsa::Config c = config_path.empty() ? nsa::Config{} : nsa::Config::from_file(config_path);
  if (!weights.empty()) nsa::save_safetensors(weights, nsa::random_weights(c, seed));
  if (!input.empty()) {
    NSA_CHECK(B >= 1 && T >= 1, "--B and --T must be >= 1, got {} and {}", B, T);
    nsa::save_safetensors(input, {{"x", nsa::random_normal({B, T, c.dim}, seed + 1)}});
  }
  return 0;
}

int cmd_info() {
  fmt::print("nsa {}", nsa::build_info());
  const auto devices = nsa::cuda_devices();
  fmt::print("devices: cpu{}\n", devices.empty() ? "" : ", cuda");
  for (const auto& d : devices) fmt::print("  {}\n", d);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nsa: Native Sparse Attention (CPU reference and CUDA backends)"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for all subcommands");

  RunArgs ra;
  CLI::App* run = app.add_subcommand("run", "Run a layer over x: prefill, then decode steps");
  run->add_option("--config", ra.config, "Config JSON (SPEC keys; absent keys take defaults)")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--weights", ra.weights, "Weights .safetensors (SPEC section 2 names)")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--input", ra.input, "Input .safetensors with float32 'x' [B, T, dim]")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--out", ra.out,
                  "Output .safetensors: y, gates, sel_blocks, o_cmp, o_sel, o_win, reads")
      ->required();
  run->add_option("--prefill", ra.prefill,
                  "Tokens to prefill (default all); the rest are decode steps")
      ->check(CLI::PositiveNumber);
  run->add_option("--device", ra.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  run->add_option("--dtype", ra.dtype, "Storage dtype: fp32 | bf16 | fp16")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  run->add_option("--threads", ra.threads, "CPU threads (0 = all)")->check(CLI::NonNegativeNumber);

  std::string ic, iw, ix;
  int64_t iB = 1, iT = 16;
  uint64_t iseed = 0;
  CLI::App* init = app.add_subcommand("init", "Write random weights and/or a random input x");
  init->add_option("--config", ic, "Config JSON (default: SPEC defaults)")
      ->check(CLI::ExistingFile);
  init->add_option("--weights", iw, "Write random weights here");
  init->add_option("--input", ix, "Write a random float32 x [B, T, dim] here");
  init->add_option("--B", iB, "Batch for --input")->check(CLI::PositiveNumber);
  init->add_option("--T", iT, "Tokens for --input")->check(CLI::PositiveNumber);
  init->add_option("--seed", iseed, "Random seed");

  CLI::App* info = app.add_subcommand("info", "Print the version, build options and devices");

  nsa_cli::BenchCommands bench;
  nsa_cli::add_bench_commands(app, bench);
  nsa_cli::SummarizeCommand summ;
  nsa_cli::add_summarize_command(app, summ);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (run->parsed()) return cmd_run(ra);
    if (init->parsed()) return cmd_init(ic, iw, ix, iB, iT, iseed);
    if (info->parsed()) return cmd_info();
    if (int rc = nsa_cli::run_bench_commands(bench); rc >= 0) return rc;
    if (int rc = nsa_cli::run_summarize_command(summ); rc >= 0) return rc;
  } catch (const std::exception& e) {
    fmt::print(stderr, "nsa: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
