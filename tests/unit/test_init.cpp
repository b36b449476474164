// Known answers of SPEC sections 2.1 (initialisation) and 2.2 (synthetic data), and the
// properties that make every layout start from the same weights.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "common/data.h"
#include "common/init.h"
#include "common/model.h"

namespace pb {
namespace {

TEST(SpecInit, KnownAnswers) {
  EXPECT_EQ(fnv1a64("embed.tok"), 0x1b80f1fec2406726ull);
  // u() is exact in double: compare bitwise.
  EXPECT_EQ(spec_uniform(1234, "embed.tok", 0), 0.38244705155401815);
  EXPECT_EQ(spec_uniform(1234, "embed.tok", 1), 0.40739868542495206);
  EXPECT_EQ(spec_uniform(1234, "block0.attn.qkv.w", 12345), 0.8237545596542627);
}

TEST(SpecInit, ValuesFollowTheRule) {
  // value = std·√3·(2u − 1), std 0.02 for qkv, 0.02/√(2L) for the residual projections.
  const int layers = 4;
  float v = 0.0f;
  init_values(&v, 1234, "block0.attn.qkv.w", layers, 12345, 1);
  EXPECT_FLOAT_EQ(v, static_cast<float>(0.02 * std::sqrt(3.0) * (2.0 * 0.8237545596542627 - 1.0)));
  init_values(&v, 1234, "block1.attn.out.w", layers, 7, 1);
  const double u = spec_uniform(1234, "block1.attn.out.w", 7);
  EXPECT_FLOAT_EQ(v, static_cast<float>(0.02 / std::sqrt(2.0 * layers) * std::sqrt(3.0) * (2.0 * u - 1.0)));
  init_values(&v, 1234, "block1.ln2.g", layers, 3, 1);
  EXPECT_EQ(v, 1.0f);
  init_values(&v, 1234, "block1.mlp.fc1.b", layers, 3, 1);
  EXPECT_EQ(v, 0.0f);
}

TEST(SpecInit, AnySliceEqualsTheSameRangeOfTheWhole) {
  std::vector<float> whole(1000), part(300);
  init_values(whole.data(), 99, "head.w", 2, 0, whole.size());
  init_values(part.data(), 99, "head.w", 2, 450, part.size());
  for (std::size_t i = 0; i < part.size(); ++i) ASSERT_EQ(part[i], whole[450 + i]) << i;
  // Uniform with std 0.02: mean near 0, std near 0.02, bounded by √3·std.
  double sum = 0.0, sq = 0.0;
  for (float x : whole) {
    sum += x;
    sq += x * x;
    ASSERT_LE(std::fabs(x), 0.02 * std::sqrt(3.0) + 1e-7);
  }
  EXPECT_NEAR(sum / whole.size(), 0.0, 0.003);
  EXPECT_NEAR(std::sqrt(sq / whole.size()), 0.02, 0.002);
}

TEST(SpecData, KnownAnswers) {
  SyntheticData data(1234, /*vocab=*/256, /*seq=*/32);
  std::vector<int32_t> inputs(2 * 32), targets(2 * 32);
  data.samples(0, 2, inputs.data(), targets.data());
  const int32_t sample0[] = {182, 52, 25, 15, 57, 255, 217, 99};
  const int32_t sample1[] = {170, 184, 213, 40, 235, 125, 4, 142};
  for (int p = 0; p < 8; ++p) {
    EXPECT_EQ(inputs[p], sample0[p]) << "sample 0 position " << p;
    EXPECT_EQ(inputs[32 + p], sample1[p]) << "sample 1 position " << p;
  }
  // Targets are the inputs shifted by one.
  for (int p = 0; p + 1 < 32; ++p) EXPECT_EQ(targets[p], inputs[p + 1]);
}

TEST(SpecData, SamplesDependOnlyOnTheirIndex) {
  SyntheticData data(7, 100, 16);
  std::vector<int32_t> batch_in(4 * 16), batch_tg(4 * 16), one_in(16), one_tg(16);
  data.samples(10, 4, batch_in.data(), batch_tg.data());
  data.sample(12, one_in.data(), one_tg.data());
  for (int p = 0; p < 16; ++p) {
    EXPECT_EQ(one_in[p], batch_in[2 * 16 + p]);
    EXPECT_EQ(one_tg[p], batch_tg[2 * 16 + p]);
  }
}

TEST(ModelLayout, ParameterCountAndNames) {
  ModelConfig m{"custom", 2, 64, 4, 32, 256, 256};
  const auto units = gpt_units(m);
  ASSERT_EQ(units.size(), 4u);  // embed, block0, block1, head
  const std::size_t h = 64, f = 256, V = 256, S = 32;
  const std::size_t per_block = 2 * h + 3 * h * h + 3 * h + h * h + h + 2 * h + h * f + f + f * h + h;
  EXPECT_EQ(gpt_num_parameters(m), V * h + S * h + 2 * per_block + 2 * h + h * V);
  EXPECT_EQ(units[1].tensors[2].name, "block0.attn.qkv.w");
  EXPECT_EQ(units[3].tensors.back().name, "head.w");
  // Units are contiguous in forward order.
  for (std::size_t i = 1; i < units.size(); ++i) EXPECT_EQ(units[i].offset, units[i - 1].offset + units[i - 1].numel);
}

}  // namespace
}  // namespace pb
