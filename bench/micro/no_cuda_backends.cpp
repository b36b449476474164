// add_cuda_backends, micro_device_id and make_nccl_world of a build without the CUDA backend (configured without PB_CUDA).
#include "bench/micro/backends.h"

namespace pb {

std::string add_cuda_backends(std::vector<MicroBackend>*, int) {
  return "not built (configure with --preset cuda)";
}

std::string micro_device_id(int) { return ""; }

std::unique_ptr<Communicator> make_nccl_world(std::vector<MicroBackend>&) { return nullptr; }

}  // namespace pb
