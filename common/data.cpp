#include "common/data.h"

#include <cmath>
#include <vector>

#include "common/init.h"

namespace pb {

SyntheticData::SyntheticData(uint64_t seed, int vocab, int seq) : seed_(seed), vocab_(vocab), seq_(seq) {
  succ_.resize(vocab);
  for (int v = 0; v < vocab; ++v) {
    succ_[v] = static_cast<int32_t>(std::floor(spec_uniform(seed, "data.succ", v) * vocab));
  }
}

void SyntheticData::sample(uint64_t n, int32_t* inputs, int32_t* targets) const {
  const uint64_t span = static_cast<uint64_t>(seq_) + 1;
  std::vector<int32_t> t(span);
  t[0] = static_cast<int32_t>(std::floor(spec_uniform(seed_, "data.start", n) * vocab_));
  for (int p = 0; p < seq_; ++p) {
    const uint64_t i = n * span + p;
    if (spec_uniform(seed_, "data.noise", i) >= 0.1) {
      t[p + 1] = succ_[t[p]];
    } else {
      t[p + 1] = static_cast<int32_t>(std::floor(spec_uniform(seed_, "data.rand", i) * vocab_));
    }
  }
  for (int p = 0; p < seq_; ++p) {
    inputs[p] = t[p];
    targets[p] = t[p + 1];
  }
}

void SyntheticData::samples(uint64_t first, int count, int32_t* inputs, int32_t* targets) const {
  for (int i = 0; i < count; ++i) {
    sample(first + i, inputs + static_cast<std::size_t>(i) * seq_, targets + static_cast<std::size_t>(i) * seq_);
  }
}

}  // namespace pb
