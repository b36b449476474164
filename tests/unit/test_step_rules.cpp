// SPEC 2.3's rules that no loss curve shows (common/step_rules.h): which rank and micro-step train each
// sample of a step, and the clipping factor at its edges. A rank-major sample order or a clip factor
// without its + 1e-6 moves losses by rounding only, so the equivalence tests cannot see them; these can.
// Likewise context parallelism's chunk placement (common/parallel.h): the attention goes by global
// position, so any placement that covers the sequence trains the same model; only the causal work per
// rank shows which one ran.
#include "common/step_rules.h"

#include "common/parallel.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
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

// bench/cp/README.md's placement: of 2·cp chunks of S / (2·cp) positions, zigzag gives rank i chunks i
// and 2·cp − 1 − i, in that order; contiguous gives rank i positions i·S/cp onwards. Either covers every
// position once, and select_local takes each sequence's tokens at the rank's positions.
TEST(ContextParallelPlacement, ZigzagAndContiguousAsDocumented) {
  const int S = 48;
  for (int cp : {2, 3, 4}) {
    for (bool zigzag : {true, false}) {
      ContextParallel ctx;
      ctx.size = cp;
      ctx.zigzag = zigzag;
      std::vector<int> seen(S, 0);
      for (int r = 0; r < cp; ++r) {
        std::vector<int32_t> want;
        if (zigzag) {
          const int c = S / (2 * cp);
          for (int chunk : {r, 2 * cp - 1 - r}) {
            for (int i = 0; i < c; ++i) want.push_back(chunk * c + i);
          }
        } else {
          for (int i = 0; i < S / cp; ++i) want.push_back(r * (S / cp) + i);
        }
        EXPECT_EQ(ctx.positions(S, r), want) << "cp " << cp << (zigzag ? " zigzag" : " contiguous") << " rank " << r;
        for (int32_t p : ctx.positions(S, r)) ++seen[p];
      }
      EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), S) << "every position on exactly one rank";
    }
  }
  // Two sequences of S tokens (token = 1000·sequence + position) on rank 1 of 2, zigzag.
  ContextParallel ctx;
  ctx.size = 2;
  ctx.rank = 1;
  ctx.zigzag = true;
  std::vector<int32_t> full(2 * S), local(S);
  for (int s = 0; s < 2; ++s) {
    for (int p = 0; p < S; ++p) full[s * S + p] = 1000 * s + p;
  }
  ctx.select_local(full.data(), local.data(), 2, S);
  const std::vector<int32_t> mine = ctx.positions(S, 1);  // chunks 1 and 2 of 4: positions 12..35
  for (int s = 0; s < 2; ++s) {
    for (std::size_t i = 0; i < mine.size(); ++i) EXPECT_EQ(local[s * mine.size() + i], 1000 * s + mine[i]);
  }
}

// Why zigzag: under the causal mask a query at position p attends p + 1 keys, and zigzag gives every rank
// the same number of (query, key) pairs, where contiguous gives the last rank the most. A placement that
// covers the sequence but is not zigzag (contiguous, or chunks assigned in another order) changes
// nothing but this balance.
TEST(ContextParallelPlacement, ZigzagBalancesTheCausalWork) {
  const int S = 64;
  for (int cp : {2, 4}) {
    for (bool zigzag : {true, false}) {
      ContextParallel ctx;
      ctx.size = cp;
      ctx.zigzag = zigzag;
      std::vector<int64_t> pairs;
      for (int r = 0; r < cp; ++r) {
        int64_t n = 0;
        for (int32_t p : ctx.positions(S, r)) n += p + 1;
        pairs.push_back(n);
      }
      const int64_t total = std::accumulate(pairs.begin(), pairs.end(), int64_t{0});
      EXPECT_EQ(total, int64_t{S} * (S + 1) / 2);
      if (zigzag) {
        for (int64_t n : pairs) EXPECT_EQ(n, total / cp) << "cp " << cp;
      } else {
        for (int r = 1; r < cp; ++r) EXPECT_GT(pairs[r], pairs[r - 1]) << "cp " << cp;
      }
    }
  }
}

}  // namespace
}  // namespace pb
