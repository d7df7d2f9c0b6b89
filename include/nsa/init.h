// Deterministic random weights and inputs for tests, benchmarks and `nsa init`.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "nsa/config.h"
#include "nsa/tensor.h"

namespace nsa {

// nn.Linear-style init: U(-1/sqrt(in), 1/sqrt(in)) for every weight and bias of SPEC section 2.
std::map<std::string, Tensor> random_weights(const Config& config, uint64_t seed);

// Standard-normal f32 tensor.
Tensor random_normal(const Shape& shape, uint64_t seed);

// Sets gate.fc2.bias to +1000 for `branch` (0 cmp, 1 sel, 2 win) and -1000 for the others,
// which gives exactly one-hot gates (SPEC section 2, step 4).
void force_gate(std::map<std::string, Tensor>& weights, int branch);

}  // namespace nsa
