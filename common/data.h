// The synthetic language of SPEC section 2.2: a successor table with 10% noise.
// A rank generates only the samples it processes.
#pragma once

#include <cstdint>
#include <vector>

namespace pb {

class SyntheticData {
 public:
  SyntheticData(uint64_t seed, int vocab, int seq);

  // Sample n of the run: S+1 tokens; inputs = [0, S), targets = [1, S].
  void sample(uint64_t n, int32_t* inputs, int32_t* targets) const;

  // Fills (count, S) inputs and targets with samples first, first+1, ...
  void samples(uint64_t first, int count, int32_t* inputs, int32_t* targets) const;

 private:
  uint64_t seed_;
  int vocab_, seq_;
  std::vector<int32_t> succ_;
};

}  // namespace pb
