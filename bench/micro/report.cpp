#include "bench/micro/report.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>

namespace pb {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double median(std::vector<double> v) {
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Google Benchmark's default display reporters, as its own RunSpecifiedBenchmarks makes them: colour
// only on a terminal, counters inline.
std::unique_ptr<benchmark::BenchmarkReporter> make_display(const std::string& format) {
  std::unique_ptr<benchmark::BenchmarkReporter> reporter;
  if (format == "json") {
    reporter = std::make_unique<benchmark::JSONReporter>();
  } else if (format == "csv") {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // Google Benchmark 1.7 deprecates it; still a format it takes
    reporter = std::make_unique<benchmark::CSVReporter>();
#pragma GCC diagnostic pop
  } else {
    reporter = std::make_unique<benchmark::ConsoleReporter>(isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Color
                                                                                 : benchmark::ConsoleReporter::OO_None);
  }
  reporter->SetOutputStream(&std::cout);
  reporter->SetErrorStream(&std::cerr);
  return reporter;
}

double rate(double quantity, double seconds) {
  return quantity > 0 && seconds > 0 ? quantity / seconds : kNaN;
}

}  // namespace

double MicroResult::time_s() const {
  if (!error.empty()) return kNaN;
  return seconds.empty() ? median_s : median(seconds);
}

std::string benchmark_format(int argc, char** argv) {
  constexpr const char* kFlag = "--benchmark_format=";
  std::string format = "console";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], kFlag, std::strlen(kFlag)) == 0) format = argv[i] + std::strlen(kFlag);
  }
  return format;
}

MicroReporter::MicroReporter(bool display, const std::string& format) {
  if (display) {
    display_ = make_display(format);
    return;
  }
  // Google Benchmark writes its own messages ("Failed to match any benchmarks") to the display
  // reporter's streams: once, from rank 0.
  static std::ostream discard(nullptr);
  SetOutputStream(&discard);
  SetErrorStream(&discard);
}

bool MicroReporter::ReportContext(const Context& context) {
  return display_ ? display_->ReportContext(context) : true;
}

void MicroReporter::ReportRuns(const std::vector<Run>& runs) {
  if (display_) display_->ReportRuns(runs);
  for (const Run& run : runs) {
    const std::string& name = run.run_name.function_name;
    auto [it, added] = results_.try_emplace(name);
    MicroResult& result = it->second;
    if (added) {
      order_.push_back(name);
      result.name = name;
      if (const MicroEntry* entry = find_micro_entry(name)) result.entry = *entry;
    }
    const double per_call = run.iterations > 0 ? run.real_accumulated_time / static_cast<double>(run.iterations)
                                               : run.real_accumulated_time;
    if (run.error_occurred) {
      result.error = run.error_message.empty() ? "failed" : run.error_message;
    } else if (run.run_type == Run::RT_Iteration) {
      result.seconds.push_back(per_call);
    } else if (run.aggregate_name == "median") {
      result.median_s = per_call;
    }
  }
}

void MicroReporter::Finalize() {
  if (display_) display_->Finalize();
  // What the benchmarks learned while they ran (the data checks' wrong elements).
  for (auto& [name, result] : results_) {
    if (const MicroEntry* entry = find_micro_entry(name)) result.entry = *entry;
  }
}

void MicroReporter::print_collectives_table(std::FILE* out) const {
  // Per table (op), the sizes in order with their two variants.
  std::map<std::string, std::map<int64_t, std::pair<const MicroResult*, const MicroResult*>>> tables;
  std::vector<std::string> table_order;
  for (const std::string& name : order_) {
    const MicroResult& r = results_.at(name);
    if (r.entry.table.rfind("collectives/", 0) != 0) continue;
    if (!tables.count(r.entry.table)) table_order.push_back(r.entry.table);
    auto& row = tables[r.entry.table][static_cast<int64_t>(r.entry.bytes)];
    (r.entry.in_place ? row.second : row.first) = &r;
  }
  for (const std::string& table : table_order) {
    const auto& rows = tables.at(table);
    const MicroEntry& first = (rows.begin()->second.first ? rows.begin()->second.first : rows.begin()->second.second)->entry;
    std::fprintf(out, "#\n# %s: %s, %d ranks, %s; busbw = algbw x %.4g (nccl-tests)\n#\n", table.c_str() + 12,
                 first.backend.c_str(), first.ranks, first.dtype.c_str(), first.busbw_factor);
    std::fprintf(out, "# %12s %12s %22s %8s %8s %8s %22s %8s %8s %8s\n", "", "", "out-of-place", "", "", "", "in-place",
                 "", "", "");
    std::fprintf(out, "# %12s %12s %12s %9s %8s %8s %12s %9s %8s %8s\n", "size", "count", "time", "algbw", "busbw",
                 "#wrong", "time", "algbw", "busbw", "#wrong");
    std::fprintf(out, "# %12s %12s %12s %9s %8s %8s %12s %9s %8s %8s\n", "(B)", "(elements)", "(us)", "(GB/s)",
                 "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "");
    double busbw_sum = 0;
    int busbw_n = 0;
    for (const auto& [bytes, variants] : rows) {
      const MicroEntry& e = (variants.first ? variants.first : variants.second)->entry;
      std::fprintf(out, "  %12lld %12lld", static_cast<long long>(bytes), static_cast<long long>(e.count));
      for (const MicroResult* r : {variants.first, variants.second}) {
        if (!r) {
          std::fprintf(out, " %12s %9s %8s %8s", "-", "-", "-", "-");
          continue;
        }
        const double t = r->time_s();
        if (!r->error.empty()) {
          std::fprintf(out, " %12s %9s %8s %8lld", "error", "-", "-", static_cast<long long>(r->entry.wrong));
          continue;
        }
        const double algbw = bytes / t * 1e-9, busbw = algbw * r->entry.busbw_factor;
        std::fprintf(out, " %12.2f %9.3f %8.3f %8lld", t * 1e6, algbw, busbw, static_cast<long long>(r->entry.wrong));
        busbw_sum += busbw;
        ++busbw_n;
      }
      std::fprintf(out, "\n");
    }
    std::fprintf(out, "# Avg bus bandwidth    : %g GB/s\n", busbw_n ? busbw_sum / busbw_n : kNaN);
  }
  std::fflush(out);
}

void MicroReporter::write(ResultWriter& writer) const {
  std::map<std::string, std::vector<const MicroResult*>> tables;
  for (const std::string& name : order_) {
    const MicroResult& r = results_.at(name);
    if (!r.entry.table.empty()) tables[r.entry.table].push_back(&r);
  }
  for (const auto& [table, rows] : tables) {
    const std::string base = "/micro/" + table + "/";
    auto strings = [&](const char* column, auto get) {
      std::vector<std::string> values;
      for (const MicroResult* r : rows) values.push_back(get(*r));
      writer.write_strings(base + column, values);
    };
    auto numbers = [&](const char* column, const char* units, auto get) {
      std::vector<double> values;
      for (const MicroResult* r : rows) values.push_back(get(*r));
      writer.write_f64(base + column, values, units);
    };
    auto integers = [&](const char* column, const char* units, auto get) {
      std::vector<int64_t> values;
      for (const MicroResult* r : rows) values.push_back(get(*r));
      writer.write_i64(base + column, values, units);
    };
    const bool collectives = table.rfind("collectives/", 0) == 0;
    numbers("time_s", "s", [](const MicroResult& r) { return r.time_s(); });
    if (collectives) {
      const MicroEntry& e = rows.front()->entry;
      writer.write_attributes("/micro/" + table, {{"comm", e.backend},
                                                  {"ranks", e.ranks},
                                                  {"nodes", e.nodes},
                                                  {"dtype", e.dtype},
                                                  {"busbw_factor", e.busbw_factor}});
      integers("bytes", "bytes", [](const MicroResult& r) { return static_cast<int64_t>(r.entry.bytes); });
      integers("count", "1", [](const MicroResult& r) { return r.entry.count; });
      integers("in_place", "1", [](const MicroResult& r) { return int64_t{r.entry.in_place}; });
      numbers("algbw", "bytes/s", [](const MicroResult& r) { return rate(r.entry.bytes, r.time_s()); });
      numbers("busbw", "bytes/s",
              [](const MicroResult& r) { return rate(r.entry.bytes, r.time_s()) * r.entry.busbw_factor; });
      // A wrong result is reported by the benchmark as an error before any timing.
      integers("errors", "1", [](const MicroResult& r) { return r.entry.wrong; });
      strings("error", [](const MicroResult& r) { return r.error; });
      continue;
    }
    strings("name", [](const MicroResult& r) { return r.name; });
    strings("backend", [](const MicroResult& r) { return r.entry.backend; });
    strings("dtype", [](const MicroResult& r) { return r.entry.dtype; });
    strings("shape", [](const MicroResult& r) { return r.entry.shape; });
    strings("label", [](const MicroResult& r) { return r.entry.label; });
    strings("error", [](const MicroResult& r) { return r.error; });
    numbers("flop", "flop", [](const MicroResult& r) { return r.entry.flop; });
    numbers("flop_per_s", "flop/s", [](const MicroResult& r) { return rate(r.entry.flop, r.time_s()); });
    const auto peak_fraction = [](const MicroResult& r) {
      const double flops = rate(r.entry.flop, r.time_s()), bytes = rate(r.entry.bytes, r.time_s());
      return r.entry.flop > 0 ? flops / r.entry.peak_flop_per_s : bytes / r.entry.peak_bytes_per_s;
    };
    numbers("peak_fraction", "1", peak_fraction);
    if (table == "gemm") {
      strings("operands", [](const MicroResult& r) { return r.entry.operands; });
      integers("N", "1", [](const MicroResult& r) { return r.entry.N; });
      integers("C", "1", [](const MicroResult& r) { return r.entry.C; });
      integers("OC", "1", [](const MicroResult& r) { return r.entry.OC; });
    } else {
      strings("kernel", [](const MicroResult& r) { return r.entry.kernel; });
      strings("dims", [](const MicroResult& r) { return r.entry.dims; });
      numbers("bytes", "bytes", [](const MicroResult& r) { return r.entry.bytes; });
      numbers("bytes_per_s", "bytes/s", [](const MicroResult& r) { return rate(r.entry.bytes, r.time_s()); });
    }
  }
}

}  // namespace pb
