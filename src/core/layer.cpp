// nsa::Layer: validates weights and inputs, sizes inspection outputs, dispatches to a backend.
#include "nsa/layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "nsa/backend.h"
#include "nsa/safetensors.h"

namespace nsa {

KVCache::KVCache() = default;
KVCache::KVCache(std::unique_ptr<CacheState> state) : state_(std::move(state)) {}
KVCache::KVCache(KVCache&&) noexcept = default;
KVCache& KVCache::operator=(KVCache&&) noexcept = default;
KVCache::~KVCache() = default;

int64_t KVCache::batch() const { return state_ ? state_->batch : 0; }
int64_t KVCache::length() const { return state_ ? state_->length : 0; }
CacheState& KVCache::state() {
  NSA_CHECK(state_ != nullptr, "KV cache is empty; create it with Layer::new_cache(batch)");
  return *state_;
}

std::map<std::string, Shape> expected_weight_shapes(const Config& c) {
  const int64_t H = c.heads, G = c.groups;
  return {{"W_Q.weight", {H * c.dk, c.dim}},
          {"W_K_cmp.weight", {G * c.dk, c.dim}},
          {"W_K_sel.weight", {G * c.dk, c.dim}},
          {"W_K_win.weight", {G * c.dk, c.dim}},
          {"W_V_cmp.weight", {G * c.dv, c.dim}},
          {"W_V_sel.weight", {G * c.dv, c.dim}},
          {"W_V_win.weight", {G * c.dv, c.dim}},
          {"gate.fc1.weight", {c.gate_hidden, c.dk}},
          {"gate.fc1.bias", {c.gate_hidden}},
          {"gate.fc2.weight", {3, c.gate_hidden}},
          {"gate.fc2.bias", {3}},
          {"out.weight", {c.dim, H * c.dv}}};
}

namespace {

LayerWeights validate_weights(const Config& c, const std::map<std::string, Tensor>& weights,
                              DType storage) {
  const auto expected = expected_weight_shapes(c);
  for (const auto& [name, t] : weights) {
    NSA_CHECK(expected.contains(name),
              "unexpected weight tensor '{}' (shape {}); this config needs exactly: W_Q.weight, "
              "W_K_{{cmp,sel,win}}.weight, W_V_{{cmp,sel,win}}.weight, gate.fc1.{{weight,bias}}, "
              "gate.fc2.{{weight,bias}}, out.weight",
              name, to_string(t.shape()));
  }
  std::map<std::string, Tensor> ok;
  for (const auto& [name, shape] : expected) {
    auto it = weights.find(name);
    NSA_CHECK(it != weights.end(), "missing weight tensor '{}' (expected shape {})", name,
              to_string(shape));
    const Tensor& t = it->second;
    NSA_CHECK(t.dtype() != DType::kI32, "weight tensor '{}' has dtype {}; allowed: F32, F16, BF16",
              name, to_string(t.dtype()));
    NSA_CHECK(t.shape() == shape, "weight tensor '{}' has shape {}; expected {} for this config",
              name, to_string(t.shape()), to_string(shape));
    Tensor f = t.to_f32();
    float* p = f.data<float>();
    for (int64_t i = 0; i < f.numel(); ++i) {
      NSA_CHECK(std::isfinite(p[i]), "weight tensor '{}' has a non-finite value at flat index {}",
                name, i);
      // Gate parameters stay f32: they are tiny, and rounding fc2.bias = +-1000 would still be
      // exact.
      if (name.rfind("gate.", 0) != 0) p[i] = round_to(storage, p[i]);
    }
    ok.emplace(name, std::move(f));
  }
  LayerWeights w;
  w.w_q = std::move(ok.at("W_Q.weight"));
  w.w_k_cmp = std::move(ok.at("W_K_cmp.weight"));
  w.w_k_sel = std::move(ok.at("W_K_sel.weight"));
  w.w_k_win = std::move(ok.at("W_K_win.weight"));
  w.w_v_cmp = std::move(ok.at("W_V_cmp.weight"));
  w.w_v_sel = std::move(ok.at("W_V_sel.weight"));
  w.w_v_win = std::move(ok.at("W_V_win.weight"));
  w.fc1_w = std::move(ok.at("gate.fc1.weight"));
  w.fc1_b = std::move(ok.at("gate.fc1.bias"));
  w.fc2_w = std::move(ok.at("gate.fc2.weight"));
  w.fc2_b = std::move(ok.at("gate.fc2.bias"));
  w.w_out = std::move(ok.at("out.weight"));
  return w;
}

}  // namespace

Layer::Layer(const Config& config, const std::map<std::string, Tensor>& weights,
             const LayerOptions& options)
    : config_(config), options_(options) {
  config_.validate();
  NSA_CHECK(
      options.dtype == DType::kF32 || options.dtype == DType::kBF16 || options.dtype == DType::kF16,
      "storage dtype {} is not supported; allowed: fp32, bf16, fp16", to_string(options.dtype));
  NSA_CHECK(options.threads >= 0, "threads must be >= 0 (0 = all), got {}", options.threads);
  LayerWeights w = validate_weights(config_, weights, options.dtype);
  switch (options.device) {
    case Device::kCpu:
      backend_ = make_cpu_backend(config_, std::move(w), options_);
      break;
    case Device::kCuda:
#ifdef NSA_WITH_CUDA
      NSA_CHECK(cuda_available(), "device 'cuda' requested but no CUDA device is present");
      backend_ = make_cuda_backend(config_, w, options_);
      break;
#else
      NSA_FAIL(
          "device 'cuda' requested but this build has no CUDA backend (rebuild with "
          "-DNSA_CUDA=ON on a machine with nvcc)");
#endif
  }
}

Layer::Layer(Layer&&) noexcept = default;
Layer& Layer::operator=(Layer&&) noexcept = default;
Layer::~Layer() = default;

Layer Layer::from_files(const std::string& config_json_path, const std::string& weights_path,
                        const LayerOptions& options) {
  return Layer(Config::from_file(config_json_path), load_safetensors(weights_path), options);
}

KVCache Layer::new_cache(int64_t batch) const {
  NSA_CHECK(batch >= 1, "batch must be >= 1, got {}", batch);
  return KVCache(backend_->new_cache(batch));
}

Tensor Layer::prefill(KVCache& cache, const Tensor& x, Inspection* inspect) {
  return run(cache, x, inspect, false);
}

Tensor Layer::decode(KVCache& cache, const Tensor& x, Inspection* inspect) {
  return run(cache, x, inspect, true);
}

void Layer::fill_random(KVCache& cache, int64_t S, uint64_t seed) {
  NSA_CHECK(S >= 0, "fill_random: S must be >= 0, got {}", S);
  backend_->fill_random(cache.state(), S, seed);
}

std::vector<double> Layer::time_decode(KVCache& cache, const std::vector<Tensor>& x_steps,
                                       int64_t warmup, bool attention_only) {
  CacheState& state = cache.state();
  std::vector<const float*> xs;
  for (const Tensor& x : x_steps) {
    NSA_CHECK(x.dtype() == DType::kF32 && x.shape() == (Shape{state.batch, 1, config_.dim}),
              "time_decode: each step must be an F32 tensor of shape [{}, 1, {}], got {} {}",
              state.batch, config_.dim, to_string(x.dtype()), to_string(x.shape()));
    xs.push_back(x.data<float>());
  }
  NSA_CHECK(warmup >= 0 && warmup < static_cast<int64_t>(xs.size()),
            "time_decode: warmup {} must be in [0, {})", warmup, xs.size());
  std::vector<float> y(static_cast<size_t>(state.batch * config_.dim));
  return backend_->time_decode(state, xs, warmup, y.data(), attention_only);
}

std::vector<double> Backend::time_decode(CacheState& cache, const std::vector<const float*>& xs,
                                         int64_t warmup, float* y_scratch, bool attention_only) {
  NSA_CHECK(!attention_only, "attention-only timing needs the CUDA backend");
  std::vector<double> ms;
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    forward(cache, xs[i], 1, y_scratch, nullptr);
    const auto dt = std::chrono::steady_clock::now() - t0;
    if (static_cast<int64_t>(i) >= warmup)
      ms.push_back(std::chrono::duration<double, std::milli>(dt).count());
  }
  return ms;
}

Tensor Layer::run(KVCache& cache, const Tensor& x, Inspection* inspect, bool is_decode) {
  const char* op = is_decode ? "decode" : "prefill";
  CacheState& state = cache.state();
  NSA_CHECK(x.shape().size() == 3, "{}: x must have shape [B, T, dim], got {}", op,
            to_string(x.shape()));
  const int64_t B = x.dim(0), T = x.dim(1);
  NSA_CHECK(B == state.batch, "{}: x has batch {} but the cache holds {} sequences", op, B,
            state.batch);
  NSA_CHECK(x.dim(2) == config_.dim, "{}: x has width {} but the layer's dim is {}", op, x.dim(2),
            config_.dim);
  NSA_CHECK(T >= 1, "{}: x must hold at least one token, got T = {}", op, T);
  NSA_CHECK(!is_decode || T == 1, "decode: x must hold exactly one token per sequence, got T = {}",
            T);
  NSA_CHECK(x.dtype() != DType::kI32, "{}: x has dtype I32; allowed: F32, F16, BF16", op);
  Tensor xf;  // F32 input is read in place
  if (x.dtype() != DType::kF32) xf = x.to_f32();
  const float* xp = x.dtype() == DType::kF32 ? x.data<float>() : xf.data<float>();
  const int64_t n = x.numel();
  int64_t first_bad = n;
#pragma omp parallel for reduction(min : first_bad) if (n > (int64_t{1} << 20))
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(xp[i])) first_bad = std::min(first_bad, i);
  }
  NSA_CHECK(first_bad == n, "{}: x has a non-finite value at [{}, {}, {}]", op,
            first_bad / (T * config_.dim), (first_bad / config_.dim) % T, first_bad % config_.dim);
  const int64_t G = config_.groups, H = config_.heads;
  if (inspect != nullptr) {
    const InspectRequest& want = inspect->want;
    inspect->gates = want.gates ? Tensor(DType::kF32, {B, T, G, 3}) : Tensor();
    inspect->sel_blocks =
        want.sel_blocks ? Tensor(DType::kI32, {B, T, G, config_.n_sel}) : Tensor();
    inspect->o_cmp = want.branch_outputs ? Tensor(DType::kF32, {B, T, H, config_.dv}) : Tensor();
    inspect->o_sel = want.branch_outputs ? Tensor(DType::kF32, {B, T, H, config_.dv}) : Tensor();
    inspect->o_win = want.branch_outputs ? Tensor(DType::kF32, {B, T, H, config_.dv}) : Tensor();
    inspect->reads = want.reads ? Tensor(DType::kI32, {B, T, G, 3}) : Tensor();
  }
  // Every backend writes every element of y: no zero fill (671 MB for a 64k-token prefill at
  // dim 2560).
  Tensor y = Tensor::uninitialized(DType::kF32, {B, T, config_.dim});
  backend_->forward(state, xp, T, y.data<float>(), inspect);
  return y;
}

}  // namespace nsa
