// The CPU reference backend: SPEC.md sections 2-5 as plain loops, threaded with OpenMP.
// Storage precision is emulated by rounding weights, activations and cache entries to it.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/blocks.h"
#include "nsa/backend.h"

namespace nsa {

namespace {

// Below this many multiply-adds a loop runs on one thread: waking a team costs more than it
// saves for a single decode step of a small layer, and far more when the cores are shared.
constexpr int64_t kParallelWork = int64_t{1} << 21;

struct Range {
  int64_t start, end;  // [start, end) rows
};

// Eight independent accumulators let the compiler vectorise without reassociating.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Full softmax attention of q over the key rows in `ranges`. Writes the normalised
// probabilities to p (one per key, in range order) and the output to out[dv].
// With no keys, out is zero and nothing is written to p.
void attend(const float* q, int64_t dk, float scale, const float* K, int64_t k_stride,
            const float* V, int64_t v_stride, int64_t dv, const Range* ranges, int64_t n_ranges,
            float* p, double* acc, float* out) {
  int64_t n = 0;
  float m = -INFINITY;
  for (int64_t r = 0; r < n_ranges; ++r) {
    for (int64_t row = ranges[r].start; row < ranges[r].end; ++row) {
      const float s = scale * dot(q, K + row * k_stride, dk);
      p[n++] = s;
      m = std::max(m, s);
    }
  }
  if (n == 0) {
    std::fill(out, out + dv, 0.f);
    return;
  }
  std::fill(acc, acc + dv, 0.0);
  double sum = 0.0;
  n = 0;
  for (int64_t r = 0; r < n_ranges; ++r) {
    for (int64_t row = ranges[r].start; row < ranges[r].end; ++row) {
      const double e = std::exp(static_cast<double>(p[n]) - m);
      p[n++] = static_cast<float>(e);
      sum += e;
      const float* v = V + row * v_stride;
      for (int64_t k = 0; k < dv; ++k) acc[k] += e * v[k];
    }
  }
  const double inv = 1.0 / sum;
  for (int64_t k = 0; k < dv; ++k) out[k] = static_cast<float>(acc[k] * inv);
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<float>(p[k] * inv);
}

struct CpuCache : CacheState {
  struct Seq {
    // Row-major [positions, G, dk|dv]; every position is kept (SPEC needs at least the last w
    // window rows and the last l raw cmp rows; keeping all keeps the reference simple).
    std::vector<float> k_cmp_raw, v_cmp_raw, k_sel, v_sel, k_win, v_win;
    std::vector<float> k_cmp, v_cmp;  // compressed stream [num_cmp, G, dk|dv]

    // The six per-position arrays in projection order, keys at even indices.
    std::array<std::vector<float>*, 6> raw() {
      return {&k_cmp_raw, &v_cmp_raw, &k_sel, &v_sel, &k_win, &v_win};
    }
  };
  std::vector<Seq> seqs;
};

// Per-thread working memory of attend_token, sized once per forward call.
struct Scratch {
  std::vector<float> p;           // [max keys] logits, then probabilities
  std::vector<double> acc;        // [dv]
  std::vector<double> score;      // [blocks]
  std::vector<double> u, hid;     // [dk], [gate_hidden]
  std::vector<float> oc, os, ow;  // [h * dv] per-branch outputs of the group
  std::vector<int32_t> blocks;    // [n_sel]
  std::vector<Range> ranges;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const Config& c, LayerWeights w, const LayerOptions& o)
      : c_(c),
        w_(std::move(w)),
        dtype_(o.dtype),
        threads_(o.threads > 0 ? o.threads : omp_get_max_threads()) {
    // One fused projection matrix: rows [q | k_cmp | v_cmp | k_sel | v_sel | k_win | v_win].
    const Tensor* parts[] = {&w_.w_q,     &w_.w_k_cmp, &w_.w_v_cmp, &w_.w_k_sel,
                             &w_.w_v_sel, &w_.w_k_win, &w_.w_v_win};
    for (const Tensor* t : parts) {
      w_in_.insert(w_in_.end(), t->data<float>(), t->data<float>() + t->numel());
    }
    proj_cols_ = static_cast<int64_t>(w_in_.size()) / c_.dim;
  }

  Device device() const override { return Device::kCpu; }

  std::unique_ptr<CacheState> new_cache(int64_t batch) const override {
    auto cache = std::make_unique<CpuCache>();
    cache->batch = batch;
    cache->seqs.resize(static_cast<size_t>(batch));
    return cache;
  }

  void fill_random(CacheState& state, int64_t S, uint64_t seed) override;
  void forward(CacheState& state, const float* x, int64_t T, float* y,
               Inspection* inspect) override;

 private:
  float rnd(float v) const { return round_to(dtype_, v); }
  void linear(const float* in, int64_t rows, int64_t in_dim, const float* W, int64_t out_dim,
              float* out) const;
  void emit(CpuCache::Seq& s, int64_t L) const;
  void append(CpuCache& cache, const std::vector<float>& proj, int64_t T) const;
  void attend_token(const CpuCache::Seq& seq, const float* q, int64_t t, int64_t g, float* o,
                    Inspection* inspect, int64_t row, Scratch& sc) const;

  Config c_;
  LayerWeights w_;
  DType dtype_;
  int threads_;
  std::vector<float> w_in_;
  int64_t proj_cols_ = 0;
};

void CpuBackend::linear(const float* in, int64_t rows, int64_t in_dim, const float* W,
                        int64_t out_dim, float* out) const {
  constexpr int64_t kChunk = 32;
  const int64_t chunks = (out_dim + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) schedule(static) \
    num_threads(threads_) if (rows * out_dim * in_dim > kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const float* xr = in + r * in_dim;
      for (int64_t o = ch * kChunk; o < std::min(out_dim, (ch + 1) * kChunk); ++o) {
        out[r * out_dim + o] = dot(xr, W + o * in_dim, in_dim);
      }
    }
  }
}

// Appends compressed token (L - l)/d when the count L emits one (SPEC section 4).
void CpuBackend::emit(CpuCache::Seq& s, int64_t L) const {
  const int64_t G = c_.groups, dk = c_.dk, dv = c_.dv;
  if (core::emits_cmp(L, c_.l, c_.d)) {
    for (auto [raw, cmp, width] :
         {std::tuple{&s.k_cmp_raw, &s.k_cmp, dk}, {&s.v_cmp_raw, &s.v_cmp, dv}}) {
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t k = 0; k < width; ++k) {
          double sum = 0.0;
          for (int64_t pos = L - c_.l; pos < L; ++pos)
            sum += (*raw)[static_cast<size_t>((pos * G + g) * width + k)];
          cmp->push_back(rnd(static_cast<float>(sum / static_cast<double>(c_.l))));
        }
      }
    }
  }
}

// RoPE, rounding to the storage dtype, cache append and compressed-token emission.
void CpuBackend::append(CpuCache& cache, const std::vector<float>& proj, int64_t T) const {
  const int64_t G = c_.groups, dk = c_.dk, dv = c_.dv, qw = c_.heads * dk;
  const int64_t len0 = cache.length;
  const int64_t B = cache.batch;
#pragma omp parallel for schedule(static) num_threads(threads_) if (B * T > 4)
  for (int64_t b = 0; b < B; ++b) {
    CpuCache::Seq& s = cache.seqs[static_cast<size_t>(b)];
    for (int64_t t = 0; t < T; ++t) {
      const float* row = proj.data() + (b * T + t) * proj_cols_ + qw;
      const float* src[6] = {row,
                             row + G * dk,
                             row + G * (dk + dv),
                             row + G * (2 * dk + dv),
                             row + G * (2 * dk + 2 * dv),
                             row + G * (3 * dk + 2 * dv)};
      const auto dst = s.raw();
      for (int i = 0; i < 6; ++i) {
        const bool is_key = i % 2 == 0;
        const int64_t width = G * (is_key ? dk : dv);
        std::vector<float>& out = *dst[i];
        const size_t at = out.size();
        out.insert(out.end(), src[i], src[i] + width);
        if (is_key) {
          for (int64_t g = 0; g < G; ++g)
            core::rope_inplace(&out[at + static_cast<size_t>(g * dk)], dk, len0 + t, c_.rope_theta);
        }
        for (size_t k = at; k < out.size(); ++k) out[k] = rnd(out[k]);
      }
      emit(s, len0 + t + 1);
    }
  }
  cache.length += T;
}

void CpuBackend::attend_token(const CpuCache::Seq& s, const float* q, int64_t t, int64_t g,
                              float* o, Inspection* inspect, int64_t row, Scratch& sc) const {
  const int64_t G = c_.groups, h = c_.heads_per_group(), dk = c_.dk, dv = c_.dv;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
  const float* qg = q + g * h * dk;

  // Gate from the mean of the group's rotated queries.
  std::vector<float>& p = sc.p;
  std::vector<double>&acc = sc.acc, &score = sc.score, &u = sc.u, &hid = sc.hid;
  std::fill(u.begin(), u.end(), 0.0);
  for (int64_t j = 0; j < h; ++j)
    for (int64_t k = 0; k < dk; ++k) u[static_cast<size_t>(k)] += qg[j * dk + k];
  for (double& v : u) v /= static_cast<double>(h);
  const float* fc1w = w_.fc1_w.data<float>();
  for (int64_t i = 0; i < c_.gate_hidden; ++i) {
    double a = w_.fc1_b.data<float>()[i];
    for (int64_t k = 0; k < dk; ++k) a += fc1w[i * dk + k] * u[static_cast<size_t>(k)];
    hid[static_cast<size_t>(i)] = a / (1.0 + std::exp(-a));
  }
  double z[3];
  for (int64_t i = 0; i < 3; ++i) {
    double a = w_.fc2_b.data<float>()[i];
    for (int64_t k = 0; k < c_.gate_hidden; ++k)
      a += w_.fc2_w.data<float>()[i * c_.gate_hidden + k] * hid[static_cast<size_t>(k)];
    z[i] = a;
  }
  double gate[3];
  if (c_.gate == GateKind::kSoftmax) {
    const double m = std::max({z[0], z[1], z[2]}) / c_.gate_temp;
    double sum = 0.0;
    for (int i = 0; i < 3; ++i) sum += (gate[i] = std::exp(z[i] / c_.gate_temp - m));
    for (double& v : gate) v /= sum;
  } else {
    for (int i = 0; i < 3; ++i) gate[i] = 1.0 / (1.0 + std::exp(-z[i]));
  }

  const bool all = inspect != nullptr && inspect->want.any();
  const bool need_cmp = all || gate[0] != 0.0;
  const bool need_sel = all || gate[1] != 0.0;
  const bool need_win = all || gate[2] != 0.0;

  const int64_t L = t + 1;
  const int64_t n_cmp = core::num_cmp(L, c_.l, c_.d);
  const int64_t complete = L / c_.l_sel;
  std::vector<float>&oc = sc.oc, &os = sc.os, &ow = sc.ow;
  for (auto* v : {&oc, &os, &ow}) std::fill(v->begin(), v->end(), 0.f);
  std::fill(score.begin(), score.begin() + complete, 0.0);
  if (need_cmp || need_sel) {
    const Range r{0, n_cmp};
    for (int64_t j = 0; j < h; ++j) {
      attend(qg + j * dk, dk, scale, s.k_cmp.data() + g * dk, G * dk, s.v_cmp.data() + g * dv,
             G * dv, dv, &r, 1, p.data(), acc.data(), &oc[static_cast<size_t>(j * dv)]);
      if (need_sel) core::add_block_scores(p.data(), n_cmp, c_, score.data(), complete);
    }
  }
  std::vector<int32_t>& blocks = sc.blocks;
  std::fill(blocks.begin(), blocks.end(), -1);
  int64_t n_blocks = 0;
  if (need_sel) {
    n_blocks = core::select_blocks(score.data(), t, c_, blocks.data());
    std::vector<Range>& ranges = sc.ranges;
    ranges.clear();
    for (int64_t k = 0; k < n_blocks; ++k) {
      const int64_t start = blocks[static_cast<size_t>(k)] * c_.l_sel;
      const int64_t end = std::min(start + c_.l_sel, L);
      if (!ranges.empty() && ranges.back().end == start) {
        ranges.back().end = end;
      } else {
        ranges.push_back({start, end});
      }
    }
    for (int64_t j = 0; j < h; ++j) {
      attend(qg + j * dk, dk, scale, s.k_sel.data() + g * dk, G * dk, s.v_sel.data() + g * dv,
             G * dv, dv, ranges.data(), static_cast<int64_t>(ranges.size()), p.data(), acc.data(),
             &os[static_cast<size_t>(j * dv)]);
    }
  }
  if (need_win) {
    const Range r{std::max<int64_t>(0, t - c_.w + 1), c_.w > 0 ? L : 0};
    for (int64_t j = 0; j < h; ++j) {
      attend(qg + j * dk, dk, scale, s.k_win.data() + g * dk, G * dk, s.v_win.data() + g * dv,
             G * dv, dv, &r, r.end > r.start ? 1 : 0, p.data(), acc.data(),
             &ow[static_cast<size_t>(j * dv)]);
    }
  }

  for (int64_t k = 0; k < h * dv; ++k) {
    double v = 0.0;
    if (gate[0] != 0.0) v += gate[0] * oc[static_cast<size_t>(k)];
    if (gate[1] != 0.0) v += gate[1] * os[static_cast<size_t>(k)];
    if (gate[2] != 0.0) v += gate[2] * ow[static_cast<size_t>(k)];
    o[g * h * dv + k] = rnd(static_cast<float>(v));
  }

  if (!all) return;
  const int64_t H = c_.heads;
  if (inspect->want.gates) {
    for (int i = 0; i < 3; ++i)
      inspect->gates.data<float>()[(row * G + g) * 3 + i] = static_cast<float>(gate[i]);
  }
  if (inspect->want.sel_blocks) {
    std::copy(blocks.begin(), blocks.end(),
              inspect->sel_blocks.data<int32_t>() + (row * G + g) * c_.n_sel);
  }
  if (inspect->want.branch_outputs) {
    const int64_t at = (row * H + g * h) * dv;
    std::copy(oc.begin(), oc.end(), inspect->o_cmp.data<float>() + at);
    std::copy(os.begin(), os.end(), inspect->o_sel.data<float>() + at);
    std::copy(ow.begin(), ow.end(), inspect->o_win.data<float>() + at);
  }
  if (inspect->want.reads) {
    const core::Reads r =
        core::actual_reads(t, core::selected_tokens(blocks.data(), n_blocks, t, c_.l_sel), c_);
    int32_t* dst = inspect->reads.data<int32_t>() + (row * G + g) * 3;
    dst[0] = static_cast<int32_t>(r.cmp);
    dst[1] = static_cast<int32_t>(r.sel);
    dst[2] = static_cast<int32_t>(r.win);
  }
}

void CpuBackend::forward(CacheState& state, const float* x, int64_t T, float* y,
                         Inspection* inspect) {
  auto& cache = static_cast<CpuCache&>(state);
  const int64_t B = cache.batch, G = c_.groups, dim = c_.dim;
  const int64_t rows = B * T, len0 = cache.length;

  std::vector<float> xr(x, x + rows * dim);
  for (float& v : xr) v = rnd(v);
  std::vector<float> proj(static_cast<size_t>(rows * proj_cols_));
  linear(xr.data(), rows, dim, w_in_.data(), proj_cols_, proj.data());
  // Rotate and round the queries in place (they are the first H*dk columns).
#pragma omp parallel for schedule(static) num_threads(threads_) if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    float* q = proj.data() + r * proj_cols_;
    for (int64_t hd = 0; hd < c_.heads; ++hd)
      core::rope_inplace(q + hd * c_.dk, c_.dk, len0 + r % T, c_.rope_theta);
    for (int64_t k = 0; k < c_.heads * c_.dk; ++k) q[k] = rnd(q[k]);
  }
  append(cache, proj, T);

  const int64_t L_max = len0 + T;
  const int64_t max_keys = std::max(
      {core::num_cmp(L_max, c_.l, c_.d), c_.n_sel * c_.l_sel, std::min(c_.w, L_max), int64_t{1}});
  const int64_t hdv = c_.heads * c_.dv;
  std::vector<float> o(static_cast<size_t>(rows * hdv));
#pragma omp parallel num_threads(threads_) if (rows * G * max_keys * c_.heads * c_.dk > \
                                               kParallelWork)
  {
    Scratch sc;
    sc.p.resize(static_cast<size_t>(max_keys));
    sc.acc.resize(static_cast<size_t>(c_.dv));
    sc.score.resize(static_cast<size_t>(L_max / c_.l_sel + 1));
    sc.u.resize(static_cast<size_t>(c_.dk));
    sc.hid.resize(static_cast<size_t>(c_.gate_hidden));
    for (auto* v : {&sc.oc, &sc.os, &sc.ow})
      v->resize(static_cast<size_t>(c_.heads_per_group() * c_.dv));
    sc.blocks.resize(static_cast<size_t>(c_.n_sel));
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t b = r / T, t = len0 + r % T;
        attend_token(cache.seqs[static_cast<size_t>(b)], proj.data() + r * proj_cols_, t, g,
                     o.data() + r * hdv, inspect, r, sc);
      }
    }
  }
  linear(o.data(), rows, hdv, w_.w_out.data<float>(), dim, y);
}

void CpuBackend::fill_random(CacheState& state, int64_t S, uint64_t seed) {
  auto& cache = static_cast<CpuCache&>(state);
  const int64_t G = c_.groups, len0 = cache.length;
  std::mt19937_64 rng(seed);
  auto draw = [&] {  // unit variance, like the CUDA fill
    return rnd((static_cast<float>(rng() >> 40) * (1.f / 16777216.f) * 2.f - 1.f) * 1.7320508f);
  };
  for (auto& s : cache.seqs) {
    for (int64_t t = 0; t < S; ++t) {
      const auto arrays = s.raw();
      for (size_t i = 0; i < arrays.size(); ++i) {
        const int64_t width = G * (i % 2 == 0 ? c_.dk : c_.dv);
        for (int64_t e = 0; e < width; ++e) arrays[i]->push_back(draw());
      }
      emit(s, len0 + t + 1);
    }
  }
  cache.length += S;
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Config& config, LayerWeights weights,
                                          const LayerOptions& options) {
  return std::make_unique<CpuBackend>(config, std::move(weights), options);
}

}  // namespace nsa
