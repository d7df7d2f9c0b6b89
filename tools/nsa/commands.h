// Subcommands of the `nsa` CLI that live outside main.cpp.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace nsa_cli {

struct ShapeArgs {
  int64_t B = 1, dim = 256, heads = 8, groups = 2, dk = 32, dv = 32, l = 32, d = 16, l_sel = 64,
          n_sel = 16, w = 512;
  std::string S_list = "128,256,512,1024";
  int64_t iters = 32, warmup = 8;
  std::string device = "auto", dtype = "fp32", csv, json, fill = "prefill";
  uint64_t seed = 0;
  int threads = 0;
};

struct BenchCommands {
  CLI::App* decode = nullptr;
  CLI::App* prefill = nullptr;
  ShapeArgs decode_args, prefill_args;
};

// Registers `bench decode` and `bench prefill`. The returned struct must outlive parsing.
void add_bench_commands(CLI::App& app, BenchCommands& cmds);
// Runs whichever bench subcommand was parsed; returns -1 when none was.
int run_bench_commands(const BenchCommands& cmds);

struct SummarizeCommand {
  CLI::App* app = nullptr;
  std::string file;
};
void add_summarize_command(CLI::App& app, SummarizeCommand& cmd);
int run_summarize_command(const SummarizeCommand& cmd);

// Parses a comma-separated list of positive integers (throws nsa::Error naming the flag).
std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text);

}  // namespace nsa_cli
