// A parabench-micro result file as the planner's calibration (parabench-plan --calibration FILE.h5):
// the measured rates of the matrix products (/micro/gemm), the other kernels (/micro/kernels) and the
// collectives' bus bandwidth (/micro/collectives/<op>) that replace the device table's peaks in the
// step-time estimate (README.md, "Calibrated step time"). Reading checks that the file is what
// parabench-micro writes (SPEC 6, bench/micro/README.md); anything else is a configuration error
// (exit 2) whose message names the file and what is wrong.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pb::plan {

// One row of /micro/gemm or /micro/kernels (a GEMM is kernel "matmul").
struct MeasuredKernel {
  std::string name;             // the benchmark, e.g. "gemm/cpu/fp32/small.fc1/N512_C256_OC1024"
  std::string backend, dtype;   // cpu | cuda; fp32 | bf16
  std::string kernel;           // "matmul", "attention_forward", "layernorm_backward", ...
  std::string shape, dims;      // "small.fc1", "small"; "N512_C256_OC1024", "B4_T128_C256_NH8"
  int64_t N = 0, C = 0, OC = 0; // matmul: out (N, OC) = inp (N, C) · weight (C, OC)
  bool cold = false;            // matmul: timed with its operands flushed from the caches before each call
  double time_s = 0;            // per call
  double flop = 0, bytes = 0;   // per call; the rate is flop / time_s where flop > 0, else bytes / time_s
  double peak_fraction = 0;     // NaN where the device's peak is unknown
  double work() const { return flop > 0 ? flop : bytes; }
};

// One /micro/collectives/<op> table: per message size (nccl-tests' "size", the full buffer), the
// seconds per call and the bus bandwidth, rows with errors or a failed run left out.
struct MeasuredCollective {
  std::string op;               // all_reduce, all_gather, reduce_scatter, all_to_all, broadcast,
                                // send_recv_intra, send_recv_inter
  std::string comm, dtype;
  int ranks = 0, nodes = 0;
  double busbw_factor = 1;
  bool in_place = true;         // the variant the table prefers where a size has both
  std::vector<int64_t> bytes;   // increasing, one entry per size (the preferred variant where there are two)
  std::vector<double> time_s, busbw;  // busbw in bytes/s
};

struct Calibration {
  std::string path;
  std::string cluster, cpu_model, gpu_model;
  int world_size = 0, threads = 0;
  std::string comm;
  std::vector<MeasuredKernel> gemm, kernels;  // successful rows only
  std::map<std::string, MeasuredCollective> collectives;  // by op: the in-place rows where a size has both
  std::map<std::string, MeasuredCollective> out_of_place;  // by op: the out-of-place rows where a size has both
  // Backends and dtypes the GEMM rows measured, e.g. {"cpu/fp32", "cpu/bf16"}.
  std::vector<std::string> measured_precisions() const;
};

// Reads and checks a parabench-micro result file. Throws ConfigError (exit 2): not HDF5, no /micro,
// /config app not "micro", a run that did not complete, a table without its columns.
Calibration read_calibration(const std::string& path);

// ---- the lookups of the calibrated step time ------------------------------------------------------------

// Where a predicted time came from: the calibration's row, and whether its shape was the plan's.
struct RateSource {
  std::string row;     // the benchmark name, or "default: ..." for a fallback
  bool exact = false;  // the row measured this very shape
  bool fallback = false;
  bool cold = false;   // a matrix product's row timed with its operands out of cache
};

// Seconds of one matrix product out (N, OC) = inp (N, C) · weight (C, OC) on backend/dtype: among the
// cold rows where the calibration has some (else the cached ones), the row of the same (N, C, OC) where
// there is one, else the row nearest in FLOPs (log scale; ties by shape), at its measured FLOP/s. Throws ConfigError when the calibration has no GEMM of backend/dtype.
double gemm_seconds(const Calibration& cal, const std::string& backend, const std::string& dtype, int64_t N,
                    int64_t C, int64_t OC, RateSource* source);

// Seconds of one call of `kernel` costing `work` (its FLOPs where `compute_bound`, else bytes read and
// written, as bench/micro/kernels.cpp counts them) on backend/dtype: the row of that kernel nearest in
// work (log scale; an equal one is the plan's shape), at its measured rate. Returns a negative value
// when the calibration has no row of that kernel for backend/dtype.
double kernel_seconds(const Calibration& cal, const std::string& backend, const std::string& dtype,
                      const std::string& kernel, double work, RateSource* source);

// One kind of kernel call in a rank's training step (step_time.h lists them) and its time.
struct KernelCall {
  std::string kernel;   // "matmul", or the /micro/kernels name: "attention_forward", "layernorm_backward", ...
  std::string what;     // where the step calls it: "block fc1, forward"
  int64_t N = 0, C = 0, OC = 0;  // matmul: out (N, OC) = inp (N, C) · weight (C, OC)
  double work = 0;      // per call: FLOPs (matmul 2·N·C·OC, attention) or bytes read and written (the rest)
  double calls = 0;     // per step
  bool backward = false;  // runs in backward (or recomputes inside it)
};
struct KernelTime {
  KernelCall call;
  double seconds = 0;   // per step, every call
  RateSource source;
};

// The median bytes/s of the memory-bound kernels measured on backend/dtype (the documented default for
// a memory-bound kernel the calibration lacks); NaN when there is none.
double median_kernel_bandwidth(const Calibration& cal, const std::string& backend, const std::string& dtype);

// Bus bandwidth (bytes/s) of `table` at a message of `bytes`: log-log interpolation between the
// measured sizes; below the smallest, that size's time (latency-bound: the bandwidth falls with the
// size); above the largest, the largest size's bandwidth.
double interpolate_busbw(const MeasuredCollective& table, double bytes);

// The device's peak FLOP/s the GEMM rows were measured against (flop_per_s / peak_fraction), NaN when
// unknown (CPUs).
double calibrated_peak_flop_per_s(const Calibration& cal, const std::string& backend, const std::string& dtype);

}  // namespace pb::plan
