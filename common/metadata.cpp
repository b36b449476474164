#include "common/metadata.h"

#include <hdf5.h>
#include <unistd.h>

#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
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

SystemInfo collect_system_info(MPI_Comm world, const std::string& cluster) {
  SystemInfo s;
  s.cluster = cluster;
  PB_MPI_CHECK(MPI_Comm_size(world, &s.ranks));
  s.ranks_per_node = node_local(world).local_size;

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

}  // namespace pb
