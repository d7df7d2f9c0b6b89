// NSA layer configuration: the keys and defaults of SPEC.md section 1, read from JSON.
#pragma once

#include <cstdint>
#include <string>

namespace nsa {

enum class GateKind { kSoftmax, kSigmoid };
enum class Phi { kAvg };

struct Config {
  int64_t dim = 256;
  int64_t heads = 8;   // H
  int64_t groups = 2;  // G
  int64_t dk = 32;
  int64_t dv = 32;
  int64_t l = 32;      // compression block length
  int64_t d = 16;      // compression stride
  int64_t l_sel = 64;  // selection block length
  int64_t n_sel = 16;  // selected blocks per query, forced ones included
  int64_t w = 512;     // sliding window
  GateKind gate = GateKind::kSoftmax;
  double gate_temp = 1.0;
  int64_t gate_hidden = 16;  // default max(1, dk/2), recomputed when the key is absent
  double rope_theta = 10000.0;
  Phi phi = Phi::kAvg;

  int64_t heads_per_group() const { return heads / groups; }

  // Throws nsa::Error naming the key, its value and what is allowed.
  void validate() const;

  // Parses a JSON object; absent keys take SPEC defaults, unknown keys are errors.
  static Config from_json(const std::string& text);
  static Config from_file(const std::string& path);
  std::string to_json() const;
};

}  // namespace nsa
