// Runtime choices of where and in which storage precision a layer runs.
#pragma once

#include <string>
#include <vector>

#include "nsa/tensor.h"

namespace nsa {

enum class Device { kCpu, kCuda };

std::string to_string(Device device);
Device parse_device(const std::string& name);        // "cpu" | "cuda"
DType parse_storage_dtype(const std::string& name);  // "fp32" | "bf16" | "fp16"
std::string storage_name(DType dtype);               // inverse of parse_storage_dtype

// True when this build has the CUDA backend and a CUDA device is present.
bool cuda_available();
// One human-readable line per CUDA device found (empty without CUDA).
std::vector<std::string> cuda_devices();
// Device-to-device copy bandwidth of CUDA device 0 in GB/s (bytes read + written), measured now
// with a 1 GiB copy (median of 10); 0 without CUDA.
double cuda_copy_bandwidth_gbs();
// Read bandwidth of CUDA device 0 in GB/s, measured now by a kernel that reads `bytes` `passes`
// times (loads cached in L2 only, median of 10); 0 without CUDA. One pass over 1 GiB measures
// device memory; many passes over a few MiB stay in L2 and measure it.
double cuda_read_bandwidth_gbs(size_t bytes, int passes);
// Build options, one "key: value" per line, for `nsa info`.
std::string build_info();

}  // namespace nsa
