// Energy counters (see energy.h).
#include "common/energy.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#ifdef PB_WITH_CUDA
#include <dlfcn.h>
#endif

namespace pb {

namespace {

// The first line of a sysfs file, or false with the operating system's reason in *why.
bool read_line(const std::string& path, std::string* line, std::string* why) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) {
    *why = path + ": " + std::strerror(errno);
    return false;
  }
  char buf[128];
  errno = 0;
  const bool got = std::fgets(buf, sizeof buf, f) != nullptr;
  const int err = errno;
  std::fclose(f);
  if (!got) {
    *why = path + ": " + (err != 0 ? std::strerror(err) : "empty");
    return false;
  }
  *line = buf;
  while (!line->empty() && (line->back() == '\n' || line->back() == ' ')) line->pop_back();
  return true;
}

bool read_u64(const std::string& path, uint64_t* value, std::string* why) {
  std::string line;
  if (!read_line(path, &line, why)) return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(line.c_str(), &end, 10);
  if (line.empty() || end == line.c_str() || *end != '\0' || errno != 0) {
    *why = path + ": not a number (\"" + line + "\")";
    return false;
  }
  *value = v;
  return true;
}

}  // namespace

uint64_t rapl_delta_uj(uint64_t start, uint64_t end, uint64_t max_range_uj) {
  return end >= start ? end - start : end + (max_range_uj - start);
}

std::string powercap_root() {
  const char* fake = std::getenv("PB_POWERCAP_ROOT");
  return fake != nullptr && *fake != '\0' ? fake : "/sys/class/powercap";
}

// The zones: "<root>/<zone>" with a name file; a package's subzones are "<zone>:<n>" beside it (sysfs
// lists every zone at the top of /sys/class/powercap, the hierarchy in the names: intel-rapl:0 and its
// intel-rapl:0:2). Counted, of the intel-rapl control type: top-level zones (one colon) named package-N
// or dram, and subzones named dram. A zone whose counter or range cannot be read makes the whole source unavailable (a partial sum
// would pass for the node's energy).
RaplCounters::RaplCounters(const std::string& root) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    why_not_ = "no " + root;
    return;
  }
  std::vector<std::string> zones;
  for (const fs::directory_entry& e : fs::directory_iterator(root, ec)) zones.push_back(e.path().filename().string());
  std::sort(zones.begin(), zones.end());
  std::vector<Domain> found;
  for (const std::string& zone : zones) {
    const std::size_t colons = static_cast<std::size_t>(std::count(zone.begin(), zone.end(), ':'));
    // the MSR interface's zones only ("intel-rapl:N", also on AMD): "intel-rapl-mmio:N" is a second view
    // of a package, and "intel-rapl" itself the control type
    if (zone.rfind("intel-rapl:", 0) != 0 || colons > 2) continue;
    const std::string dir = root + "/" + zone;
    std::string name, why;
    if (!read_line(dir + "/name", &name, &why)) continue;  // not a zone
    const bool package = name.rfind("package-", 0) == 0;
    const bool counted = colons == 1 ? (package || name == "dram") : name == "dram";
    if (!counted) continue;
    Domain d;
    d.energy_path = dir + "/energy_uj";
    uint64_t now = 0;
    if (!read_u64(dir + "/max_energy_range_uj", &d.max_range_uj, &why) || !read_u64(d.energy_path, &now, &why)) {
      why_not_ = why;
      return;
    }
    if (colons == 2) {  // named after its package: "package-0/dram"
      std::string parent;
      const std::string parent_dir = root + "/" + zone.substr(0, zone.rfind(':'));
      d.name = (read_line(parent_dir + "/name", &parent, &why) ? parent : zone.substr(0, zone.rfind(':'))) + "/" + name;
    } else {
      d.name = name;
    }
    found.push_back(d);
  }
  if (found.empty()) {
    why_not_ = "no package or dram zone under " + root;
    return;
  }
  domains_ = std::move(found);
}

std::vector<std::string> RaplCounters::domain_names() const {
  std::vector<std::string> names;
  for (const Domain& d : domains_) names.push_back(d.name);
  return names;
}

bool RaplCounters::read(std::vector<uint64_t>* uj) const {
  std::vector<uint64_t> values(domains_.size());
  std::string why;
  for (std::size_t i = 0; i < domains_.size(); ++i) {
    if (!read_u64(domains_[i].energy_path, &values[i], &why)) return false;
  }
  *uj = std::move(values);
  return true;
}

double RaplCounters::joules_between(const std::vector<uint64_t>& start, const std::vector<uint64_t>& end) const {
  uint64_t total = 0;
  for (std::size_t i = 0; i < domains_.size(); ++i) total += rapl_delta_uj(start[i], end[i], domains_[i].max_range_uj);
  return static_cast<double>(total) * 1e-6;
}

// ---- NVML -------------------------------------------------------------------------------------------
// Loaded at run time (dlopen), so that a build runs where no driver is installed, and a machine without
// one records why. The CUDA toolkit does not always ship nvml.h (its nvml-dev package), so the five
// functions are declared here as NVML's C API defines them (nvml.h: nvmlReturn_t is an enum whose
// success is 0; a device is an opaque pointer).
#ifdef PB_WITH_CUDA
namespace nvml {
using Return = int;
constexpr Return kSuccess = 0;
using Device = struct nvmlDevice_st*;
using Init = Return (*)();
using Shutdown = Return (*)();
using ErrorString = const char* (*)(Return);
using HandleByPciBusId = Return (*)(const char*, Device*);
using TotalEnergy = Return (*)(Device, unsigned long long*);  // mJ since the driver loaded
}  // namespace nvml

struct EnergyMeter::Nvml {
  void* lib = nullptr;
  nvml::Shutdown shutdown = nullptr;
  nvml::TotalEnergy energy = nullptr;
  nvml::Device device = nullptr;
  ~Nvml() {
    if (shutdown != nullptr) shutdown();
    if (lib != nullptr) dlclose(lib);
  }
  // The counter of the GPU at `bus_id`, or null with the reason.
  static std::unique_ptr<Nvml> open(const std::string& bus_id, std::string* why) {
    auto n = std::make_unique<Nvml>();
    n->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (n->lib == nullptr) {
      const char* e = dlerror();
      *why = e != nullptr ? e : "libnvidia-ml.so.1 not found";
      return nullptr;
    }
    auto init = reinterpret_cast<nvml::Init>(dlsym(n->lib, "nvmlInit_v2"));
    auto by_bus = reinterpret_cast<nvml::HandleByPciBusId>(dlsym(n->lib, "nvmlDeviceGetHandleByPciBusId_v2"));
    auto text = reinterpret_cast<nvml::ErrorString>(dlsym(n->lib, "nvmlErrorString"));
    n->energy = reinterpret_cast<nvml::TotalEnergy>(dlsym(n->lib, "nvmlDeviceGetTotalEnergyConsumption"));
    auto shutdown = reinterpret_cast<nvml::Shutdown>(dlsym(n->lib, "nvmlShutdown"));
    if (init == nullptr || by_bus == nullptr || text == nullptr || n->energy == nullptr || shutdown == nullptr) {
      *why = "libnvidia-ml.so.1 lacks the energy counter's functions (a driver older than Volta's)";
      return nullptr;
    }
    nvml::Return rc = init();
    if (rc != nvml::kSuccess) {
      *why = std::string("nvmlInit: ") + text(rc);
      return nullptr;
    }
    n->shutdown = shutdown;
    rc = by_bus(bus_id.c_str(), &n->device);
    unsigned long long mj = 0;
    if (rc == nvml::kSuccess) rc = n->energy(n->device, &mj);
    if (rc != nvml::kSuccess) {  // NVML_ERROR_NOT_SUPPORTED before Volta
      *why = "GPU " + bus_id + ": " + text(rc);
      return nullptr;
    }
    return n;
  }
  bool read_mj(uint64_t* mj) const {
    unsigned long long v = 0;
    if (energy(device, &v) != nvml::kSuccess) return false;
    *mj = v;
    return true;
  }
};
#else
struct EnergyMeter::Nvml {
  bool read_mj(uint64_t*) const { return false; }
};
#endif

namespace {

// Every rank's string, through fixed-size slots (longer ones are cut).
std::vector<std::string> all_gather_strings(Communicator& world, const std::string& mine) {
  constexpr std::size_t kSlot = 384;
  std::vector<char> send(kSlot, '\0'), recv(kSlot * world.size());
  std::memcpy(send.data(), mine.data(), std::min(mine.size(), kSlot - 1));
  world.all_gather_host(send.data(), recv.data(), kSlot);
  std::vector<std::string> out;
  for (int r = 0; r < world.size(); ++r) out.emplace_back(recv.data() + r * kSlot);
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const std::string& s : v) out += (out.empty() ? "" : " ") + s;
  return out;
}

}  // namespace

EnergyMeter::EnergyMeter(Communicator& world, const std::vector<std::string>& hostnames,
                         const std::vector<int>& local_ranks, const std::string& gpu_pci_bus_id,
                         const std::string& powercap_dir) {
  const int rank = world.rank(), ranks = world.size();

  // ---- nvml: one column per rank ----
  std::string nvml_detail;
  bool nvml_open = false;
#ifdef PB_WITH_CUDA
  if (gpu_pci_bus_id.empty()) {
    nvml_detail = "drives no GPU";
  } else if ((nvml_ = Nvml::open(gpu_pci_bus_id, &nvml_detail)) != nullptr) {
    nvml_open = true;
    nvml_detail = "GPU " + gpu_pci_bus_id;
  }
#else
  (void)gpu_pci_bus_id;
  nvml_detail = "this build has no CUDA (configure with --preset cuda)";
#endif
  const std::vector<std::string> nvml_all = all_gather_strings(world, (nvml_open ? "1" : "0") + nvml_detail);
  EnergySource nvml;
  nvml.name = "nvml";
  nvml.counter = "NVML total energy of the rank's GPU (nvmlDeviceGetTotalEnergyConsumption)";
  nvml.columns = "ranks";
  for (int r = 0; r < ranks; ++r) {
    const bool open = nvml_all[r][0] == '1';
    std::string detail = nvml_all[r].substr(1);
    int reader = -1;
    if (open) {
      reader = r;
      for (int o = 0; o < r; ++o) {  // a GPU that a lower rank of the node reads already
        if (nvml_all[o][0] == '1' && hostnames[o] == hostnames[r] && nvml_all[o].substr(1) == detail) {
          detail = "its GPU is read by rank " + std::to_string(o);
          reader = -1;
          break;
        }
      }
    }
    nvml.read_by.push_back(reader);
    nvml.detail.push_back(detail);
    nvml.available = nvml.available || reader >= 0;
  }
  if (nvml.read_by[rank] < 0) nvml_.reset();
  if (!nvml.available) nvml.reason = "no counter: " + nvml.detail[0];

  // ---- rapl: one column per node, read by its first rank ----
  std::string rapl_detail;
  if (local_ranks[rank] == 0) {
    rapl_ = std::make_unique<RaplCounters>(powercap_dir);
    rapl_detail = rapl_->available() ? "1" + join(rapl_->domain_names()) : "0" + rapl_->why_not();
    if (!rapl_->available()) rapl_.reset();
  }
  const std::vector<std::string> rapl_all = all_gather_strings(world, rapl_detail);
  EnergySource rapl;
  rapl.name = "rapl";
  rapl.counter = "powercap (RAPL) energy of the node's CPU packages and DRAM";
  rapl.columns = "nodes";
  for (int r = 0; r < ranks; ++r) {
    if (local_ranks[r] != 0) continue;  // nodes in the order of their first ranks
    const bool open = rapl_all[r][0] == '1';
    rapl.read_by.push_back(open ? r : -1);
    rapl.detail.push_back(rapl_all[r].substr(1));
    rapl.available = rapl.available || open;
  }
  if (!rapl.available) rapl.reason = "no counter: " + (rapl.detail.empty() ? std::string("no node") : rapl.detail[0]);
  sources_ = {nvml, rapl};
}

EnergyMeter::~EnergyMeter() = default;

void EnergyMeter::start() {
  nvml_ok_ = nvml_ != nullptr && nvml_->read_mj(&nvml_start_mj_);
  rapl_ok_ = rapl_ != nullptr && rapl_->read(&rapl_start_);
}

std::vector<double> EnergyMeter::stop() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> joules(sources_.size(), nan);
  uint64_t mj = 0;
  if (nvml_ok_ && nvml_->read_mj(&mj) && mj >= nvml_start_mj_) joules[0] = static_cast<double>(mj - nvml_start_mj_) * 1e-3;
  std::vector<uint64_t> uj;
  if (rapl_ok_ && rapl_->read(&uj)) joules[1] = rapl_->joules_between(rapl_start_, uj);
  return joules;
}

}  // namespace pb

namespace pb {

nlohmann::ordered_json energy_summary(const std::vector<EnergySource>& sources,
                                      const std::vector<std::vector<std::vector<double>>>& rows,
                                      const std::vector<std::vector<double>>& rank_times,
                                      const std::vector<int>& measured, double tokens_per_step) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  nlohmann::ordered_json out;
  std::string names;
  double total = 0.0;
  bool any = false;
  for (std::size_t src = 0; src < sources.size(); ++src) {
    const EnergySource& s = sources[src];
    if (!s.available) continue;
    names += (names.empty() ? "" : " ") + s.name;
    std::vector<double> joules(s.read_by.size(), 0.0), seconds(s.read_by.size(), 0.0);
    double sum = 0.0;
    int steps = 0;
    for (int step : measured) {
      const std::vector<double>& row = rows[src][step];
      bool complete = true;
      for (std::size_t c = 0; c < row.size(); ++c) complete = complete && (s.read_by[c] < 0 || std::isfinite(row[c]));
      if (!complete) continue;
      ++steps;
      for (std::size_t c = 0; c < row.size(); ++c) {
        if (s.read_by[c] < 0) continue;
        sum += row[c];
        joules[c] += row[c];
        seconds[c] += rank_times[step][s.read_by[c]];
      }
    }
    int devices = 0;
    double power = 0.0;
    for (std::size_t c = 0; c < joules.size(); ++c) {
      if (s.read_by[c] < 0) continue;
      ++devices;
      power += seconds[c] > 0.0 ? joules[c] / seconds[c] : nan;
    }
    const double per_step = steps > 0 ? sum / steps : nan;
    out["energy_" + s.name + "_j_per_step"] = per_step;
    out[s.name + "_devices"] = devices;
    out["power_" + s.name + "_w_per_device"] = steps > 0 && devices > 0 ? power / devices : nan;
    total += per_step;
    any = true;
  }
  const double per_step = any ? total : nan;
  out["energy_sources"] = names;
  out["energy_j_per_step"] = per_step;
  out["joules_per_token"] = per_step / tokens_per_step;
  out["tokens_per_joule"] = tokens_per_step / per_step;
  return out;
}

}  // namespace pb
