// SPEC 2.3's rules that no loss curve shows (common/step_rules.h): which rank and micro-step train each
// sample of a step, and the clipping factor at its edges. A rank-major sample order or a clip factor
// without its + 1e-6 moves losses by rounding only, so the equivalence tests cannot see them; these can.
#include "common/step_rules.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

namespace pb {
namespace {

// Every sample k of a step is trained exactly once, by rank (k / b) mod dp in micro-step k / (b · dp), at
// position k mod b of its micro-batch: for layouts of 1 to 4 ranks, 1 to 3 micro-steps, micro-batches of 1
// to 3, at steps 0 and 7.
TEST(FirstSample, RoundRobinOverRanksPerMicroStep) {
  for (int dp : {1, 2, 3, 4}) {
    for (int accum : {1, 2, 3}) {
      for (int b : {1, 2, 3}) {
        const uint64_t G = static_cast<uint64_t>(dp) * accum * b;
        for (uint64_t step : {uint64_t{0}, uint64_t{7}}) {
          std::set<uint64_t> seen;
          for (uint64_t k = 0; k < G; ++k) {
            const int rank = static_cast<int>((k / b) % dp), micro = static_cast<int>(k / (static_cast<uint64_t>(b) * dp));
            EXPECT_EQ(first_sample(step, G, micro, b, dp, rank) + k % b, step * G + k)
                << "dp " << dp << " accum " << accum << " b " << b << " step " << step << " k " << k;
            for (int i = 0; i < b; ++i) seen.insert(first_sample(step, G, micro, b, dp, rank) + i);
          }
          EXPECT_EQ(seen.size(), G);
          EXPECT_EQ(*seen.begin(), step * G);
          EXPECT_EQ(*seen.rbegin(), step * G + G - 1);
        }
      }
    }
  }
  // dp 2, b 2, two micro-steps: rank 1's first micro-batch is samples 2 and 3 (rank-major would give 4, 5)
  EXPECT_EQ(first_sample(0, 8, 0, 2, 2, 1), 2u);
  EXPECT_EQ(first_sample(0, 8, 1, 2, 2, 0), 4u);
  EXPECT_EQ(first_sample(3, 8, 1, 2, 2, 1), 3u * 8 + 6);
}

TEST(ClipScale, AboveTheThresholdWithItsEpsilon) {
  EXPECT_EQ(clip_scale(2.0, 1.0), static_cast<float>(1.0 / (2.0 + 1e-6)));
  EXPECT_NE(clip_scale(2.0, 1.0), 0.5f) << "the + 1e-6 of clip_grad_norm_";
  // a norm just above clip: the factor is below 1 (clip / (norm + 1e-6))
  EXPECT_LT(clip_scale(1.0 + 1e-9, 1.0), 1.0f);
  EXPECT_EQ(clip_scale(1e6, 0.5), static_cast<float>(0.5 / (1e6 + 1e-6)));
}

TEST(ClipScale, OneBelowOrAtTheThresholdAndWhenOff) {
  EXPECT_EQ(clip_scale(0.5, 1.0), 1.0f);     // below: no rescaling (not up to the threshold)
  EXPECT_EQ(clip_scale(1.0, 1.0), 1.0f);     // at: not above
  EXPECT_EQ(clip_scale(1e-12, 1.0), 1.0f);   // a tiny norm
  EXPECT_EQ(clip_scale(0.0, 1.0), 1.0f);     // a zero gradient
  EXPECT_EQ(clip_scale(5.0, 0.0), 1.0f);     // --clip 0: off
  EXPECT_EQ(clip_scale(1e30, 0.0), 1.0f);
  EXPECT_EQ(clip_scale(99.0, 100.0), 1.0f);  // --clip 100 at an ordinary norm
}

}  // namespace
}  // namespace pb
