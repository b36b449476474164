#include "common/metadata.h"

#include <hdf5.h>
#include <unistd.h>

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <limits>
#include <set>

#include "common/errors.h"
#include "kernels/cpu/cpu_backend.h"

extern char** environ;

namespace pb {

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

std::string utc_now_iso8601() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int64_t process_peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;  // kB
  }
  return 0;
}

namespace {

// A cgroup limit file: a byte count, or -1 for "max" (no limit) and for what cannot be read.
int64_t read_cgroup_bytes(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return -1;
  const long long v = std::atoll(text.c_str());
  // cgroup v1 reports "no limit" as a page-rounded 2^63 - 1.
  return v > 0 && v < (int64_t{1} << 62) ? v : -1;
}

// One counter of a memory.stat file ("inactive_file 123"); 0 when absent.
int64_t read_cgroup_stat(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string name;
  long long value = 0;
  while (in >> name >> value) {
    if (name == key) return value;
  }
  return 0;
}

}  // namespace

int64_t host_memory_available_bytes(std::string* source) {
  int64_t best = -1;
  {
    std::ifstream in("/proc/meminfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("MemAvailable:", 0) == 0) {
        best = std::atoll(line.c_str() + 13) * 1024;  // kB
        *source = "MemAvailable";
      }
    }
  }
  std::ifstream cgroups("/proc/self/cgroup");
  std::string line;
  while (std::getline(cgroups, line)) {
    // "0::/path" (v2) or "N:memory:/path" (v1)
    const std::size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    std::string path = line.substr(second + 1);
    const bool v2 = line.compare(0, first, "0") == 0 && controllers.empty();
    const bool v1 = controllers.find("memory") != std::string::npos;
    if (!v2 && !v1) continue;
    const std::string root = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory";
    const char* limit_file = v2 ? "memory.max" : "memory.limit_in_bytes";
    const char* usage_file = v2 ? "memory.current" : "memory.usage_in_bytes";
    while (true) {  // this cgroup and every one above it
      const std::string dir = root + (path == "/" ? "" : path);
      const int64_t limit = read_cgroup_bytes(dir + "/" + limit_file);
      // Usage counts the page cache; its inactive part is reclaimed before the limit is enforced.
      const int64_t usage = read_cgroup_bytes(dir + "/" + usage_file) -
                            read_cgroup_stat(dir + "/memory.stat", v2 ? "inactive_file" : "total_inactive_file");
      if (limit > 0) {
        const int64_t left = std::max<int64_t>(0, limit - std::max<int64_t>(0, usage));
        if (best < 0 || left < best) {
          best = left;
          *source = "cgroup " + path + " " + limit_file;
        }
      }
      if (path.empty() || path == "/") break;
      const std::size_t slash = path.rfind('/');
      path = slash == 0 ? "/" : path.substr(0, slash);
    }
  }
  return best;
}

int online_cores() {
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

std::string resolve_cluster_name(const std::string& option) {
  if (!option.empty()) return option;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  return env_or("PARABENCH_CLUSTER", env_or("SLURM_CLUSTER_NAME", host));
}

NodeLocal node_local(MPI_Comm world) {
  MPI_Comm shared;
  PB_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &shared));
  NodeLocal n;
  PB_MPI_CHECK(MPI_Comm_rank(shared, &n.local_rank));
  PB_MPI_CHECK(MPI_Comm_size(shared, &n.local_size));
  PB_MPI_CHECK(MPI_Comm_free(&shared));
  return n;
}

bool all_distinct(const std::vector<std::string>& ids) {
  std::set<std::string> seen;
  for (const std::string& id : ids) {
    if (id.empty() || !seen.insert(id).second) return false;
  }
  return true;
}

bool node_ranks_hold_distinct_devices(MPI_Comm world, const std::string& device_id) {
  MPI_Comm shared;
  PB_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &shared));
  int size = 1;
  PB_MPI_CHECK(MPI_Comm_size(shared, &size));
  constexpr int kIdLen = 64;
  char mine[kIdLen] = {};
  device_id.copy(mine, kIdLen - 1);
  std::vector<char> all(static_cast<std::size_t>(kIdLen) * size);
  PB_MPI_CHECK(MPI_Allgather(mine, kIdLen, MPI_CHAR, all.data(), kIdLen, MPI_CHAR, shared));
  PB_MPI_CHECK(MPI_Comm_free(&shared));
  std::vector<std::string> ids;
  for (int r = 0; r < size; ++r) ids.emplace_back(all.data() + static_cast<std::size_t>(r) * kIdLen);
  int distinct = all_distinct(ids) ? 1 : 0;
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &distinct, 1, MPI_INT, MPI_MIN, world));  // every node
  return distinct == 1;
}

int device_index_for(int local_rank, int visible_devices) {
  return visible_devices > 0 ? local_rank % visible_devices : -1;
}

namespace {

// A price from the environment: NaN when unset or empty, else a number ≥ 0; otherwise `error` says why.
double price_from_env(const char* name, std::string* error) {
  const std::string text = env_or(name, "");
  if (text.empty()) return std::numeric_limits<double>::quiet_NaN();
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !std::isfinite(value) || value < 0.0) {
    if (error->empty()) *error = std::string(name) + "=" + text + " is not a price: a number ≥ 0 (the cluster profile's)";
    return std::numeric_limits<double>::quiet_NaN();
  }
  return value;
}

}  // namespace

std::string read_prices(MPI_Comm world, Prices* prices) {
  std::string error;
  prices->per_gpu_hour = price_from_env("PB_PRICE_GPU_HOUR", &error);
  prices->per_node_hour = price_from_env("PB_PRICE_NODE_HOUR", &error);
  prices->electricity_per_kwh = price_from_env("PB_PRICE_KWH", &error);
  prices->currency = env_or("PB_CURRENCY", "");
  int rank = 0, size = 1;
  PB_MPI_CHECK(MPI_Comm_rank(world, &rank));
  PB_MPI_CHECK(MPI_Comm_size(world, &size));
  int lowest_failed = error.empty() ? size : rank;
  PB_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &lowest_failed, 1, MPI_INT, MPI_MIN, world));
  if (lowest_failed == size) return "";
  if (rank == lowest_failed && size > 1) error += " (rank " + std::to_string(rank) + ")";
  int length = static_cast<int>(error.size());
  PB_MPI_CHECK(MPI_Bcast(&length, 1, MPI_INT, lowest_failed, world));
  error.resize(static_cast<std::size_t>(length));
  PB_MPI_CHECK(MPI_Bcast(error.data(), length, MPI_CHAR, lowest_failed, world));
  return error;
}

SystemInfo collect_system_info(MPI_Comm world, const std::string& cluster, const Prices& prices, int device_index) {
  SystemInfo s;
  s.cluster = cluster;
  PB_MPI_CHECK(MPI_Comm_size(world, &s.ranks));
  const NodeLocal local = node_local(world);
  s.ranks_per_node = local.local_size;
  const int mine[2] = {local.local_rank, device_index};
  std::vector<int> both(2 * static_cast<std::size_t>(s.ranks));
  PB_MPI_CHECK(MPI_Allgather(mine, 2, MPI_INT, both.data(), 2, MPI_INT, world));
  for (int r = 0; r < s.ranks; ++r) {
    s.local_ranks.push_back(both[2 * static_cast<std::size_t>(r)]);
    s.device_indices.push_back(both[2 * static_cast<std::size_t>(r) + 1]);
  }

  constexpr int kHostLen = 256;
  char host[kHostLen] = {};
  gethostname(host, kHostLen - 1);
  std::vector<char> all(static_cast<std::size_t>(kHostLen) * s.ranks);
  PB_MPI_CHECK(MPI_Allgather(host, kHostLen, MPI_CHAR, all.data(), kHostLen, MPI_CHAR, world));
  std::set<std::string> unique;
  for (int r = 0; r < s.ranks; ++r) {
    s.hostnames.emplace_back(all.data() + static_cast<std::size_t>(r) * kHostLen);
    unique.insert(s.hostnames.back());
  }
  s.nodes = static_cast<int>(unique.size());

  s.cpu_model = cpu_model_name();
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int len = 0;
  MPI_Get_library_version(mpi_version, &len);
  s.mpi_library = std::string(mpi_version, len);
  s.mpi_library = s.mpi_library.substr(0, s.mpi_library.find('\n'));
  s.blas_library = openblas_get_config();
  unsigned major = 0, minor = 0, release = 0;
  H5get_libversion(&major, &minor, &release);
  s.hdf5_version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
#if defined(__clang__)
  s.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  s.compiler = std::string("gcc ") + __VERSION__;
#endif
  s.slurm_job_id = env_or("SLURM_JOB_ID", "");
  s.price_per_gpu_hour = prices.per_gpu_hour;
  s.price_per_node_hour = prices.per_node_hour;
  s.electricity_price_per_kwh = prices.electricity_per_kwh;
  s.currency = prices.currency;
  s.slurm_partition = env_or("SLURM_JOB_PARTITION", "");

  static const char* kPrefixes[] = {"SLURM_", "NCCL_", "OMP_", "OPENBLAS_", "CUDA_VISIBLE_DEVICES="};
  for (char** e = environ; *e != nullptr; ++e) {
    for (const char* p : kPrefixes) {
      if (std::strncmp(*e, p, std::strlen(p)) == 0) {
        s.environment.emplace_back(*e);
        break;
      }
    }
  }
  std::sort(s.environment.begin(), s.environment.end());
  return s;
}

bool device_peak(const std::string& device_name, DevicePeak* out) {
  struct Entry {
    const char* name;  // a substring of the CUDA device name; the first match wins
    DevicePeak peak;
  };
  // Dense TFLOP/s from the vendors' data sheets (SXM boards unless named), HBM bandwidth likewise:
  // H200 141 GB HBM3e 4.8 TB/s, H100 SXM 80 GB HBM3 3.35 TB/s, H100 PCIe 2.0 TB/s, H100 NVL 3.9 TB/s,
  // GH200 (96 GB HBM3) 4.0 TB/s, A100 80 GB SXM 2.039 TB/s.
  static const Entry kPeaks[] = {{"H200", {989.0, 67.0, 4.8}},     {"H100 PCIe", {756.0, 51.0, 2.0}},
                                 {"H100 NVL", {835.0, 60.0, 3.9}}, {"H100", {989.0, 67.0, 3.35}},
                                 {"GH200", {989.0, 67.0, 4.0}},    {"A100", {312.0, 19.5, 2.039}}};
  for (const Entry& e : kPeaks) {
    if (device_name.find(e.name) != std::string::npos) {
      *out = e.peak;
      return true;
    }
  }
  return false;
}

}  // namespace pb
