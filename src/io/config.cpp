// Config: JSON parsing with SPEC defaults, strict keys, and validation with precise messages.
#include "nsa/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "nsa/error.h"

namespace nsa {

namespace {

using Json = nlohmann::json;

int64_t get_int(const Json& j, const char* key) {
  const Json& v = j.at(key);
  // Integers above INT64_MAX parse as unsigned and would wrap to negative values.
  NSA_CHECK(v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX),
            "config key '{}': value {} is not an integer in the int64 range", key, v.dump());
  return v.get<int64_t>();
}

double get_number(const Json& j, const char* key) {
  const Json& v = j.at(key);
  NSA_CHECK(v.is_number(), "config key '{}': value {} is not a number", key, v.dump());
  return v.get<double>();
}

std::string get_string(const Json& j, const char* key) {
  const Json& v = j.at(key);
  NSA_CHECK(v.is_string(), "config key '{}': value {} is not a string", key, v.dump());
  return v.get<std::string>();
}

}  // namespace

void Config::validate() const {
  auto positive = [](const char* key, int64_t v) {
    NSA_CHECK(v > 0, "config key '{}': value {} is invalid; allowed: an integer > 0", key, v);
  };
  positive("dim", dim);
  positive("heads", heads);
  positive("groups", groups);
  positive("dk", dk);
  positive("dv", dv);
  positive("l", l);
  positive("d", d);
  positive("l_sel", l_sel);
  positive("gate_hidden", gate_hidden);
  NSA_CHECK(w >= 0, "config key 'w': value {} is invalid; allowed: an integer >= 0", w);
  NSA_CHECK(n_sel >= 3,
            "config key 'n_sel': value {} is invalid; allowed: an integer >= 3 (it counts the "
            "initial and the two local blocks)",
            n_sel);
  NSA_CHECK(heads % groups == 0,
            "config key 'heads': value {} is invalid; allowed: a multiple of groups ({})", heads,
            groups);
  NSA_CHECK(dk % 2 == 0, "config key 'dk': value {} is invalid; allowed: an even integer (RoPE)",
            dk);
  NSA_CHECK(l % d == 0, "config key 'l': value {} is invalid; allowed: a multiple of d ({})", l, d);
  NSA_CHECK(l_sel % d == 0,
            "config key 'l_sel': value {} is invalid; allowed: a multiple of d ({})", l_sel, d);
  NSA_CHECK(l <= l_sel, "config key 'l': value {} is invalid; allowed: at most l_sel ({})", l,
            l_sel);
  NSA_CHECK(gate_temp > 0 && std::isfinite(gate_temp),
            "config key 'gate_temp': value {} is invalid; allowed: a finite number > 0", gate_temp);
  NSA_CHECK(rope_theta > 0 && std::isfinite(rope_theta),
            "config key 'rope_theta': value {} is invalid; allowed: a finite number > 0",
            rope_theta);
  // Sizes multiply into buffer lengths; keep them far from overflow.
  const int64_t kMax = int64_t{1} << 20;
  for (auto [key, v] : {std::pair{"dim", dim},
                        {"heads", heads},
                        {"dk", dk},
                        {"dv", dv},
                        {"l", l},
                        {"l_sel", l_sel},
                        {"n_sel", n_sel},
                        {"gate_hidden", gate_hidden}}) {
    NSA_CHECK(v <= kMax, "config key '{}': value {} is invalid; allowed: at most {}", key, v, kMax);
  }
  NSA_CHECK(w <= (int64_t{1} << 40), "config key 'w': value {} is invalid; allowed: at most 2^40",
            w);
}

Config Config::from_json(const std::string& text) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::parse_error& e) {
    NSA_FAIL("config is not valid JSON: {}", e.what());
  }
  NSA_CHECK(j.is_object(), "config must be a JSON object, got {}", j.type_name());
  static const std::set<std::string> kKeys = {
      "dim",   "heads", "groups", "dk",        "dv",          "l",          "d",  "l_sel",
      "n_sel", "w",     "gate",   "gate_temp", "gate_hidden", "rope_theta", "phi"};
  for (const auto& [key, value] : j.items()) {
    if (!kKeys.contains(key)) {
      std::string allowed;
      for (const auto& k : kKeys) allowed += (allowed.empty() ? "" : ", ") + k;
      NSA_FAIL("config key '{}' is unknown; allowed keys: {}", key, allowed);
    }
  }
  Config c;
  int64_t* ints[] = {&c.dim, &c.heads, &c.groups, &c.dk,    &c.dv,
                     &c.l,   &c.d,     &c.l_sel,  &c.n_sel, &c.w};
  const char* int_keys[] = {"dim", "heads", "groups", "dk", "dv", "l", "d", "l_sel", "n_sel", "w"};
  for (size_t i = 0; i < std::size(ints); ++i) {
    if (j.contains(int_keys[i])) *ints[i] = get_int(j, int_keys[i]);
  }
  c.gate_hidden =
      j.contains("gate_hidden") ? get_int(j, "gate_hidden") : std::max<int64_t>(1, c.dk / 2);
  if (j.contains("gate_temp")) c.gate_temp = get_number(j, "gate_temp");
  if (j.contains("rope_theta")) c.rope_theta = get_number(j, "rope_theta");
  if (j.contains("gate")) {
    const std::string g = get_string(j, "gate");
    if (g == "softmax") {
      c.gate = GateKind::kSoftmax;
    } else if (g == "sigmoid") {
      c.gate = GateKind::kSigmoid;
    } else {
      NSA_FAIL("config key 'gate': value \"{}\" is invalid; allowed: \"softmax\", \"sigmoid\"", g);
    }
  }
  if (j.contains("phi")) {
    const std::string p = get_string(j, "phi");
    NSA_CHECK(p != "mlp",
              "config key 'phi': value \"mlp\" is reserved for the learned compressor and not "
              "implemented yet; allowed: \"avg\"");
    NSA_CHECK(p == "avg", "config key 'phi': value \"{}\" is invalid; allowed: \"avg\"", p);
  }
  c.validate();
  return c;
}

Config Config::from_file(const std::string& path) {
  std::ifstream in(path);
  NSA_CHECK(in.good(), "cannot open config file '{}'", path);
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return from_json(ss.str());
  } catch (const Error& e) {
    NSA_FAIL("{}: {}", path, e.what());
  }
}

std::string Config::to_json() const {
  Json j = {{"dim", dim},
            {"heads", heads},
            {"groups", groups},
            {"dk", dk},
            {"dv", dv},
            {"l", l},
            {"d", d},
            {"l_sel", l_sel},
            {"n_sel", n_sel},
            {"w", w},
            {"gate_hidden", gate_hidden},
            {"gate", gate == GateKind::kSoftmax ? "softmax" : "sigmoid"},
            {"gate_temp", gate_temp},
            {"rope_theta", rope_theta},
            {"phi", "avg"}};
  return j.dump(2);
}

}  // namespace nsa
