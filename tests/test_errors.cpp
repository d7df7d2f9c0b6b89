// Bad input of every kind (config, weights, x, safetensors files, CLI arguments) must give one
// clear nsa::Error or CLI error naming the problem and the value, never a crash.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>

#include "nsa/config.h"
#include "nsa/device.h"
#include "nsa/init.h"
#include "nsa/layer.h"
#include "nsa/safetensors.h"
#include "test_util.h"

namespace nsa {
namespace {

namespace fs = std::filesystem;

// Runs f and returns the message of the nsa::Error it throws; any other outcome fails the test.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-nsa exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no error was thrown";
  return "";
}

::testing::AssertionResult mentions(const std::string& msg,
                                    std::initializer_list<std::string_view> needles) {
  for (std::string_view n : needles) {
    if (msg.find(n) == std::string::npos) {
      return ::testing::AssertionFailure() << "message lacks \"" << n << "\": " << msg;
    }
  }
  return ::testing::AssertionSuccess();
}

// A fresh directory under testing::TempDir(), unique per process and test, removed afterwards.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::path(::testing::TempDir()) / ("nsa_errors_" + std::to_string(getpid()) + "_" +
                                              info->test_suite_name() + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& name) const { return path_ / name; }
  std::string string() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A safetensors file from a header text and a data section; `header_len` overrides the length.
std::string safetensors_bytes(const std::string& header, const std::string& data,
                              uint64_t header_len = std::numeric_limits<uint64_t>::max()) {
  if (header_len == std::numeric_limits<uint64_t>::max()) header_len = header.size();
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = static_cast<char>((header_len >> (8 * i)) & 0xff);
  return s + header + data;
}

// ------------------------------------------------------------------------------------------------
// Config

struct BadConfig {
  const char* json;
  const char* key;
  const char* value;  // as the message prints it
};

TEST(ErrorsConfig, InvalidValuesNameKeyAndValue) {
  const BadConfig cases[] = {
      {R"({"dim": 0})", "dim", "0"},
      {R"({"heads": 6, "groups": 4})", "heads", "6"},
      {R"({"groups": 0})", "groups", "0"},
      {R"({"dk": 7})", "dk", "7"},
      {R"({"dk": 0})", "dk", "0"},
      {R"({"dv": 0})", "dv", "0"},
      {R"({"l": 24, "d": 16})", "l", "24"},
      {R"({"l_sel": 72})", "l_sel", "72"},
      {R"({"l": 64, "l_sel": 32})", "l", "64"},
      {R"({"n_sel": 2})", "n_sel", "2"},
      {R"({"w": -1})", "w", "-1"},
      {R"({"gate": "relu"})", "gate", "\"relu\""},
      {R"({"gate_temp": 0})", "gate_temp", "0"},
      {R"({"gate_temp": -1})", "gate_temp", "-1"},
      {R"({"gate_hidden": 0})", "gate_hidden", "0"},
      {R"({"rope_theta": 0})", "rope_theta", "0"},
      {R"({"phi": "mlp"})", "phi", "\"mlp\""},
      {R"({"phi": "foo"})", "phi", "\"foo\""},
      {R"({"dim": 2.5})", "dim", "2.5"},
      {R"({"n_sel": "8"})", "n_sel", "\"8\""},
      {R"({"gate_hidden": 1.0})", "gate_hidden", "1.0"},
      {R"({"w": 18446744073709551615})", "w", "18446744073709551615"},
      {R"({"gate": 1})", "gate", "1"},
      {R"({"rope_theta": "big"})", "rope_theta", "\"big\""},
  };
  for (const BadConfig& c : cases) {
    SCOPED_TRACE(c.json);
    const std::string msg = error_of([&] { Config::from_json(c.json); });
    const std::string key = fmt::format("'{}'", c.key), value = fmt::format("value {}", c.value);
    EXPECT_TRUE(mentions(msg, {key, value}));
  }
}

TEST(ErrorsConfig, UnknownKeyNonJsonAndNonObject) {
  EXPECT_TRUE(mentions(error_of([] { Config::from_json(R"({"dim": 64, "n_heads": 4})"); }),
                       {"'n_heads'", "unknown"}));
  EXPECT_TRUE(mentions(error_of([] { Config::from_json("dim = 64"); }), {"JSON"}));
  EXPECT_TRUE(mentions(error_of([] { Config::from_json(R"({"dim": 64,})"); }), {"JSON"}));
  EXPECT_TRUE(mentions(error_of([] { Config::from_json(""); }), {"JSON"}));
  EXPECT_TRUE(mentions(error_of([] { Config::from_json("[1, 2]"); }), {"object", "array"}));
  EXPECT_TRUE(mentions(error_of([] { Config::from_json("64"); }), {"object", "number"}));
}

TEST(ErrorsConfig, EmptyObjectGivesSpecDefaults) {
  const Config c = Config::from_json("{}");
  EXPECT_EQ(c.dim, 256);
  EXPECT_EQ(c.heads, 8);
  EXPECT_EQ(c.groups, 2);
  EXPECT_EQ(c.dk, 32);
  EXPECT_EQ(c.dv, 32);
  EXPECT_EQ(c.l, 32);
  EXPECT_EQ(c.d, 16);
  EXPECT_EQ(c.l_sel, 64);
  EXPECT_EQ(c.n_sel, 16);
  EXPECT_EQ(c.w, 512);
  EXPECT_EQ(c.gate_hidden, 16);
  EXPECT_EQ(c.gate, GateKind::kSoftmax);
  EXPECT_EQ(c.gate_temp, 1.0);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.phi, Phi::kAvg);
}

TEST(ErrorsConfig, GateHiddenDefaultFollowsDk) {
  EXPECT_EQ(Config::from_json(R"({"dk": 64})").gate_hidden, 32);
  EXPECT_EQ(Config::from_json(R"({"dk": 2})").gate_hidden, 1);
  EXPECT_EQ(Config::from_json(R"({"dk": 64, "gate_hidden": 5})").gate_hidden, 5);
  // Explicit keys are kept, and a config survives to_json / from_json.
  const Config c = Config::from_json(
      R"({"dim": 32, "heads": 4, "dk": 8, "dv": 6, "gate": "sigmoid", "gate_temp": 0.5})");
  const Config r = Config::from_json(c.to_json());
  EXPECT_EQ(r.dim, 32);
  EXPECT_EQ(r.heads, 4);
  EXPECT_EQ(r.dv, 6);
  EXPECT_EQ(r.gate_hidden, 4);
  EXPECT_EQ(r.gate, GateKind::kSigmoid);
  EXPECT_EQ(r.gate_temp, 0.5);
}

TEST(ErrorsConfig, FromFile) {
  const ScratchDir dir;
  const std::string missing = (dir / "no_such_config.json").string();
  EXPECT_TRUE(mentions(error_of([&] { Config::from_file(missing); }), {missing}));
  // A file with a bad value names the file, the key and the value.
  const std::string bad = (dir / "bad.json").string();
  write_file(bad, R"({"n_sel": 2})");
  EXPECT_TRUE(mentions(error_of([&] { Config::from_file(bad); }), {bad, "'n_sel'", "value 2"}));
  const std::string good = (dir / "good.json").string();
  write_file(good, R"({"dim": 64, "dk": 16})");
  const Config c = Config::from_file(good);
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.gate_hidden, 8);
}

// ------------------------------------------------------------------------------------------------
// Layer construction

TEST(ErrorsLayer, MissingExtraMisshapedWeights) {
  const Config c = test::small_config();
  {
    auto w = random_weights(c, 1);
    w.erase("W_K_sel.weight");
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"missing", "'W_K_sel.weight'"}));
  }
  {
    auto w = random_weights(c, 1);
    w.emplace("W_X.weight", Tensor(DType::kF32, {4, 4}));
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'W_X.weight'"}));
  }
  {
    auto w = random_weights(c, 1);
    w.at("out.weight") = Tensor(DType::kF32, {48, 15});  // expected [dim, H*dv] = [48, 24]
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'out.weight'", "[48, 15]", "[48, 24]"}));
  }
  {
    auto w = random_weights(c, 1);
    w.at("gate.fc2.bias") = Tensor(DType::kF32, {3, 1});
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'gate.fc2.bias'", "[3, 1]", "[3]"}));
  }
  {
    // Weights of another config: the first mismatch is named.
    Config other = c;
    other.dim = 40;
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, random_weights(other, 1)); }), {"[", "48"}));
  }
}

TEST(ErrorsLayer, IntegerAndNonFiniteWeights) {
  const Config c = test::small_config();
  {
    auto w = random_weights(c, 2);
    w.at("gate.fc1.bias") = Tensor(DType::kI32, {c.gate_hidden});
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'gate.fc1.bias'", "I32"}));
  }
  {
    auto w = random_weights(c, 2);
    w.at("W_Q.weight").data<float>()[5] = std::nanf("");
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'W_Q.weight'", "non-finite", "5"}));
  }
  {
    auto w = random_weights(c, 2);
    w.at("gate.fc2.bias").data<float>()[1] = -INFINITY;
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'gate.fc2.bias'", "non-finite"}));
  }
  {
    // An overflowing value stored as F16 is Inf too.
    auto w = random_weights(c, 2);
    Tensor h(DType::kF16, w.at("W_V_win.weight").shape());
    h.data<uint16_t>()[3] = f32_to_f16(1e6f);
    w.at("W_V_win.weight") = std::move(h);
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w); }), {"'W_V_win.weight'", "non-finite"}));
  }
}

Tensor convert(const Tensor& t, DType dtype) {
  Tensor out(dtype, t.shape());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float v = t.data<float>()[i];
    out.data<uint16_t>()[i] = dtype == DType::kBF16 ? f32_to_bf16(v) : f32_to_f16(v);
  }
  return out;
}

TEST(ErrorsLayer, HalfPrecisionWeightsAccepted) {
  const Config c = test::small_config();
  const auto w32 = random_weights(c, 3);
  const Tensor x = random_normal({2, 21, c.dim}, 4);
  Layer ref(c, w32);
  KVCache ref_cache = ref.new_cache(2);
  const Tensor y_ref = ref.prefill(ref_cache, x);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(to_string(dt));
    std::map<std::string, Tensor> w;
    for (const auto& [name, t] : w32) w.emplace(name, convert(t, dt));
    Layer layer(c, w);
    KVCache cache = layer.new_cache(2);
    const Tensor y = layer.prefill(cache, x);
    EXPECT_LT(test::rel_l2(y, y_ref), 2e-2);
    // x in the same half precision is accepted too.
    KVCache cache2 = layer.new_cache(2);
    const Tensor y2 = layer.prefill(cache2, convert(x, dt));
    EXPECT_LT(test::rel_l2(y2, y_ref), 2e-2);
  }
}

TEST(ErrorsLayer, InvalidOptionsAndConfig) {
  const Config c = test::small_config();
  const auto w = random_weights(c, 5);
  {
    LayerOptions o;
    o.dtype = DType::kI32;
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w, o); }), {"storage dtype", "I32"}));
  }
  {
    LayerOptions o;
    o.threads = -1;
    EXPECT_TRUE(mentions(error_of([&] { Layer(c, w, o); }), {"threads", "-1"}));
  }
  {
    Config bad = c;
    bad.n_sel = 2;
    EXPECT_TRUE(mentions(error_of([&] { Layer(bad, w); }), {"'n_sel'", "value 2"}));
  }
  EXPECT_TRUE(mentions(error_of([] { parse_device("gpu"); }), {"'gpu'", "cpu", "cuda"}));
  EXPECT_TRUE(mentions(error_of([] { parse_storage_dtype("fp64"); }), {"'fp64'", "bf16"}));
  EXPECT_TRUE(mentions(error_of([] { storage_name(DType::kI32); }), {"I32"}));
  Layer layer(c, w);
  EXPECT_TRUE(mentions(error_of([&] { layer.new_cache(0); }), {"batch", "0"}));
}

TEST(ErrorsLayer, CudaWithoutCuda) {
  if (cuda_available()) GTEST_SKIP() << "this build and machine have CUDA";
  const Config c = test::small_config();
  LayerOptions o;
  o.device = Device::kCuda;
  EXPECT_TRUE(mentions(error_of([&] { Layer(c, random_weights(c, 6), o); }), {"cuda"}));
}

// ------------------------------------------------------------------------------------------------
// prefill / decode inputs

TEST(ErrorsLayer, BadInputShapes) {
  const Config c = test::small_config();
  Layer layer = test::make_layer(c, 7);
  KVCache cache = layer.new_cache(2);
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.prefill(cache, random_normal({6, c.dim}, 1));
                       }),
                       {"prefill", "[B, T, dim]", "[6, 48]"}));
  EXPECT_TRUE(mentions(error_of([&] { layer.prefill(cache, Tensor()); }), {"[B, T, dim]"}));
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.prefill(cache, random_normal({2, 3, 47}, 1));
                       }),
                       {"width 47", "48"}));
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.prefill(cache, random_normal({3, 3, c.dim}, 1));
                       }),
                       {"batch 3", "2 sequences"}));
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.prefill(cache, Tensor(DType::kF32, {2, 0, c.dim}));
                       }),
                       {"prefill", "T = 0"}));
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.decode(cache, random_normal({2, 2, c.dim}, 1));
                       }),
                       {"decode", "T = 2"}));
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.decode(cache, Tensor(DType::kF32, {2, 0, c.dim}));
                       }),
                       {"decode", "T = 0"}));
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.prefill(cache, Tensor(DType::kI32, {2, 3, c.dim}));
                       }),
                       {"I32"}));
  KVCache empty;
  EXPECT_TRUE(mentions(error_of([&] {
                         layer.prefill(empty, random_normal({2, 3, c.dim}, 1));
                       }),
                       {"cache"}));
  // None of the rejected calls touched the cache: it still starts at position 0 and works.
  EXPECT_EQ(cache.length(), 0);
  const Tensor y = layer.prefill(cache, random_normal({2, 3, c.dim}, 1));
  EXPECT_EQ(y.shape(), (Shape{2, 3, c.dim}));
  EXPECT_EQ(cache.length(), 3);
}

TEST(ErrorsLayer, NonFiniteInput) {
  const Config c = test::small_config();
  Layer layer = test::make_layer(c, 8);
  KVCache cache = layer.new_cache(2);
  Tensor x = random_normal({2, 5, c.dim}, 2);
  x.data<float>()[(1 * 5 + 2) * c.dim + 7] = std::nanf("");
  EXPECT_TRUE(
      mentions(error_of([&] { layer.prefill(cache, x); }), {"prefill", "non-finite", "[1, 2, 7]"}));
  Tensor d = random_normal({2, 1, c.dim}, 3);
  d.data<float>()[c.dim + 4] = INFINITY;
  EXPECT_TRUE(mentions(error_of([&] { layer.decode(cache, d); }), {"decode", "non-finite"}));
  d.data<float>()[c.dim + 4] = -INFINITY;
  EXPECT_TRUE(mentions(error_of([&] { layer.decode(cache, d); }), {"non-finite"}));
  Tensor h = convert(random_normal({2, 1, c.dim}, 4), DType::kBF16);
  h.data<uint16_t>()[0] = f32_to_bf16(std::nanf(""));
  EXPECT_TRUE(mentions(error_of([&] { layer.decode(cache, h); }), {"non-finite", "[0, 0, 0]"}));
  // More than 2^20 values are checked by several threads: still the first bad one is named.
  Tensor big = random_normal({2, 11000, c.dim}, 5);
  big.data<float>()[(1 * 11000 + 9000) * c.dim + 3] = INFINITY;
  big.data<float>()[(1 * 11000 + 20) * c.dim + 40] = std::nanf("");
  EXPECT_TRUE(mentions(error_of([&] { layer.prefill(cache, big); }),
                       {"prefill", "non-finite", "[1, 20, 40]"}));
  EXPECT_EQ(cache.length(), 0);
}

// ------------------------------------------------------------------------------------------------
// safetensors

TEST(ErrorsSafetensors, UnreadableFiles) {
  const ScratchDir dir;
  const std::string missing = (dir / "missing.safetensors").string();
  EXPECT_TRUE(mentions(error_of([&] { load_safetensors(missing); }), {missing}));

  const std::string dir_path = dir.string();
  EXPECT_TRUE(
      mentions(error_of([&] { load_safetensors(dir_path); }), {dir_path, "not a regular file"}));

  const std::string tiny = (dir / "tiny.safetensors").string();
  write_file(tiny, "abcde");
  EXPECT_TRUE(mentions(error_of([&] { load_safetensors(tiny); }), {tiny, "5 bytes"}));

  const std::string empty = (dir / "empty.safetensors").string();
  write_file(empty, "");
  EXPECT_TRUE(mentions(error_of([&] { load_safetensors(empty); }), {empty, "0 bytes"}));
}

TEST(ErrorsSafetensors, CorruptHeaders) {
  const ScratchDir dir;
  const std::string f32x2 = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  auto load_bytes = [&](const std::string& name, const std::string& bytes) {
    const std::string path = (dir / name).string();
    write_file(path, bytes);
    return error_of([&] { load_safetensors(path); });
  };
  EXPECT_TRUE(mentions(load_bytes("long.st", safetensors_bytes(f32x2, std::string(8, 'x'), 1000)),
                       {"long.st", "header length 1000"}));
  EXPECT_TRUE(mentions(load_bytes("huge.st", safetensors_bytes("{}", "", ~uint64_t{0} - 1)),
                       {"huge.st", "header length"}));
  EXPECT_TRUE(mentions(load_bytes("text.st", safetensors_bytes("{\"a\": [1, 2", "")),
                       {"text.st", "not JSON"}));
  EXPECT_TRUE(mentions(load_bytes("array.st", safetensors_bytes("[1, 2]", "")),
                       {"array.st", "JSON object"}));
  EXPECT_TRUE(mentions(
      load_bytes("entry.st", safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2]}})", "")),
      {"entry.st", "'a'"}));
  EXPECT_TRUE(mentions(
      load_bytes("negshape.st",
                 safetensors_bytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})",
                                   std::string(8, 'x'))),
      {"negshape.st", "'a'", "-2"}));
  EXPECT_TRUE(mentions(load_bytes("beyond.st", safetensors_bytes(f32x2, std::string(4, 'x'))),
                       {"beyond.st", "'a'", "[0, 8)", "4 bytes"}));
  EXPECT_TRUE(mentions(
      load_bytes("reversed.st",
                 safetensors_bytes(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})",
                                   std::string(8, 'x'))),
      {"reversed.st", "'a'"}));
  EXPECT_TRUE(mentions(
      load_bytes("count.st",
                 safetensors_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                                   std::string(8, 'x'))),
      {"count.st", "'a'", "8 data bytes", "needs 12"}));
  EXPECT_TRUE(mentions(
      load_bytes("extra.st",
                 safetensors_bytes(R"({"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}})",
                                   std::string(8, 'x'))),
      {"extra.st", "'a'", "8 data bytes", "needs 4"}));
  EXPECT_TRUE(mentions(
      load_bytes("f64.st",
                 safetensors_bytes(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                                   std::string(8, 'x'))),
      {"f64.st", "'w'", "F64"}));
  // The same header with a supported dtype loads: the cases above fail for the stated reason.
  const std::string ok = (dir / "ok.st").string();
  write_file(ok, safetensors_bytes(f32x2, std::string(8, '\0')));
  const auto t = load_safetensors(ok);
  ASSERT_EQ(t.count("a"), 1u);
  EXPECT_EQ(t.at("a").shape(), Shape{2});
}

TEST(ErrorsSafetensors, TruncatedFile) {
  const ScratchDir dir;
  const std::string path = (dir / "w.safetensors").string();
  save_safetensors(path, random_weights(test::small_config(), 9));
  ASSERT_NO_THROW(load_safetensors(path));
  const std::string bytes = read_file(path);
  // out.weight sorts last, so its data is the tail of the file.
  write_file(path, bytes.substr(0, bytes.size() - 3));
  EXPECT_TRUE(
      mentions(error_of([&] { load_safetensors(path); }), {path, "truncated", "'out.weight'"}));
  // Cut inside the header.
  write_file(path, bytes.substr(0, 40));
  EXPECT_TRUE(mentions(error_of([&] { load_safetensors(path); }), {path, "header length"}));
}

TEST(ErrorsSafetensors, RoundTripPreservesBytes) {
  const ScratchDir dir;
  std::map<std::string, Tensor> in;
  in.emplace("f32", random_normal({3, 5, 7}, 10));
  Tensor i32(DType::kI32, {4, 3});
  for (int i = 0; i < 12; ++i) i32.data<int32_t>()[i] = i * 7919 - 40000;
  i32.data<int32_t>()[11] = std::numeric_limits<int32_t>::min();
  in.emplace("i32", std::move(i32));
  in.emplace("bf16", convert(random_normal({9}, 11), DType::kBF16));
  in.emplace("f16", convert(random_normal({2, 3}, 12), DType::kF16));
  in.emplace("scalar", Tensor(DType::kF32, {}));
  in.emplace("zero_size", Tensor(DType::kF32, {2, 0}));
  const std::string path = (dir / "rt.safetensors").string();
  save_safetensors(path, in);
  const auto out = load_safetensors(path);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    SCOPED_TRACE(name);
    ASSERT_EQ(out.count(name), 1u);
    const Tensor& u = out.at(name);
    EXPECT_EQ(u.dtype(), t.dtype());
    EXPECT_EQ(u.shape(), t.shape());
    ASSERT_EQ(u.nbytes(), t.nbytes());
    if (t.nbytes() > 0) {
      EXPECT_EQ(std::memcmp(u.raw(), t.raw(), t.nbytes()), 0);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// CLI

struct CliResult {
  bool signaled = false;
  int code = -1;
  std::string err;
};

class ErrorsCli : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = path("config.json");
    weights_ = path("w.safetensors");
    input_ = path("x.safetensors");
    write_file(config_,
               R"({"dim": 32, "heads": 4, "groups": 2, "dk": 8, "dv": 8, "l": 8, "d": 4,
                   "l_sel": 16, "n_sel": 4, "w": 16})");
    const CliResult r = cli("init --config " + config_ + " --weights " + weights_ + " --input " +
                            input_ + " --B 2 --T 40 --seed 1");
    ASSERT_EQ(r.code, 0) << r.err;
  }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Runs `nsa <args>` with stdout and stderr captured to files.
  CliResult cli(const std::string& args) const {
    const std::string err = path("stderr.txt");
    const std::string cmd =
        "exec '" NSA_CLI "' " + args + " >'" + path("stdout.txt") + "' 2>'" + err + "'";
    const int status = std::system(cmd.c_str());
    CliResult r;
    r.signaled = WIFSIGNALED(status);
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.err = read_file(err);
    return r;
  }

  std::string run_args(const std::string& extra) const {
    return "run --config " + config_ + " --weights " + weights_ + " --input " + input_ + " --out " +
           path("out.safetensors") + " " + extra;
  }

  // A failed nsa command: non-zero exit (not a signal, not a shell 126/127 or 128+n) and a
  // message on stderr; errors caught by nsa itself are exactly one "nsa: error:" line.
  static ::testing::AssertionResult failed_cleanly(const CliResult& r, bool nsa_error) {
    if (r.signaled) return ::testing::AssertionFailure() << "killed by a signal: " << r.err;
    if (r.code <= 0 || r.code >= 126) {
      return ::testing::AssertionFailure() << "exit code " << r.code << ": " << r.err;
    }
    if (nsa_error) {
      if (r.err.rfind("nsa: error: ", 0) != 0 ||
          std::count(r.err.begin(), r.err.end(), '\n') != 1 || r.err.back() != '\n') {
        return ::testing::AssertionFailure() << "not one 'nsa: error:' line: " << r.err;
      }
    } else if (r.err.empty()) {
      return ::testing::AssertionFailure() << "nothing on stderr";
    }
    return ::testing::AssertionSuccess();
  }

  ScratchDir dir_;
  std::string config_, weights_, input_;
};

TEST_F(ErrorsCli, ValidRunSucceeds) {
  // The baseline each error case below changes in one place.
  for (const char* extra : {"", "--prefill 17", "--prefill 40 --dtype bf16 --threads 2"}) {
    SCOPED_TRACE(extra);
    fs::remove(path("out.safetensors"));
    const CliResult r = cli(run_args(extra));
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_TRUE(r.err.empty()) << r.err;
    const auto out = load_safetensors(path("out.safetensors"));
    ASSERT_EQ(out.count("y"), 1u);
    EXPECT_EQ(out.at("y").shape(), (Shape{2, 40, 32}));
  }
}

TEST_F(ErrorsCli, CorruptWeights) {
  const std::string bytes = read_file(weights_);
  write_file(weights_, "this is not a safetensors file at all");
  const CliResult r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {weights_, "header length"}));
  write_file(weights_, bytes.substr(0, bytes.size() - 100));  // truncated
  const CliResult t = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(t, true));
  EXPECT_TRUE(mentions(t.err, {weights_, "truncated"}));
}

TEST_F(ErrorsCli, WeightsOfAnotherConfig) {
  ASSERT_EQ(cli("init --weights " + weights_ + " --seed 2").code, 0);  // SPEC defaults, dim 256
  const CliResult r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"weight tensor", "shape"}));
}

TEST_F(ErrorsCli, MissingX) {
  save_safetensors(input_, {{"y", random_normal({2, 40, 32}, 3)}});
  const CliResult r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {input_, "no tensor", "'x'"}));
}

TEST_F(ErrorsCli, BadX) {
  save_safetensors(input_, {{"x", random_normal({2, 40, 31}, 3)}});
  CliResult r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"width 31", "32"}));
  save_safetensors(input_, {{"x", Tensor(DType::kI32, {2, 40, 32})}});
  r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"'x'", "I32"}));
  save_safetensors(input_, {{"x", random_normal({80, 32}, 3)}});
  r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"'x'", "[80, 32]"}));
  Tensor x = random_normal({2, 40, 32}, 3);
  x.data<float>()[2000] = std::nanf("");
  save_safetensors(input_, {{"x", x}});
  r = cli(run_args("--prefill 10"));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"non-finite"}));
}

TEST_F(ErrorsCli, InvalidConfig) {
  write_file(config_, R"({"dim": 32, "heads": 4, "dk": 8, "dv": 8, "n_sel": 2})");
  const CliResult r = cli(run_args(""));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {config_, "'n_sel'", "value 2"}));
}

TEST_F(ErrorsCli, BadPrefill) {
  CliResult r = cli(run_args("--prefill 0"));
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"--prefill"}));
  r = cli(run_args("--prefill 41"));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"--prefill 41", "T = 40"}));
  r = cli(run_args("--prefill -3"));
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"--prefill"}));
}

TEST_F(ErrorsCli, UsageErrors) {
  CliResult r = cli(run_args("--frobnicate 3"));
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"--frobnicate"}));
  r = cli(run_args("--dtype fp64"));
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"--dtype", "fp64"}));
  r = cli(run_args("--device tpu"));
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"--device", "tpu"}));
  r = cli("run --config " + config_ + " --weights " + weights_ + " --input " + input_);
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"--out"}));
  r = cli(run_args("").replace(0, 3, "frob"));
  EXPECT_TRUE(failed_cleanly(r, false));
  r = cli("run --config " + path("nope.json") + " --weights " + weights_ + " --input " + input_ +
          " --out " + path("out.safetensors"));
  EXPECT_TRUE(failed_cleanly(r, false));
  EXPECT_TRUE(mentions(r.err, {"nope.json"}));
}

TEST_F(ErrorsCli, CudaWithoutCuda) {
  if (cuda_available()) GTEST_SKIP() << "this build and machine have CUDA";
  const CliResult r = cli(run_args("--device cuda"));
  EXPECT_TRUE(failed_cleanly(r, true));
  EXPECT_TRUE(mentions(r.err, {"cuda"}));
}

}  // namespace
}  // namespace nsa
