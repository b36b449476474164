// Energy of the measured steps, from the counters the hardware offers (SPEC 6, /energy):
//
//   nvml  a GPU's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver loaded;
//         Volta and later), read by the rank that drives the GPU, one column per rank; a GPU that
//         several ranks of a node drive is read by the lowest of them, once.
//   rapl  the Linux powercap counters of the node's CPU packages and their DRAM (/sys/class/powercap,
//         the intel-rapl zones, also on AMD: top-level zones "package-N", their subzones "dram", and a
//         top-level "dram"; not "core" or "uncore", which their package holds, nor "psys", nor the
//         intel-rapl-mmio view of a package), µJ wrapping at max_energy_range_uj, read by
//         the node's first rank, one column per node: the packages that the node's ranks share count
//         once.
//
// Each step's energy is counted over the step's own window, the one its time is measured over (from
// the ranks leaving the step's barrier to the end of its optimizer step), by reading the counters at
// both ends; a counter that wrapped in between adds its range. A source that has no counter on any
// rank says so (EnergySource::reason), never zero; a read that fails during the run leaves that step's
// value NaN.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/communicator.h"

namespace pb {

// One source as the result file describes it: the same on every rank.
struct EnergySource {
  std::string name;        // "nvml", "rapl"
  std::string counter;     // what is read
  std::string columns;     // "ranks" or "nodes"
  bool available = false;  // some column has a counter
  std::string reason;      // when not available: why ("no /sys/class/powercap", "libnvidia-ml.so.1: ...")
  std::vector<int> read_by;  // per column: the rank that reads it, −1 for none
  std::vector<std::string> detail;  // per column: its domains or GPU, or why it has none
};

// The powercap (RAPL) counters under `root` (/sys/class/powercap; tests point PB_POWERCAP_ROOT at a fake
// tree). Reading costs a few system calls per domain.
class RaplCounters {
 public:
  explicit RaplCounters(const std::string& root);
  bool available() const { return !domains_.empty(); }
  const std::string& why_not() const { return why_not_; }
  // "package-0", "package-0/dram", ... in the order of the values read() returns.
  std::vector<std::string> domain_names() const;
  // Each domain's energy_uj; false (and *uj unchanged) when one cannot be read.
  bool read(std::vector<uint64_t>* uj) const;
  // Joules from `start` to `end` (two read()s), summed over the domains, each wrapped at its range.
  double joules_between(const std::vector<uint64_t>& start, const std::vector<uint64_t>& end) const;

 private:
  struct Domain {
    std::string name, energy_path;
    uint64_t max_range_uj = 0;
  };
  std::vector<Domain> domains_;
  std::string why_not_;
};

// µJ from `start` to `end` of a counter that wraps to 0 past max_range_uj (powercap's
// max_energy_range_uj): end − start, or end + (max_range_uj − start) when it wrapped.
uint64_t rapl_delta_uj(uint64_t start, uint64_t end, uint64_t max_range_uj);

// The directory the powercap counters are read from: PB_POWERCAP_ROOT (tests only), else /sys/class/powercap.
std::string powercap_root();

class EnergyMeter {
 public:
  // Collective over `world`: each rank probes the counters it could read (its GPU's where
  // gpu_pci_bus_id is not empty, the node's powercap on its node's first rank), and the ranks agree on
  // who reads which. hostnames and local_ranks: per rank (SystemInfo).
  EnergyMeter(Communicator& world, const std::vector<std::string>& hostnames, const std::vector<int>& local_ranks,
              const std::string& gpu_pci_bus_id, const std::string& powercap_dir);
  ~EnergyMeter();
  EnergyMeter(const EnergyMeter&) = delete;
  EnergyMeter& operator=(const EnergyMeter&) = delete;

  const std::vector<EnergySource>& sources() const { return sources_; }
  // The start of a step's window: reads the counters this rank reads.
  void start();
  // Its end: joules of each source since start() on this rank (NaN where this rank reads none of the
  // source's counters, or a read failed), in the order of sources().
  std::vector<double> stop();

 private:
  struct Nvml;  // the GPU counter (energy.cpp), null where this rank reads none
  std::unique_ptr<Nvml> nvml_;
  std::unique_ptr<RaplCounters> rapl_;  // null where this rank reads none
  std::vector<EnergySource> sources_;
  uint64_t nvml_start_mj_ = 0;
  bool nvml_ok_ = false, rapl_ok_ = false;
  std::vector<uint64_t> rapl_start_;
};

// The /summary figures of a run's energy over its measured steps (step indices `measured`), from each
// source's per-step rows (rows[source][step][column], NaN where nothing was read) and each step's
// times per rank (rank_times[step][rank]). A step counts for a source when every column with a reader
// has a value. Keys: energy_sources (the sources with counters, space-separated; "" for none);
// energy_<source>_j_per_step (the mean over its steps of the sum over its columns), <source>_devices
// (columns with a reader), power_<source>_w_per_device (each column's joules over its reader's time,
// summed over the steps, averaged over the columns); energy_j_per_step (the sum of the sources'; NaN
// without any), joules_per_token and tokens_per_joule (with tokens_per_step).
nlohmann::ordered_json energy_summary(const std::vector<EnergySource>& sources,
                                      const std::vector<std::vector<std::vector<double>>>& rows,
                                      const std::vector<std::vector<double>>& rank_times,
                                      const std::vector<int>& measured, double tokens_per_step);

}  // namespace pb
