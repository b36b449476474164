// Run metadata for /system (SPEC section 6): where and on what the run happened.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <mpi.h>

namespace pb {

struct SystemInfo {
  std::string cluster;
  int nodes = 1, ranks = 1, ranks_per_node = 1;
  std::string cpu_model, gpu_model;
  int64_t gpu_memory_bytes = 0;
  int gpus_per_node = 0;
  std::string driver_version, cuda_version, nccl_version;
  std::string mpi_library, blas_library, hdf5_version, compiler;
  std::string slurm_job_id, slurm_partition;
  std::vector<std::string> hostnames;    // per rank
  std::vector<int> local_ranks;          // per rank: its index among the ranks of its node
  std::vector<int> device_indices;       // per rank: the GPU it drives (device_index_for), -1 for none
  std::vector<std::string> environment;  // KEY=VALUE of SLURM_*, NCCL_*, OMP_*, OPENBLAS_*, CUDA_VISIBLE_DEVICES
  // What the cluster profile says an hour of the hardware and a kWh cost (PB_PRICE_GPU_HOUR,
  // PB_PRICE_NODE_HOUR, PB_PRICE_KWH, in PB_CURRENCY; jobs/clusters/*.env), NaN where it states none:
  // the report's cost per million tokens.
  double price_per_gpu_hour = std::numeric_limits<double>::quiet_NaN();
  double price_per_node_hour = std::numeric_limits<double>::quiet_NaN();
  double electricity_price_per_kwh = std::numeric_limits<double>::quiet_NaN();
  std::string currency;
};

// Ranks sharing this rank's node (MPI_COMM_TYPE_SHARED) and this rank's index among them.
struct NodeLocal {
  int local_rank = 0;
  int local_size = 1;
};
NodeLocal node_local(MPI_Comm world);

// True when every id is non-empty and no two are equal.
bool all_distinct(const std::vector<std::string>& ids);
// Collective over `world`: whether the ranks of each node all hold distinct devices, given each rank's
// device id (its GPU's PCI bus id; empty: none), so that each can own its GPU (NCCL refuses two ranks
// on one GPU). The same answer on every rank: true only if it holds on every node.
bool node_ranks_hold_distinct_devices(MPI_Comm world, const std::string& device_id);

// The GPU a rank drives: its local rank modulo the GPUs its process sees (each rank of a node its own
// GPU when the node's ranks see them all; the one it sees under --gpus-per-task=1 or a per-rank
// CUDA_VISIBLE_DEVICES); -1 without GPUs.
int device_index_for(int local_rank, int visible_devices);

// The cluster profile's prices (jobs/clusters/*.env), as SystemInfo records them.
struct Prices {
  double per_gpu_hour = std::numeric_limits<double>::quiet_NaN();  // PB_PRICE_GPU_HOUR
  double per_node_hour = std::numeric_limits<double>::quiet_NaN();  // PB_PRICE_NODE_HOUR
  double electricity_per_kwh = std::numeric_limits<double>::quiet_NaN();  // PB_PRICE_KWH
  std::string currency;  // PB_CURRENCY
};

// Collective over `world`, part of validating the configuration: every rank reads the prices from its
// own environment (unset or empty: NaN, not stated; otherwise a number ≥ 0). Returns "" when every
// rank's are valid; otherwise, on every rank, the message of the lowest rank whose are not, so that
// the caller ends every rank with exit 2 and the same words rather than aborting the job.
std::string read_prices(MPI_Comm world, Prices* prices);

// Collective over `world`: gathers hostnames, local ranks and device indices (device_index: this rank's,
// -1 for none) and counts nodes. The GPU fields stay empty: the runner fills them from the backend.
SystemInfo collect_system_info(MPI_Comm world, const std::string& cluster, const Prices& prices,
                               int device_index = -1);

// --cluster, else $PARABENCH_CLUSTER, else $SLURM_CLUSTER_NAME, else the host name.
std::string resolve_cluster_name(const std::string& option);

std::string utc_now_iso8601();
std::string env_or(const char* name, const std::string& fallback);
int64_t process_peak_rss_bytes();  // VmHWM

// Host memory this node can still give: the smaller of MemAvailable and, for this process's memory
// cgroup and each cgroup above it (v2, or v1's memory controller), its limit less its usage. `source`
// says which bounded it ("MemAvailable", "cgroup /slurm/uid_0/job_12 memory.max"); -1 when unknown.
int64_t host_memory_available_bytes(std::string* source);
int online_cores();

// The dense peak of a GPU model (SPEC 6's table) and its memory bandwidth, from a CUDA device name
// ("NVIDIA H200"); false for devices the table does not know (CPUs, other GPUs). The apps' MFU and
// parabench-micro's peak fractions both use it.
struct DevicePeak {
  double bf16_tflops = 0, fp32_tflops = 0;  // dense, tensor cores for bf16, no TF32 for fp32
  double memory_tb_per_s = 0;               // HBM, 10^12 bytes/s
};
bool device_peak(const std::string& device_name, DevicePeak* out);

}  // namespace pb
