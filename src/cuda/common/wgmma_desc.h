// Matrix descriptors of warpgroup-MMA (wgmma) operands in 128-byte-swizzled shared memory
// (the layout common/wgmma.cuh describes). Plain arithmetic, visible to the host too, so the
// tests check it without a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NSA_HD __host__ __device__
#else
#define NSA_HD
#endif

namespace nsa::cuda {

// Elements per row of a swizzled column block, and its bytes.
constexpr int kSwCols = 64;
constexpr int kSwBlockBytes = 64 * 128;

// Descriptor of a swizzled operand at shared address addr: lbo / sbo are the byte strides
// between 64-element column blocks (MN-major only) and between 8-row groups. Bits 0-13: address
// / 16; 16-29: lbo / 16; 32-45: sbo / 16; 62-63: the swizzle mode (1: 128 bytes).
NSA_HD constexpr uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t{1} << 62);
}

// Byte offset, from the tile's start, of the operand of K-major step ks (16 elements of K from
// column 16 ks: column block ks / 4, 32 bytes per step inside it) and of MN-major step kk (keys
// 16 kk .. 16 kk + 15: 16 rows of 128 bytes).
NSA_HD constexpr uint32_t k_major_offset(int ks) {
  return static_cast<uint32_t>((ks / 4) * kSwBlockBytes + (ks % 4) * 32);
}
NSA_HD constexpr uint32_t mn_major_offset(int kk) { return static_cast<uint32_t>(kk * 2048); }

// K-major B of S = Q K^T (rows = N) and MN-major B of O += P V (rows = K), step ks / kk.
NSA_HD constexpr uint64_t desc_k_major(uint32_t tile, int ks) {
  return sw128_desc(tile + k_major_offset(ks), 16, 1024);
}
NSA_HD constexpr uint64_t desc_mn_major(uint32_t tile, int kk) {
  return sw128_desc(tile + mn_major_offset(kk), kSwBlockBytes, 1024);
}

// The descriptor of the operand byte_off bytes (a multiple of 16) further on: shared addresses
// stay below 2^18, where the address field is linear, so the move is one 32-bit add on the low
// word (the per-MMA descriptor then costs one instruction, not a rebuild from the address).
NSA_HD constexpr uint64_t desc_moved(uint64_t desc, uint32_t byte_off) {
  return (desc & 0xFFFFFFFF00000000ull) |
         static_cast<uint32_t>(static_cast<uint32_t>(desc) + (byte_off >> 4));
}

}  // namespace nsa::cuda
