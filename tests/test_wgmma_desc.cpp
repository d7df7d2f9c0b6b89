// The wgmma descriptor arithmetic of the prefill kernels (cuda/common/wgmma_desc.h), on the
// host: the one-add moves the kernels use must give exactly the descriptors built from the
// address, for every operand step and ring stage in shared memory.
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/common/wgmma_desc.h"

namespace {

using namespace nsa::cuda;

TEST(WgmmaDesc, EncodingOfTheFields) {
  // address 0x400 / 16 = 0x40 (bits 0-13), lbo 16 / 16 = 1 (bits 16-29), sbo 1024 / 16 = 0x40
  // (bits 32-45), 128-byte swizzle (bit 62).
  EXPECT_EQ(sw128_desc(0x400, 16, 1024), 0x4000004000010040ull);
  EXPECT_EQ(sw128_desc(0x400, kSwBlockBytes, 1024), 0x4000004002000040ull);
}

TEST(WgmmaDesc, MovedDescriptorsMatchRebuiltOnes) {
  constexpr uint32_t kSmem = 227 * 1024;
  constexpr uint32_t kStage = (192 + 128) * 64 * 2;  // one K + V stage at dk 192, dv 128
  int checked = 0;
  for (uint32_t base = 0; base + 3 * kStage <= kSmem; base += 1024) {
    for (uint32_t stage = 0; stage < 3; ++stage) {
      const uint32_t tile = base + stage * kStage;
      EXPECT_EQ(desc_moved(desc_k_major(base, 0), stage * kStage), desc_k_major(tile, 0));
      for (int ks = 0; ks < 12; ++ks) {
        ASSERT_EQ(desc_moved(desc_k_major(tile, 0), k_major_offset(ks)), desc_k_major(tile, ks))
            << "tile " << tile << " step " << ks;
        ++checked;
      }
      for (int kk = 0; kk < 4; ++kk) {
        ASSERT_EQ(desc_moved(desc_mn_major(tile, 0), mn_major_offset(kk)), desc_mn_major(tile, kk))
            << "tile " << tile << " step " << kk;
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

TEST(WgmmaDesc, OffsetsOfTheSteps) {
  EXPECT_EQ(k_major_offset(0), 0u);
  EXPECT_EQ(k_major_offset(3), 96u);
  EXPECT_EQ(k_major_offset(4), static_cast<uint32_t>(kSwBlockBytes));
  EXPECT_EQ(k_major_offset(11), static_cast<uint32_t>(2 * kSwBlockBytes + 96));
  EXPECT_EQ(mn_major_offset(3), 6144u);
}

}  // namespace
