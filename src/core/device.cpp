// Device and storage-dtype names, and what this build and machine offer.
#include "nsa/device.h"

#include <fmt/format.h>

#include "nsa_commit.h"  // generated at build time (cmake/commit_header.cmake)

namespace nsa {

std::string to_string(Device device) { return device == Device::kCpu ? "cpu" : "cuda"; }

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::kCpu;
  if (name == "cuda") return Device::kCuda;
  NSA_FAIL("device '{}' is unknown; allowed: cpu, cuda", name);
}

DType parse_storage_dtype(const std::string& name) {
  if (name == "fp32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  if (name == "fp16") return DType::kF16;
  NSA_FAIL("dtype '{}' is unknown; allowed: fp32, bf16, fp16", name);
}

std::string storage_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    default:
      NSA_FAIL("{} is not a storage dtype", to_string(dtype));
  }
}

#ifndef NSA_WITH_CUDA
bool cuda_available() { return false; }
std::vector<std::string> cuda_devices() { return {}; }
double cuda_copy_bandwidth_gbs() { return 0.0; }
double cuda_read_bandwidth_gbs(size_t, int) { return 0.0; }
#endif

std::string build_info() {
  std::string s;
#ifdef NSA_VERSION
  s += fmt::format("version: {}\n", NSA_VERSION);
#endif
  s += fmt::format("commit: {}\n", NSA_GIT_COMMIT);
#ifdef NSA_BUILD_TYPE
  s += fmt::format("build type: {}\n", NSA_BUILD_TYPE);
#endif
  s += fmt::format("compiler: {}\n", __VERSION__);
#ifdef _OPENMP
  s += fmt::format("openmp: {}\n", _OPENMP);
#endif
#ifdef NSA_WITH_CUDA
  s += "cuda backend: built\n";
#else
  s += "cuda backend: not built\n";
#endif
  return s;
}

}  // namespace nsa
