// `nsa bench decode|prefill` and `nsa summarize` end to end: CSV header and rows, reads against
// SPEC section 5 computed here, the seed's CSV, and usage errors. Nothing here is timed.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>

#include "core/blocks.h"
#include "nsa/config.h"
#include "nsa/device.h"

namespace {

struct Result {
  int code;
  std::string out, err;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Result nsa_cli(const std::string& args) {
  static int n = 0;
  // ctest runs tests as parallel processes: keep file names unique per process.
  const std::string base =
      testing::TempDir() + "/bench_cli_" + std::to_string(getpid()) + "_" + std::to_string(++n);
  const int rc = std::system(
      (std::string(NSA_CLI) + " " + args + " > " + base + ".out 2> " + base + ".err").c_str());
  EXPECT_TRUE(WIFEXITED(rc)) << args;
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, slurp(base + ".out"), slurp(base + ".err")};
}

std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> f;
    std::stringstream ss(line);
    std::string item;
    while (std::getline(ss, item, ',')) f.push_back(item);
    if (!line.empty() && line.back() == ',') f.emplace_back();  // a trailing empty field
    rows.push_back(f);
  }
  return rows;
}

// The actual reads of one query depend only on how many blocks exist, never on which are chosen:
// all selected blocks are complete except the current one. Counted here from SPEC's rules.
int64_t spec_reads(int64_t t, const nsa::Config& c) {
  const int64_t L = t + 1, cur = t / c.l_sel, complete = L / c.l_sel;
  int64_t forced = 1 + (cur >= 1 ? 1 : 0) + (cur >= 2 ? 1 : 0);
  int64_t candidates = complete - (forced - (cur < complete ? 0 : 1));  // forced complete blocks
  candidates = std::max<int64_t>(0, candidates);
  const int64_t taken = std::min(c.n_sel - forced, candidates);
  const int64_t sel = (forced - 1 + taken) * c.l_sel + (L - cur * c.l_sel);
  const int64_t cmp = L < c.l ? 0 : (L - c.l) / c.d + 1;
  return cmp + sel + std::min(c.w, L);
}

TEST(BenchCli, DecodeCsvHeaderRowsAndReads) {
  const std::string csv = testing::TempDir() + "/decode.csv";
  const Result r = nsa_cli(
      "bench decode --B 2 --dim 32 --heads 4 --groups 2 --dk 8 --dv 8 --l 8 --d 4 "
      "--l_sel 16 --n_sel 4 --w 24 --S_list 5,40,100 --iters 6 --warmup 2 --device cpu --csv " +
      csv);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto rows = read_csv(csv);
  ASSERT_EQ(rows.size(), 4u);
  const std::vector<std::string> want = {"S",
                                         "ms_total",
                                         "ms_cmp",
                                         "ms_sel",
                                         "ms_win",
                                         "reads_actual",
                                         "reads_expected",
                                         "reads_actual_decode",
                                         "reads_expected_decode"};
  ASSERT_GE(rows[0].size(), want.size());
  EXPECT_EQ(std::vector<std::string>(rows[0].begin(), rows[0].begin() + 9), want);
  nsa::Config c;
  c.dim = 32;
  c.heads = 4;
  c.groups = 2;
  c.dk = 8;
  c.dv = 8;
  c.l = 8;
  c.d = 4;
  c.l_sel = 16;
  c.n_sel = 4;
  c.w = 24;
  const int64_t S_list[] = {5, 40, 100};
  for (size_t i = 0; i < 3; ++i) {
    const auto& f = rows[i + 1];
    ASSERT_EQ(f.size(), rows[0].size());
    EXPECT_EQ(std::stoll(f[0]), S_list[i]);
    for (int k = 1; k <= 4; ++k) {
      EXPECT_EQ(f[size_t(k)].find('.') + 4, f[size_t(k)].size()) << "3 decimals: " << f[size_t(k)];
      EXPECT_GT(std::stod(f[size_t(k)]), 0.0);
    }
    // Timed steps are the 6 after 2 warm-ups: query positions S+2 .. S+7.
    const int64_t last = S_list[i] + 2 + 6 - 1;
    int64_t sum_actual = 0, sum_expected = 0;
    for (int64_t t = S_list[i] + 2; t <= last; ++t) {
      sum_actual += spec_reads(t, c);
      sum_expected += (t + 1 < c.l ? 0 : (t + 1 - c.l) / c.d + 1) + c.n_sel * c.l_sel +
                      std::min<int64_t>(c.w, t + 1);
    }
    EXPECT_EQ(std::stoll(f[5]), spec_reads(last, c)) << S_list[i];
    EXPECT_EQ(std::stoll(f[6]), nsa::core::expected_reads(last, c));
    EXPECT_EQ(std::stoll(f[7]), sum_actual);
    EXPECT_EQ(std::stoll(f[8]), sum_expected);
    EXPECT_LE(std::stoll(f[5]), std::stoll(f[6]));
  }
  // The console table is printed too; on the CPU its GPU-only columns (the attention alone and
  // its share of the copy bandwidth) show "-", not a zero that reads like a measurement.
  EXPECT_NE(r.out.find("ms_total"), std::string::npos);
  for (const int64_t S : S_list) {
    const size_t at = r.out.find(fmt::format("\n{:>7} ", S));
    ASSERT_NE(at, std::string::npos) << r.out;
    const std::string line = r.out.substr(at + 1, r.out.find('\n', at + 1) - at - 1);
    std::istringstream fields(line);
    std::vector<std::string> field{std::istream_iterator<std::string>(fields), {}};
    ASSERT_EQ(field.size(), 10u) << line;
    EXPECT_EQ(field[7], "-") << line;  // p50_attn
    EXPECT_EQ(field[9], "-") << line;  // %bw
  }
  // summarize reads our own CSV (13 columns).
  const Result s = nsa_cli("summarize " + csv);
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_NE(s.out.find("cmp%"), std::string::npos);
}

TEST(BenchCli, SummarizeSeedCsv) {
  const Result s = nsa_cli(std::string("summarize ") + NSA_TEST_DATA + "/seed_decode_gpu_v2.csv");
  ASSERT_EQ(s.code, 0) << s.err;
  // The seed's own breakdown: 128 -> 101.4 / 102.4 / 102.4, 1024 -> 101.4 / 102.3 / 102.4.
  EXPECT_NE(s.out.find("101.4   102.4   102.4  1159/1193"), std::string::npos) << s.out;
  EXPECT_NE(s.out.find("101.4   102.3   102.4  1159/1601"), std::string::npos) << s.out;
  // A 9-column seed file works too.
  const std::string nine = testing::TempDir() + "/seed9.csv";
  std::ofstream(nine)
      << "S,ms_total,ms_cmp,ms_sel,ms_win,reads_actual,reads_expected,reads_actual_decode,"
         "reads_expected_decode\n256,5.932,5.952,5.965,6.024,1159,1329,37088,42528\n";
  const Result s9 = nsa_cli("summarize " + nine);
  ASSERT_EQ(s9.code, 0) << s9.err;
  EXPECT_NE(s9.out.find("37088/42528"), std::string::npos) << s9.out;
}

TEST(BenchCli, PrefillCsv) {
  const std::string csv = testing::TempDir() + "/prefill.csv";
  const Result r = nsa_cli(
      "bench prefill --dim 32 --heads 2 --groups 1 --dk 8 --dv 8 --S_list 17,64 "
      "--iters 1 --warmup 0 --device cpu --csv " +
      csv);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto rows = read_csv(csv);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0][0], "S");
  EXPECT_EQ(rows[1][0], "17");
  EXPECT_EQ(rows[2][0], "64");
  ASSERT_EQ(rows[0].size(), 9u);
  EXPECT_EQ(rows[0][5], "attn_gflop");
  EXPECT_EQ(rows[0][6], "attn_tflops");
  EXPECT_EQ(rows[0][7], "ms_attn_median");  // the attention's device time: CUDA only
  ASSERT_EQ(rows[1].size(), 9u);
  EXPECT_EQ(rows[1][7], "");
  // Attention work, 2 * B * H * reads * (dk + dv), reads counted by hand with the default l 32,
  // d 16, n_sel 16, w 512: below 64 tokens every block is selected and the window holds the
  // whole prefix, so a query at t reads t + 1 selected and t + 1 window tokens, plus
  // (t + 1 - 32) / 16 + 1 compressed ones from t = 31 on.
  // S 17: 2 * (1 + ... + 17) = 306. S 64: 2 * 2080 + 16 * 1 + 16 * 2 + 3 = 4211.
  EXPECT_NEAR(std::stod(rows[1][5]), 2.0 * 2 * 306 * 16 * 1e-9, 1e-12);
  EXPECT_NEAR(std::stod(rows[2][5]), 2.0 * 2 * 4211 * 16 * 1e-9, 1e-12);
  EXPECT_GT(std::stod(rows[2][6]), 0.0);
}

TEST(BenchCli, BadFlagsAreUsageErrors) {
  for (const char* args :
       {"bench decode --S_list 12,x", "bench decode --S_list 0", "bench decode --iters 0",
        "bench decode --bogus 1", "bench decode --heads 3 --groups 2", "bench decode --device tpu",
        "bench decode --n_sel 2", "bench", "summarize /nonexistent.csv", "summarize"}) {
    const Result r = nsa_cli(args);
    EXPECT_NE(r.code, 0) << args;
    EXPECT_FALSE(r.err.empty()) << args;
  }
  const std::string bad = testing::TempDir() + "/bad.csv";
  std::ofstream(bad) << "S,ms_total\n1,2\n";
  const Result r = nsa_cli("summarize " + bad);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("ms_cmp"), std::string::npos) << r.err;
}

}  // namespace

// Benchmark results carry build_info(): it must name the commit that was built, as git names
// it (a short hash, "-dirty" with uncommitted changes) or as NSA_COMMIT overrides it at build
// time, never an empty value.
TEST(BenchCli, BuildInfoNamesTheCommit) {
  const std::string info = nsa::build_info();
  const auto at = info.find("commit: ");
  ASSERT_NE(at, std::string::npos) << info;
  const std::string commit = info.substr(at + 8, info.find('\n', at) - at - 8);
  EXPECT_FALSE(commit.empty()) << info;
  EXPECT_EQ(commit.find(' '), std::string::npos) << info;
}
