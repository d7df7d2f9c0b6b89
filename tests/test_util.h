// Shared helpers for the test suites: layers with random weights, an independent double-precision
// oracle for projections, RoPE and dense attention, and error metrics.
#pragma once

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "nsa/init.h"
#include "nsa/layer.h"

namespace nsa::test {

inline Config small_config() {
  Config c;
  c.dim = 48;
  c.heads = 4;
  c.groups = 2;
  c.dk = 8;
  c.dv = 6;
  c.l = 8;
  c.d = 4;
  c.l_sel = 16;
  c.n_sel = 5;
  c.w = 24;
  c.gate_hidden = 4;
  return c;
}

// force: -1 = learned gate, else the one-hot branch (0 cmp, 1 sel, 2 win).
inline Layer make_layer(const Config& c, uint64_t seed, int force = -1, DType dtype = DType::kF32) {
  auto w = random_weights(c, seed);
  if (force >= 0) force_gate(w, force);
  LayerOptions o;
  o.dtype = dtype;
  return Layer(c, w, o);
}

inline double rel_l2(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}
inline double rel_l2(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  return rel_l2(a.data<float>(), b.data<float>(), a.numel());
}

// Independent oracle: per-token projections in double, RoPE, dense attention.
struct Oracle {
  Config c;
  std::map<std::string, Tensor> w;

  // y = x W^T for one token; W is [out, in].
  std::vector<double> project(const std::string& name, const float* x) const {
    const Tensor& W = w.at(name);
    const int64_t out = W.dim(0), in = W.dim(1);
    std::vector<double> y(static_cast<size_t>(out));
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t i = 0; i < in; ++i) s += double(W.data<float>()[o * in + i]) * x[i];
      y[static_cast<size_t>(o)] = s;
    }
    return y;
  }
  void rope(double* v, int64_t pos) const {
    for (int64_t i = 0; i < c.dk / 2; ++i) {
      const double a = double(pos) * std::pow(c.rope_theta, -2.0 * double(i) / double(c.dk));
      const double x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
    }
  }
  // Rotated per-head vectors for tokens of one sequence: [T][heads][dk]
  std::vector<std::vector<double>> heads(const std::string& name, const float* x, int64_t T,
                                         int64_t n_heads, int64_t width, bool rotate) const {
    std::vector<std::vector<double>> out;
    for (int64_t t = 0; t < T; ++t) {
      auto v = project(name, x + t * c.dim);
      if (rotate) {
        for (int64_t hd = 0; hd < n_heads; ++hd) rope(&v[static_cast<size_t>(hd * width)], t);
      }
      out.push_back(std::move(v));
    }
    return out;
  }
  // Softmax attention of q (head qh of qs[t]) over keys `pos` of group g.
  static std::vector<double> attend(const std::vector<double>& q, int64_t qoff, int64_t dk,
                                    const std::vector<std::vector<double>>& K,
                                    const std::vector<std::vector<double>>& V, int64_t g,
                                    int64_t dv, const std::vector<int64_t>& pos) {
    std::vector<double> o(static_cast<size_t>(dv), 0.0);
    if (pos.empty()) return o;
    std::vector<double> s;
    double m = -INFINITY;
    for (int64_t p : pos) {
      double d = 0;
      for (int64_t k = 0; k < dk; ++k) d += q[size_t(qoff + k)] * K[size_t(p)][size_t(g * dk + k)];
      d /= std::sqrt(double(dk));
      s.push_back(d);
      m = std::max(m, d);
    }
    double sum = 0;
    for (double& v : s) sum += (v = std::exp(v - m));
    for (size_t i = 0; i < pos.size(); ++i)
      for (int64_t k = 0; k < dv; ++k)
        o[size_t(k)] += s[i] / sum * V[size_t(pos[i])][size_t(g * dv + k)];
    return o;
  }
};

}  // namespace nsa::test
