// `nsa summarize FILE.csv`: the seed's "Performance Breakdown" table from a decode CSV
// (ours, or the seed's own 7- or 9-column files).
#include <fmt/format.h>

#include <fstream>
#include <map>
#include <sstream>

#include "commands.h"
#include "nsa/error.h"

namespace nsa_cli {

namespace {

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream ss(line);
  std::string item;
  while (std::getline(ss, item, ',')) {
    while (!item.empty() && (item.back() == '\r' || item.back() == ' ')) item.pop_back();
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    out.push_back(item);
  }
  return out;
}

double to_number(const std::string& file, int line_no, const std::string& col,
                 const std::string& s) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  NSA_CHECK(used == s.size() && !s.empty(), "{}:{}: column '{}' has '{}', not a number", file,
            line_no, col, s);
  return v;
}

}  // namespace

void add_summarize_command(CLI::App& app, SummarizeCommand& cmd) {
  cmd.app =
      app.add_subcommand("summarize", "Per-branch breakdown of a decode CSV (ours or the seed's)");
  cmd.app
      ->add_option("file", cmd.file,
                   "CSV from `nsa bench decode --csv` or the seed's bench_decode.py")
      ->required();
}

int run_summarize_command(const SummarizeCommand& cmd) {
  if (!cmd.app->parsed()) return -1;
  std::ifstream in(cmd.file);
  NSA_CHECK(in.good(), "cannot open '{}'", cmd.file);
  std::string line;
  int line_no = 0;
  std::vector<std::string> header;
  while (header.empty() && std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line != "\r") header = split_csv_line(line);
  }
  NSA_CHECK(!header.empty(), "{}: empty file, expected a CSV header", cmd.file);
  std::map<std::string, size_t> col;
  for (size_t i = 0; i < header.size(); ++i) col[header[i]] = i;
  for (const char* need :
       {"S", "ms_total", "ms_cmp", "ms_sel", "ms_win", "reads_actual", "reads_expected"}) {
    NSA_CHECK(col.contains(need),
              "{}: header has no column '{}' (need S, ms_total, ms_cmp, ms_sel, ms_win, "
              "reads_actual, reads_expected)",
              cmd.file, need);
  }
  const bool has_decode =
      col.contains("reads_actual_decode") && col.contains("reads_expected_decode");
  fmt::print("{:>7} {:>9} {:>7} {:>7} {:>7}  {:<13}{}\n", "S", "total", "cmp%", "sel%", "win%",
             "reads", has_decode ? "decode reads" : "");
  int rows = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line == "\r") continue;
    const auto f = split_csv_line(line);
    NSA_CHECK(f.size() == header.size(), "{}:{}: {} fields, header has {}", cmd.file, line_no,
              f.size(), header.size());
    auto num = [&](const char* c) { return to_number(cmd.file, line_no, c, f[col.at(c)]); };
    const double total = num("ms_total");
    auto pct = [&](const char* c) { return total > 0 ? 100.0 * num(c) / total : 0.0; };
    std::string decode;
    if (has_decode)
      decode =
          fmt::format("{:.0f}/{:.0f}", num("reads_actual_decode"), num("reads_expected_decode"));
    fmt::print("{:>7.0f} {:>9.3f} {:>7.1f} {:>7.1f} {:>7.1f}  {:<13}{}\n", num("S"), total,
               pct("ms_cmp"), pct("ms_sel"), pct("ms_win"),
               fmt::format("{:.0f}/{:.0f}", num("reads_actual"), num("reads_expected")), decode);
    ++rows;
  }
  NSA_CHECK(rows > 0, "{}: no data rows", cmd.file);
  return 0;
}

}  // namespace nsa_cli
