// The backend and communicator parse_options resolves from what a rank sees (common/options.cpp, SPEC 4):
// NCCL when every rank of a node drives a GPU of its own, whether each sees all of the node's GPUs or
// only its own (srun --gpus-per-task, a per-rank CUDA_VISIBLE_DEVICES), and MPI when ranks share one.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/metadata.h"
#include "common/options.h"

namespace pb {
namespace {

ParseResult parse(std::vector<std::string> args, const Environment& env, Options* opt) {
  args.insert(args.begin(), "parabench-test");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return parse_options("dp", static_cast<int>(argv.size()), argv.data(), env, AppOptions{}, opt);
}

Environment gpu_node(int ranks, int visible, bool distinct) {
  Environment env;
  env.world_size = ranks;
  env.ranks_per_node = ranks;
  env.cuda_built = true;
  env.visible_gpus = visible;
  env.distinct_gpus = distinct;
  env.cuda_max_head_dim = 128;  // kCudaMaxHeadDim, as the runner sets it in a CUDA build
  return env;
}

TEST(Comm, NcclWhenEachRankSeesOnlyItsOwnGpu) {
  Options opt;  // srun --gpus-per-task=1: every rank sees one GPU, device 0, a different one
  const ParseResult r = parse({"--model", "tiny"}, gpu_node(4, 1, true), &opt);
  ASSERT_TRUE(r.run) << r.message;
  EXPECT_EQ(opt.backend, "cuda");
  EXPECT_EQ(opt.comm, "nccl");
  Options given;
  EXPECT_TRUE(parse({"--model", "tiny", "--comm", "nccl"}, gpu_node(4, 1, true), &given).run);
}

TEST(Comm, NcclWhenEachRankSeesEveryGpuOfItsNode) {
  Options opt;
  ASSERT_TRUE(parse({"--model", "tiny"}, gpu_node(4, 4, true), &opt).run);
  EXPECT_EQ(opt.comm, "nccl");
}

TEST(Comm, MpiWhenRanksShareAGpu) {
  Options opt;  // 4 ranks on one GPU (the device machine of the tests)
  ASSERT_TRUE(parse({"--model", "tiny"}, gpu_node(4, 1, false), &opt).run);
  EXPECT_EQ(opt.comm, "mpi");
  Options refused;
  const ParseResult r = parse({"--model", "tiny", "--comm", "nccl"}, gpu_node(4, 1, false), &refused);
  EXPECT_FALSE(r.run);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.message.find("--comm nccl needs a GPU of its own for every rank"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("use --comm mpi"), std::string::npos) << r.message;
}

TEST(Comm, DistinctDevicesAreDistinctAndPresent) {
  EXPECT_TRUE(all_distinct({"0000:1B:00.0", "0000:43:00.0"}));
  EXPECT_TRUE(all_distinct({"0000:1B:00.0"}));
  EXPECT_FALSE(all_distinct({"0000:1B:00.0", "0000:1B:00.0"}));  // two ranks on one GPU
  EXPECT_FALSE(all_distinct({"0000:1B:00.0", ""}));              // a rank without a GPU
  EXPECT_FALSE(all_distinct({""}));
}

}  // namespace
}  // namespace pb
