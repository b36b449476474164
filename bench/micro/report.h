// parabench-micro's reporter: Google Benchmark's display (console, JSON or CSV, as --benchmark_format
// says) on rank 0 and nothing on the other ranks, and, beside it, every result it reports gathered per
// table (registry.h), for the nccl-tests-like table of the collectives and the result file's /micro.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench/micro/registry.h"
#include "common/results.h"

namespace pb {

// One benchmark's outcome: seconds per call (the median over repetitions, or the one run), or its error.
struct MicroResult {
  std::string name;
  MicroEntry entry;
  std::vector<double> seconds;  // per call, one per repetition (iteration runs)
  double median_s = 0;          // from a "median" aggregate, when only aggregates were reported
  std::string error;
  double time_s() const;        // median of `seconds`, else median_s; NaN after an error
};

class MicroReporter : public benchmark::BenchmarkReporter {
 public:
  // `format` is --benchmark_format's value ("console", "json", "csv"); `display` false: no output
  // (the ranks other than 0).
  MicroReporter(bool display, const std::string& format);

  bool ReportContext(const Context& context) override;
  void ReportRuns(const std::vector<Run>& runs) override;
  void Finalize() override;

  // The collectives as nccl-tests prints them: per op, a row per size with the out-of-place and the
  // in-place time, algbw, busbw and wrong elements, and the average bus bandwidth.
  void print_collectives_table(std::FILE* out) const;
  // /micro/gemm, /micro/kernels and /micro/collectives/<op> (README.md, SPEC 6). Throws RunError.
  void write(ResultWriter& writer) const;

 private:
  std::unique_ptr<benchmark::BenchmarkReporter> display_;
  std::vector<std::string> order_;  // names in the order of their first report
  std::map<std::string, MicroResult> results_;
};

// --benchmark_format's value in argv ("console" when absent).
std::string benchmark_format(int argc, char** argv);

}  // namespace pb
