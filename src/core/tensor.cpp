// Host tensor, dtype names and 16-bit float conversions.
#include "nsa/tensor.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

namespace nsa {

namespace detail {
void throw_error(const char* file, int line, const std::string& msg) {
  (void)file;
  (void)line;
  throw Error(msg);
}
}  // namespace detail

std::string to_string(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kI32:
      return "I32";
  }
  return "?";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  return 0;
}

std::string to_string(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

Tensor::Tensor(DType dtype, Shape shape, bool zero) : dtype_(dtype), shape_(std::move(shape)) {
  for (int64_t v : shape_)
    NSA_CHECK(v >= 0, "negative tensor dimension in shape {}", to_string(shape_));
  const size_t bytes = static_cast<size_t>(nsa::numel(shape_)) * dtype_size(dtype_);
  if (zero) {
    bytes_.assign(bytes, std::byte{0});
  } else {
    bytes_.resize(bytes);  // the allocator leaves the bytes as they are
  }
}

Tensor::Tensor(DType dtype, Shape shape) : Tensor(dtype, std::move(shape), true) {}

Tensor Tensor::uninitialized(DType dtype, Shape shape) {
  return Tensor(dtype, std::move(shape), false);
}

Tensor Tensor::to_f32() const {
  Tensor out(DType::kF32, shape_);
  float* dst = out.data<float>();
  const int64_t n = numel();
  switch (dtype_) {
    case DType::kF32:
      std::memcpy(dst, raw(), nbytes());
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(data<uint16_t>()[i]);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(data<uint16_t>()[i]);
      break;
    case DType::kI32:
      NSA_FAIL("cannot convert an I32 tensor to F32");
  }
  return out;
}

float bf16_to_f32(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

uint16_t f32_to_bf16(float v) {
  uint32_t u = std::bit_cast<uint32_t>(v);
  if (std::isnan(v)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float mag = std::ldexp(static_cast<float>(man), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t f32_to_f16(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  if (std::isnan(v)) return sign | 0x7e00;
  const float a = std::fabs(v);
  if (a >= 65520.0f) return sign | 0x7c00;            // overflow to inf (65520 rounds up)
  if (a < 6.103515625e-05f) {                         // subnormal range: quantum 2^-24
    const float q = std::nearbyint(a * 16777216.0f);  // ties to even under default rounding
    return sign | static_cast<uint16_t>(q);
  }
  // Normal: keep 10 mantissa bits with round-to-nearest-even on the f32 bits.
  uint32_t m = u & 0x7fffffffu;
  m += 0xfff + ((m >> 13) & 1);
  const uint32_t exp = (m >> 23) - 112;
  return sign | static_cast<uint16_t>((exp << 10) | ((m >> 13) & 0x3ff));
}

void convert_from_f32(const float* src, int64_t n, DType dtype, void* dst) {
  NSA_CHECK(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16,
            "cannot convert floats to {}", to_string(dtype));
  if (dtype == DType::kF32) {
    // Threaded for large n: the copy also takes a fresh destination's first-touch page faults.
    constexpr int64_t kChunk = int64_t{1} << 18;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    auto* out = static_cast<float*>(dst);
#pragma omp parallel for schedule(static) if (chunks > 4)
    for (int64_t c = 0; c < chunks; ++c) {
      std::memcpy(out + c * kChunk, src + c * kChunk,
                  static_cast<size_t>(std::min(kChunk, n - c * kChunk)) * sizeof(float));
    }
    return;
  }
  auto* out = static_cast<uint16_t*>(dst);
  const bool bf16 = dtype == DType::kBF16;
#pragma omp parallel for schedule(static) if (n > (int64_t{1} << 20))
  for (int64_t i = 0; i < n; ++i) out[i] = bf16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
}

float round_to(DType dtype, float v) {
  switch (dtype) {
    case DType::kBF16:
      return bf16_to_f32(f32_to_bf16(v));
    case DType::kF16:
      return f16_to_f32(f32_to_f16(v));
    default:
      return v;
  }
}

}  // namespace nsa
