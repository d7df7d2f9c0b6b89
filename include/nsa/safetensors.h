// Reading and writing safetensors files (F32, F16, BF16 and I32 tensors).
#pragma once

#include <map>
#include <string>

#include "nsa/tensor.h"

namespace nsa {

// Throws nsa::Error naming the file and the problem for unreadable, truncated or corrupt files
// and for tensors of a dtype other than F32, F16, BF16 and I32.
std::map<std::string, Tensor> load_safetensors(const std::string& path);
void save_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors);

}  // namespace nsa
