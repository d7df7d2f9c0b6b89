// The NSA attention layer: weights, a per-layer KV cache, prefill and decode (SPEC.md 2-4).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nsa/config.h"
#include "nsa/device.h"
#include "nsa/tensor.h"

namespace nsa {

class Backend;
class CacheState;

struct LayerOptions {
  Device device = Device::kCpu;
  DType dtype = DType::kF32;  // storage precision: kF32, kBF16 or kF16; accumulation is fp32+
  int threads = 0;            // CPU threads; 0 = all available
};

// Which optional inspection outputs to produce. Requesting any of them makes the layer compute
// every branch (no zero-gate skipping), so the outputs are complete.
struct InspectRequest {
  bool gates = false;
  bool sel_blocks = false;
  bool branch_outputs = false;
  bool reads = false;
  bool any() const { return gates || sel_blocks || branch_outputs || reads; }
  static InspectRequest all() { return {true, true, true, true}; }
};

struct Inspection {
  InspectRequest want;
  Tensor gates;       // [B, T, G, 3] f32, order cmp, sel, win
  Tensor sel_blocks;  // [B, T, G, n_sel] i32, ascending, -1 = unused
  Tensor o_cmp;       // [B, T, H, dv] f32
  Tensor o_sel;       // [B, T, H, dv] f32
  Tensor o_win;       // [B, T, H, dv] f32
  Tensor reads;       // [B, T, G, 3] i32: cmp, sel, win tokens read (SPEC.md section 5)
};

// KV cache of one layer for a batch of B sequences that all hold `length()` tokens.
class KVCache {
 public:
  KVCache();
  explicit KVCache(std::unique_ptr<CacheState> state);
  KVCache(KVCache&&) noexcept;
  KVCache& operator=(KVCache&&) noexcept;
  ~KVCache();

  int64_t batch() const;
  int64_t length() const;  // tokens appended so far per sequence (next absolute position)
  CacheState& state();

 private:
  std::unique_ptr<CacheState> state_;
};

// Names and shapes of the weights a config needs (SPEC.md section 2), in a stable order.
std::map<std::string, Shape> expected_weight_shapes(const Config& config);

class Layer {
 public:
  // `weights` maps SPEC names to F32, F16 or BF16 tensors; missing, extra or misshaped tensors
  // are errors naming the tensor.
  Layer(const Config& config, const std::map<std::string, Tensor>& weights,
        const LayerOptions& options = {});
  Layer(Layer&&) noexcept;
  Layer& operator=(Layer&&) noexcept;
  ~Layer();

  static Layer from_files(const std::string& config_json_path, const std::string& weights_path,
                          const LayerOptions& options = {});

  const Config& config() const { return config_; }
  const LayerOptions& options() const { return options_; }

  KVCache new_cache(int64_t batch) const;

  // x: [B, T, dim] float tensor (F32/F16/BF16), T >= 1; returns y [B, T, dim] f32.
  // Tokens take absolute positions cache.length() .. cache.length() + T - 1.
  Tensor prefill(KVCache& cache, const Tensor& x, Inspection* inspect = nullptr);
  // x: [B, 1, dim]; one decode step.
  Tensor decode(KVCache& cache, const Tensor& x, Inspection* inspect = nullptr);

  // Benchmark helpers (see Backend): a long random cache without prefill outputs, and timed
  // decode steps (x_steps: [B, 1, dim] f32 each; returns ms of the steps after `warmup`).
  void fill_random(KVCache& cache, int64_t S, uint64_t seed);
  std::vector<double> time_decode(KVCache& cache, const std::vector<Tensor>& x_steps,
                                  int64_t warmup, bool attention_only = false);

  Backend& backend() { return *backend_; }

 private:
  Tensor run(KVCache& cache, const Tensor& x, Inspection* inspect, bool is_decode);

  Config config_;
  LayerOptions options_;
  std::unique_ptr<Backend> backend_;
};

}  // namespace nsa
