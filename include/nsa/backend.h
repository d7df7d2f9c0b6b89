// The interface every compute backend (CPU reference, CUDA) implements behind nsa::Layer.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nsa/config.h"
#include "nsa/layer.h"

namespace nsa {

// Backend-owned KV cache state; `length` is the number of tokens each sequence holds.
class CacheState {
 public:
  virtual ~CacheState() = default;
  int64_t batch = 0;
  int64_t length = 0;
};

// Validated f32 host weights, already rounded to the layer's storage dtype.
struct LayerWeights {
  Tensor w_q;                         // [H*dk, dim]
  Tensor w_k_cmp, w_k_sel, w_k_win;   // [G*dk, dim]
  Tensor w_v_cmp, w_v_sel, w_v_win;   // [G*dv, dim]
  Tensor fc1_w, fc1_b, fc2_w, fc2_b;  // [g_hid, dk], [g_hid], [3, g_hid], [3]
  Tensor w_out;                       // [dim, H*dv]
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::unique_ptr<CacheState> new_cache(int64_t batch) const = 0;
  // Appends T tokens per sequence and computes their outputs.
  // x: [B, T, dim] f32 host (finite, already validated); y: [B, T, dim] f32 host.
  // `inspect` tensors, when requested, are already sized by the caller.
  virtual void forward(CacheState& cache, const float* x, int64_t T, float* y,
                       Inspection* inspect) = 0;
  // Appends S positions of random unit-variance keys/values to every sequence (compressed tokens
  // emitted as usual), for benchmarks that need a long cache but not prefill outputs.
  virtual void fill_random(CacheState& cache, int64_t S, uint64_t seed) = 0;
  // Runs one decode step per entry of xs ([B, dim] f32 each) and returns the milliseconds of each
  // step after the first `warmup`, timed the way the backend runs best (CPU: wall clock around
  // forward; CUDA: events around one CUDA-graph replay per step).
  // y_scratch: [B, dim] host buffer the CPU path writes outputs to. attention_only (CUDA): time
  // the attention kernels of the step without the two projection GEMMs.
  virtual std::vector<double> time_decode(CacheState& cache, const std::vector<const float*>& xs,
                                          int64_t warmup, float* y_scratch, bool attention_only);
  // Device milliseconds of the last forward's attention, everything between the input and the
  // output projections (CUDA: events around those kernels; host copies excluded); < 0 where the
  // backend does not measure it.
  virtual double attention_ms() const { return -1.0; }
};

std::unique_ptr<Backend> make_cpu_backend(const Config& config, LayerWeights weights,
                                          const LayerOptions& options);
#ifdef NSA_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(const Config& config, const LayerWeights& weights,
                                           const LayerOptions& options);
#endif

}  // namespace nsa
