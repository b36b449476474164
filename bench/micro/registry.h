// What parabench-micro knows about each benchmark it registers, beyond Google Benchmark's name and
// time: the table of the result file it belongs to and the quantities (FLOPs, bytes, message size)
// from which the reporter derives rates, bandwidths and the share of the device's peak. Filled at
// registration, read by the reporter (report.h) for every run Google Benchmark reports.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace pb {

inline constexpr double kUnknownPeak = std::numeric_limits<double>::quiet_NaN();

struct MicroEntry {
  // The result file's table: "gemm", "kernels", or "collectives/<op>" (SPEC 6, /micro).
  std::string table;
  std::string backend;  // "cpu", "cuda" (gemm, kernels); the communicator, "mpi" or "nccl" (collectives)
  std::string dtype;    // "fp32", "bf16": the tensors' storage (gemm, kernels) or the buffer's (collectives)
  std::string kernel;   // kernels: "attention_forward", "layernorm_backward", ...; gemm: "matmul"; collectives: the op
  std::string shape;    // "small.fc1", "square", "small" (kernels: the preset whose shape it is)
  std::string dims;     // the dimensions in words, "N512_C256_OC768", "B4_T128_C256_NH4"
  std::string label;    // gemm: Backend::matmul_precision(); else a note (empty)
  // gemm: "cached" (the same operands call after call, in cache) or "cold" (flushed from every cache
  // level before each call, as a training step meets its weights, inputs and outputs: each last
  // touched kernels before)
  std::string operands = "cached";
  int64_t N = 0, C = 0, OC = 0;  // gemm: out (N, OC) = inp (N, C) · weight (C, OC)
  // Per call. flop > 0: compute-bound, reported as flop/s; bytes > 0: bytes read and written
  // (kernels, reported as bytes/s), or the message size (collectives, nccl-tests' "size").
  double flop = 0, bytes = 0;
  double peak_flop_per_s = kUnknownPeak;   // the device's peak for this dtype, where known
  double peak_bytes_per_s = kUnknownPeak;  // the device's memory bandwidth, where known
  // collectives
  int64_t count = 0;          // elements per call (of the buffer `bytes` describes)
  bool in_place = false;
  int ranks = 1;              // ranks in the group
  double busbw_factor = 1.0;  // nccl-tests: busbw = algbw · factor (all_reduce 2(n-1)/n, ...)
  int nodes = 1;              // nodes the group spans
  int64_t wrong = 0;          // wrong elements the data check found, summed over ranks (set by the benchmark)
};

// Registers `entry` under the benchmark's function name (the name given to RegisterBenchmark).
void add_micro_entry(const std::string& name, const MicroEntry& entry);
// The entry of a benchmark, or nullptr for one registered without an entry.
const MicroEntry* find_micro_entry(const std::string& name);
// A benchmark's data check found `wrong` elements wrong (collectives: before it reports its error).
void set_micro_wrong_elements(const std::string& name, int64_t wrong);

}  // namespace pb
