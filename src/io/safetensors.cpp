// safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
#include "nsa/safetensors.h"

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace nsa {

namespace {

using Json = nlohmann::json;

DType parse_dtype(const std::string& path, const std::string& name, const std::string& s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  if (s == "I32") return DType::kI32;
  NSA_FAIL("{}: tensor '{}' has dtype {}; supported: F32, F16, BF16, I32", path, name, s);
}

}  // namespace

std::map<std::string, Tensor> load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NSA_CHECK(in.good(), "cannot open safetensors file '{}'", path);
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  NSA_CHECK(file_size >= 8, "{}: not a safetensors file (only {} bytes)", path, file_size);
  unsigned char len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  // A directory opens and reports a huge size on Linux; only the read fails.
  NSA_CHECK(in.good(), "{}: cannot read the safetensors header length (not a regular file?)", path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  NSA_CHECK(header_len <= file_size - 8,
            "{}: corrupt or truncated safetensors file (header length {} exceeds file size {})",
            path, header_len, file_size);
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  NSA_CHECK(in.good(), "{}: failed to read the safetensors header", path);
  Json j;
  try {
    j = Json::parse(header);
  } catch (const Json::parse_error& e) {
    NSA_FAIL("{}: corrupt safetensors header (not JSON): {}", path, e.what());
  }
  NSA_CHECK(j.is_object(), "{}: corrupt safetensors header (not a JSON object)", path);
  const uint64_t data_size = file_size - 8 - header_len;

  std::map<std::string, Tensor> out;
  for (const auto& [name, info] : j.items()) {
    if (name == "__metadata__") continue;
    NSA_CHECK(info.is_object() && info.contains("dtype") && info.contains("shape") &&
                  info.contains("data_offsets") && info["dtype"].is_string() &&
                  info["shape"].is_array() && info["data_offsets"].is_array() &&
                  info["data_offsets"].size() == 2,
              "{}: corrupt safetensors header entry for tensor '{}'", path, name);
    const DType dtype = parse_dtype(path, name, info["dtype"].get<std::string>());
    Shape shape;
    uint64_t count = 1;
    for (const Json& dim : info["shape"]) {
      NSA_CHECK(dim.is_number_unsigned(), "{}: tensor '{}' has an invalid shape entry {}", path,
                name, dim.dump());
      const uint64_t v = dim.get<uint64_t>();
      NSA_CHECK(v < (uint64_t{1} << 40) && (v == 0 || count <= (uint64_t{1} << 40) / v),
                "{}: tensor '{}' has an implausible shape {}", path, name, info["shape"].dump());
      count *= v;
      shape.push_back(static_cast<int64_t>(v));
    }
    const Json& offs = info["data_offsets"];
    NSA_CHECK(offs[0].is_number_unsigned() && offs[1].is_number_unsigned(),
              "{}: tensor '{}' has invalid data_offsets", path, name);
    const uint64_t begin = offs[0].get<uint64_t>(), end = offs[1].get<uint64_t>();
    NSA_CHECK(begin <= end && end <= data_size,
              "{}: corrupt or truncated file: tensor '{}' spans bytes [{}, {}) but the data "
              "section has {} bytes",
              path, name, begin, end, data_size);
    NSA_CHECK(end - begin == count * dtype_size(dtype),
              "{}: tensor '{}' has {} data bytes but shape {} of {} needs {}", path, name,
              end - begin, info["shape"].dump(), to_string(dtype), count * dtype_size(dtype));
    Tensor t(dtype, shape);
    in.seekg(static_cast<std::streamoff>(8 + header_len + begin));
    in.read(reinterpret_cast<char*>(t.raw()), static_cast<std::streamsize>(end - begin));
    NSA_CHECK(in.good(), "{}: failed to read the data of tensor '{}'", path, name);
    out.emplace(name, std::move(t));
  }
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors) {
  Json header = Json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", to_string(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  NSA_CHECK(out.good(), "cannot open '{}' for writing", path);
  unsigned char len_bytes[8];
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(len >> (8 * i));
  out.write(reinterpret_cast<const char*>(len_bytes), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors) {
    out.write(reinterpret_cast<const char*>(t.raw()), static_cast<std::streamsize>(t.nbytes()));
  }
  NSA_CHECK(out.good(), "failed writing '{}'", path);
}

}  // namespace nsa
