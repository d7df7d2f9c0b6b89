// Deterministic random weights and inputs.
#include "nsa/init.h"

#include <cmath>
#include <random>

#include "nsa/layer.h"

namespace nsa {

namespace {

// Uniform in [-a, a) from the top 24 bits of a 64-bit draw: identical on every platform.
float uniform(std::mt19937_64& rng, float a) {
  const float u = static_cast<float>(rng() >> 40) * (1.0f / 16777216.0f);
  return (2.0f * u - 1.0f) * a;
}

}  // namespace

std::map<std::string, Tensor> random_weights(const Config& config, uint64_t seed) {
  std::map<std::string, Tensor> out;
  std::mt19937_64 rng(seed);
  for (const auto& [name, shape] : expected_weight_shapes(config)) {
    Tensor t(DType::kF32, shape);
    // Fan-in of a weight is its last dim; a bias shares its layer's fan-in.
    int64_t fan_in = shape.back();
    if (name == "gate.fc1.bias") fan_in = config.dk;
    if (name == "gate.fc2.bias") fan_in = config.gate_hidden;
    const float a = 1.0f / std::sqrt(static_cast<float>(fan_in));
    float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = uniform(rng, a);
    out.emplace(name, std::move(t));
  }
  return out;
}

Tensor random_normal(const Shape& shape, uint64_t seed) {
  Tensor t(DType::kF32, shape);
  std::mt19937_64 rng(seed);
  float* p = t.data<float>();
  // Box-Muller on platform-independent uniforms.
  for (int64_t i = 0; i < t.numel(); i += 2) {
    const double u1 = (static_cast<double>(rng() >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    const double u2 = static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
    const double r = std::sqrt(-2.0 * std::log(u1));
    p[i] = static_cast<float>(r * std::cos(6.283185307179586 * u2));
    if (i + 1 < t.numel()) p[i + 1] = static_cast<float>(r * std::sin(6.283185307179586 * u2));
  }
  return t;
}

void force_gate(std::map<std::string, Tensor>& weights, int branch) {
  NSA_CHECK(branch >= 0 && branch < 3, "branch must be 0 (cmp), 1 (sel) or 2 (win), got {}",
            branch);
  auto it = weights.find("gate.fc2.bias");
  NSA_CHECK(it != weights.end(), "missing weight tensor 'gate.fc2.bias'");
  Tensor bias(DType::kF32, {3});
  for (int i = 0; i < 3; ++i) bias.data<float>()[i] = i == branch ? 1000.f : -1000.f;
  it->second = std::move(bias);
}

}  // namespace nsa
