// A minimal owning host tensor: dtype, shape and contiguous row-major bytes.
// Used at API boundaries (files, inputs, inspection outputs); kernels see raw pointers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "nsa/error.h"

namespace nsa {

enum class DType { kF32, kF16, kBF16, kI32 };

std::string to_string(DType dtype);
size_t dtype_size(DType dtype);

using Shape = std::vector<int64_t>;
std::string to_string(const Shape& shape);
int64_t numel(const Shape& shape);

namespace detail {
// Allocator whose value-initialisation leaves bytes as they are, so a tensor that is about to
// be overwritten skips the zero fill (Tensor::uninitialized).
template <typename T>
struct NoInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <typename U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
}  // namespace detail

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape);  // zero-filled
  // A tensor whose contents are unspecified until written (for outputs that are written whole).
  static Tensor uninitialized(DType dtype, Shape shape);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(static_cast<size_t>(i)); }
  int64_t numel() const { return nsa::numel(shape_); }
  size_t nbytes() const { return bytes_.size(); }
  bool empty() const { return shape_.empty(); }

  std::byte* raw() { return bytes_.data(); }
  const std::byte* raw() const { return bytes_.data(); }

  template <typename T>
  T* data() {
    check_type<T>();
    return reinterpret_cast<T*>(bytes_.data());
  }
  template <typename T>
  const T* data() const {
    check_type<T>();
    return reinterpret_cast<const T*>(bytes_.data());
  }

  // Returns a float32 copy (F16/BF16/F32 input); throws for integer tensors.
  Tensor to_f32() const;

 private:
  // Shape checked and storage sized; zero-filled when `zero`.
  Tensor(DType dtype, Shape shape, bool zero);
  template <typename T>
  void check_type() const;

  DType dtype_ = DType::kF32;
  Shape shape_;
  std::vector<std::byte, detail::NoInitAllocator<std::byte>> bytes_;
};

template <>
inline void Tensor::check_type<float>() const {
  NSA_CHECK(dtype_ == DType::kF32, "tensor holds {}, not f32", to_string(dtype_));
}
template <>
inline void Tensor::check_type<int32_t>() const {
  NSA_CHECK(dtype_ == DType::kI32, "tensor holds {}, not i32", to_string(dtype_));
}
template <>
inline void Tensor::check_type<uint16_t>() const {
  NSA_CHECK(dtype_ == DType::kF16 || dtype_ == DType::kBF16, "tensor holds {}, not a 16-bit float",
            to_string(dtype_));
}

// Scalar conversions between float and the 16-bit storage formats (round to nearest even).
float bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float v);
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float v);
// Rounds a float to the nearest value representable in `dtype` (identity for F32).
float round_to(DType dtype, float v);
// Writes n floats as `dtype` (F32, BF16 or F16) to dst, threaded for large n.
void convert_from_f32(const float* src, int64_t n, DType dtype, void* dst);

}  // namespace nsa
