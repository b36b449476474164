// The backend and communicator parse_options resolves from what a rank sees (common/options.cpp, SPEC 4):
// NCCL when every rank of a node drives a GPU of its own, whether each sees all of the node's GPUs or
// only its own (srun --gpus-per-task, a per-rank CUDA_VISIBLE_DEVICES), and MPI when ranks share one;
// the attention implementation (--attention), the CPU's sgemm library (--cpu-gemm) and the NCCL watchdog's
// --distributed-timeout-minutes; the output paths' characters.
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

// The llama block (SPEC 2.5) runs on the CUDA backend too; its head dimension meets the CUDA limit.
TEST(Arch, LlamaOnTheCudaBackend) {
  Options opt;
  const ParseResult r = parse({"--model", "llama-tiny"}, gpu_node(1, 1, true), &opt);
  ASSERT_TRUE(r.run) << r.message;
  EXPECT_EQ(opt.backend, "cuda");
  EXPECT_TRUE(opt.model.llama());
  EXPECT_EQ(opt.model.kv(), 2);
  Options wide;
  const ParseResult refused =
      parse({"--arch", "llama", "--hidden", "1024", "--heads", "4", "--kv-heads", "2"}, gpu_node(1, 1, true), &wide);
  EXPECT_FALSE(refused.run);
  EXPECT_EQ(refused.exit_code, 2);
  EXPECT_NE(refused.message.find("128"), std::string::npos) << refused.message;
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

// The GPU of a rank: 4 ranks per node that each see the node's 4 GPUs drive GPUs 0..3; under
// --gpus-per-task=1 (each sees one) every rank drives its device 0; 8 ranks on 4 GPUs share them
// round-robin; no GPU: -1.
TEST(Comm, DeviceIndexIsTheLocalRankModuloTheVisibleGpus) {
  for (int local = 0; local < 4; ++local) {
    EXPECT_EQ(device_index_for(local, 4), local);
    EXPECT_EQ(device_index_for(local, 1), 0);
    EXPECT_EQ(device_index_for(local + 4, 4), local);
    EXPECT_EQ(device_index_for(local, 0), -1);
  }
}

// --attention: cuDNN's fused attention by default where it can run (a CUDA build with cuDNN, bf16,
// head dimensions in multiples of 8), parabench's kernels otherwise; asking for cuDNN where it cannot
// run is exit 2 naming why and --attention native.
Environment cudnn_node(bool cudnn_built) {
  Environment env = gpu_node(1, 1, true);
  env.cudnn_built = cudnn_built;
  return env;
}

TEST(Attention, DefaultsToCudnnWhereItRuns) {
  Options opt;
  ASSERT_TRUE(parse({"--model", "tiny"}, cudnn_node(true), &opt).run);  // head dimension 64/4 = 16
  EXPECT_EQ(opt.attention, "cudnn");
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--model", "tiny", "--dtype", "fp32"},                     // cuDNN's is bf16 only
           {"--model", "tiny", "--hidden", "60", "--heads", "4"},      // head dimension 15
           {"--model", "tiny", "--attention", "native"}}) {            // asked for
    Options other;
    ASSERT_TRUE(parse(args, cudnn_node(true), &other).run) << args.back();
    EXPECT_EQ(other.attention, "native") << args.back();
  }
  Options unbuilt, cpu;
  ASSERT_TRUE(parse({"--model", "tiny"}, cudnn_node(false), &unbuilt).run);
  EXPECT_EQ(unbuilt.attention, "native");
  ASSERT_TRUE(parse({"--model", "tiny"}, Environment{}, &cpu).run);
  EXPECT_EQ(cpu.backend, "cpu");
  EXPECT_EQ(cpu.attention, "native");
}

// Command lines after --model tiny that parse_options must refuse: exit 2, the message saying `says`.
struct RefusedCase {
  std::vector<std::string> args;
  Environment env;
  std::string says;
};
void expect_refused(const std::vector<RefusedCase>& cases) {
  for (const RefusedCase& c : cases) {
    std::vector<std::string> args = {"--model", "tiny"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    Options opt;
    const ParseResult r = parse(args, c.env, &opt);
    EXPECT_FALSE(r.run) << c.says;
    EXPECT_EQ(r.exit_code, 2) << c.says;
    EXPECT_NE(r.message.find(c.says), std::string::npos) << r.message;
  }
}

TEST(Attention, CudnnRefusedWhereItCannotRun) {
  const std::vector<RefusedCase> cases = {
      {{"--attention", "cudnn"}, Environment{}, "--attention cudnn needs --backend cuda"},
      {{"--attention", "cudnn"}, cudnn_node(false), "this build has no cuDNN attention"},
      {{"--attention", "cudnn", "--dtype", "fp32"}, cudnn_node(true), "--attention cudnn takes --dtype bf16"},
      {{"--attention", "cudnn", "--hidden", "60", "--heads", "4"}, cudnn_node(true), "multiples of 8"},
      {{"--attention", "flash"}, cudnn_node(true), "--attention flash must be native or cudnn"},
  };
  expect_refused(cases);
}

// --cpu-gemm: the build's first library by default on the CPU (oneDNN's where built with it), either
// selectable; none on cuda, where asking for one is exit 2, as is a library the build lacks.
TEST(CpuGemm, DefaultsToTheBuildsFirstLibraryAndRefusesWhatItLacks) {
  Environment both;
  both.cpu_gemm_libraries = {"onednn", "openblas"};
  Options opt, asked, plain, gpu;
  ASSERT_TRUE(parse({"--model", "tiny"}, both, &opt).run);
  EXPECT_EQ(opt.cpu_gemm, "onednn");
  ASSERT_TRUE(parse({"--model", "tiny", "--cpu-gemm", "openblas"}, both, &asked).run);
  EXPECT_EQ(asked.cpu_gemm, "openblas");
  ASSERT_TRUE(parse({"--model", "tiny"}, Environment{}, &plain).run);  // a build without oneDNN
  EXPECT_EQ(plain.cpu_gemm, "openblas");
  ASSERT_TRUE(parse({"--model", "tiny"}, gpu_node(1, 1, true), &gpu).run);
  EXPECT_EQ(gpu.cpu_gemm, "none");
  const std::vector<RefusedCase> cases = {
      {{"--cpu-gemm", "onednn"}, Environment{}, "--cpu-gemm onednn is not available: this build has no oneDNN"},
      {{"--cpu-gemm", "mkl"}, both, "--cpu-gemm mkl must be onednn or openblas"},
      {{"--cpu-gemm", ""}, both, "--cpu-gemm  must be onednn or openblas"},
      {{"--cpu-gemm", "openblas"}, gpu_node(1, 1, true), "--cpu-gemm applies to --backend cpu"},
  };
  expect_refused(cases);
}

TEST(Comm, DistributedTimeout) {
  Options opt;
  ASSERT_TRUE(parse({"--model", "tiny"}, gpu_node(2, 2, true), &opt).run);
  EXPECT_EQ(opt.distributed_timeout_minutes, 10.0);  // Megatron-LM's default
  Options half;
  ASSERT_TRUE(parse({"--model", "tiny", "--distributed-timeout-minutes", "0.5"}, gpu_node(2, 2, true), &half).run);
  EXPECT_EQ(half.distributed_timeout_minutes, 0.5);
  for (const char* bad : {"0", "-3"}) {
    Options refused;
    const ParseResult r = parse({"--model", "tiny", "--distributed-timeout-minutes", bad}, gpu_node(2, 2, true), &refused);
    EXPECT_FALSE(r.run) << bad;
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_NE(r.message.find("must be positive"), std::string::npos) << r.message;
  }
}

// The outputs' paths: taken as given, control characters refused (they would be written into messages
// and, for --memory-log, into file names).
TEST(Outputs, PathsWithoutControlCharacters) {
  Options opt;
  ASSERT_TRUE(parse({"--model", "tiny", "--memory-log", "logs/mem", "--trace", "t.json"}, Environment{}, &opt).run);
  EXPECT_EQ(opt.memory_log, "logs/mem");
  EXPECT_EQ(opt.trace, "t.json");
  Options none;
  ASSERT_TRUE(parse({"--model", "tiny"}, Environment{}, &none).run);
  EXPECT_TRUE(none.memory_log.empty());  // off unless asked
  const std::vector<RefusedCase> cases = {
      {{"--memory-log", "logs\nmem"}, Environment{}, "--memory-log must not contain control characters"},
      {{"--trace", "t\x01.json"}, Environment{}, "--trace must not contain control characters"},
      {{"--json-log", "j\x7f"}, Environment{}, "--json-log must not contain control characters"},
  };
  expect_refused(cases);
}

}  // namespace
}  // namespace pb
