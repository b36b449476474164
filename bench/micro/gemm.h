// The matrix-product benchmarks of parabench-micro: Backend::matmul_forward at the shapes of the
// model's linear layers and at square sizes (see README.md).
#pragma once

#include <string>
#include <vector>

#include "bench/micro/backends.h"

namespace pb {

// out (N, OC) = inp (N, C) · weight (C, OC): 2·N·C·OC floating-point operations.
struct GemmShape {
  std::string name;  // "small.fc1", "square"
  int N = 0, C = 0, OC = 0;
};

// The five products of a block and the head of model preset `preset` (common/options.cpp) at
// `micro_batch` samples (N = micro_batch · S rows): qkv (N, h, 3h), attn_out (N, h, h), fc1 (N, h, f),
// fc2 (N, f, h), logits (N, h, V).
std::vector<GemmShape> model_gemm_shapes(const std::string& preset, int micro_batch);

// Every shape timed on a backend: the model shapes of `small` and `gpt2-124m` at micro-batch 4, then
// squares of 1024, 2048 and 4096, and on an accelerator 8192 as well.
std::vector<GemmShape> gemm_shapes(bool accelerator);

// Registers gemm/<backend>/<dtype>/<shape>/N<N>_C<C>_OC<OC> for every backend and shape. The benchmarks
// refer to the elements of `backends` and to `failed_checks`: both must stay in place until they have
// run. A benchmark that fails (its row 0 against a reference, out of memory) increments
// `failed_checks` and reports the error in its place.
void register_gemm_benchmarks(std::vector<MicroBackend>& backends, int* failed_checks);

}  // namespace pb
