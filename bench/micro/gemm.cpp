// Matrix-product benchmarks: Backend::matmul_forward (out = inp · weight, no bias) timed to completion.
//
// Each benchmark allocates its operands from the backend (workspace), fills them with a fixed
// pseudo-random pattern, runs one untimed product (library set-up, first touch of the output), checks
// row 0 of it against a double-precision reference, then times products one by one: wall time from
// the call to the end of Backend::synchronize (a no-op on the CPU, the stream's end on a GPU), reported
// through manual timing so that every backend is measured on the same clock.
//
// On the CPU the model presets' shapes are timed twice: with the operands in cache, as a benchmark that
// repeats one call finds them, and cold (".../cold"): every cache line of inp, weight and out flushed
// (clflush, untimed) before each call, as a training step meets them, each last touched kernels before.
// The planner's calibrated step time takes the cold rows (bench/plan/README.md).
#include "bench/micro/gemm.h"
#include "bench/micro/registry.h"
#include "bench/micro/tensors.h"

#include <benchmark/benchmark.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/model.h"
#include "common/options.h"
#include "common/timer.h"

namespace pb {
namespace {

constexpr int kMicroBatch = 4;
const char* const kModelPresets[] = {"small", "gpt2-124m"};
constexpr int kSquareSizes[] = {1024, 2048, 4096};  // 4096³: 137 GFLOP, about a second on a CPU core
constexpr int kAcceleratorSquareSizes[] = {8192};  // 1.1 TFLOP: milliseconds on a GPU, minutes on a CPU

// Row 0 of a product must be within tolerance · Σ_k |inp[0,k] · weight[k,j]| of the reference: room
// for fp32 accumulation in any order, and for bf16 the rounding of both operands (2^-9 each). A guard
// against a product that did not run or ran on other data, not a test of precision (tests/ do that).
constexpr double kFp32Tolerance = 1e-3;
constexpr double kBf16Tolerance = 1e-2;

// Empty when row 0 of out (OC values) matches inp (N, C) · weight (C, OC); else the first mismatch.
std::string check_row0(const std::vector<float>& out_row0, const std::vector<float>& inp,
                       const std::vector<float>& weight, int C, int OC, double tolerance) {
  for (int j = 0; j < OC; ++j) {
    double ref = 0.0, scale = 0.0;
    for (int k = 0; k < C; ++k) {
      const double term = double(inp[k]) * double(weight[std::size_t(k) * OC + j]);
      ref += term;
      scale += std::fabs(term);
    }
    if (!(std::fabs(out_row0[j] - ref) <= tolerance * scale)) {  // also catches NaN
      return "check failed: out[0, " + std::to_string(j) + "] = " + std::to_string(out_row0[j]) +
             ", reference " + std::to_string(ref);
    }
  }
  return "";
}

// Whether this build can evict a host buffer from the caches (the cold variants run only where it can).
constexpr bool kCanFlush =
#if defined(__x86_64__)
    true;
#else
    false;
#endif

// Every cache line of the host buffer [p, p + bytes) written back and evicted from every cache level.
void flush_from_caches(const void* p, std::size_t bytes) {
#if defined(__x86_64__)
  const char* c = static_cast<const char*>(p);
  for (std::size_t i = 0; i < bytes; i += 64) _mm_clflush(c + i);
  _mm_mfence();
#else
  (void)p;
  (void)bytes;
#endif
}

void gemm_forward_benchmark(benchmark::State& state, const MicroBackend& micro, const GemmShape& shape, bool cold,
                            int* failed_checks) {
  Backend& backend = *micro.backend;
  const int N = shape.N, C = shape.C, OC = shape.OC;
  try {
    const std::vector<float> host_inp = pattern(std::size_t(N) * C, 1);
    const std::vector<float> host_weight = pattern(std::size_t(C) * OC, 2);
    const DType dtype = micro.dtype == "bf16" ? DType::bf16 : DType::f32;
    BackendTensor inp(backend, host_inp.size(), dtype);         // (N, C)
    BackendTensor weight(backend, host_weight.size(), dtype);   // (C, OC)
    BackendTensor out(backend, std::size_t(N) * OC, dtype);     // (N, OC)
    inp.upload(host_inp);
    weight.upload(host_weight);

    backend.matmul_forward(out.get(), inp.get(), weight.get(), nullptr, N, C, OC);  // warm-up, checked
    backend.synchronize();
    const std::vector<float> out_row0 = download_fp32(backend, out.get(), OC);
    const std::string error = check_row0(out_row0, host_inp, host_weight, C, OC,
                                         micro.dtype == "bf16" ? kBf16Tolerance : kFp32Tolerance);
    if (!error.empty()) {
      ++*failed_checks;
      state.SkipWithError(error.c_str());
      return;
    }

    const std::size_t element = dtype_bytes(dtype);
    for (auto _ : state) {
      if (cold) {
        flush_from_caches(inp.get().data(), std::size_t(N) * C * element);
        flush_from_caches(weight.get().data(), std::size_t(C) * OC * element);
        flush_from_caches(out.get().data(), std::size_t(N) * OC * element);
      }
      const double start = wall_time_s();
      backend.matmul_forward(out.get(), inp.get(), weight.get(), nullptr, N, C, OC);
      backend.synchronize();
      state.SetIterationTime(wall_time_s() - start);
    }
  } catch (const std::exception& e) {  // out of memory, a CUDA error
    ++*failed_checks;
    state.SkipWithError(e.what());
    return;
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2e-9 * N * C * OC, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(backend.matmul_precision());
}

}  // namespace

std::vector<GemmShape> model_gemm_shapes(const std::string& preset, int micro_batch) {
  ModelConfig m;
  if (!model_preset(preset, &m)) throw std::invalid_argument("model_gemm_shapes: no preset " + preset);
  const int N = micro_batch * m.seq, h = m.hidden;
  return {{preset + ".qkv", N, h, 3 * h},
          {preset + ".attn_out", N, h, h},
          {preset + ".fc1", N, h, m.ffn},
          {preset + ".fc2", N, m.ffn, h},
          {preset + ".logits", N, h, static_cast<int>(m.padded_vocab())}};  // as the model stores the vocabulary
}

std::vector<GemmShape> gemm_shapes(bool accelerator) {
  std::vector<GemmShape> shapes;
  for (const char* preset : kModelPresets) {
    for (const GemmShape& shape : model_gemm_shapes(preset, kMicroBatch)) shapes.push_back(shape);
  }
  for (int n : kSquareSizes) shapes.push_back({"square", n, n, n});
  if (accelerator) {
    for (int n : kAcceleratorSquareSizes) shapes.push_back({"square", n, n, n});
  }
  return shapes;
}

namespace {

// gemm/<backend>/<dtype>/<shape>/N<N>_C<C>_OC<OC>, and ".../cold" for the variant with flushed operands.
void register_gemm_benchmark(const MicroBackend& micro, const GemmShape& shape, bool cold, int* failed_checks) {
  const std::string dims =
      "N" + std::to_string(shape.N) + "_C" + std::to_string(shape.C) + "_OC" + std::to_string(shape.OC);
  const std::string name =
      "gemm/" + micro.name + "/" + micro.dtype + "/" + shape.name + "/" + dims + (cold ? "/cold" : "");
  MicroEntry entry;
  entry.table = "gemm";
  entry.backend = micro.name;
  entry.dtype = micro.dtype;
  entry.kernel = "matmul";
  entry.shape = shape.name;
  entry.dims = dims;
  entry.label = micro.backend->matmul_precision();
  entry.operands = cold ? "cold" : "cached";
  entry.N = shape.N;
  entry.C = shape.C;
  entry.OC = shape.OC;
  entry.flop = 2.0 * shape.N * shape.C * shape.OC;
  entry.peak_flop_per_s = micro.peak_flop_per_s;
  add_micro_entry(name, entry);
  benchmark::RegisterBenchmark(name.c_str(),
                               [&micro, shape, cold, failed_checks](benchmark::State& state) {
                                 gemm_forward_benchmark(state, micro, shape, cold, failed_checks);
                               })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

void register_gemm_benchmarks(std::vector<MicroBackend>& backends, int* failed_checks) {
  for (const MicroBackend& micro : backends) {
    for (const GemmShape& shape : gemm_shapes(micro.accelerator)) {
      register_gemm_benchmark(micro, shape, /*cold=*/false, failed_checks);
      // Cold too: the model presets' shapes on the CPU (a GPU's operands come from its memory anyway at
      // these sizes, and its caches are not the host's to flush).
      if (!micro.accelerator && shape.name != "square" && kCanFlush) {
        register_gemm_benchmark(micro, shape, /*cold=*/true, failed_checks);
      }
    }
  }
}

}  // namespace pb
