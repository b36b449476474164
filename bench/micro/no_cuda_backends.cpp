// add_cuda_backends and make_nccl_world of a build without the CUDA backend (configured without PB_CUDA).
#include "bench/micro/backends.h"

namespace pb {

std::string add_cuda_backends(std::vector<MicroBackend>*, int) {
  return "not built (configure with --preset cuda)";
}

std::unique_ptr<Communicator> make_nccl_world(std::vector<MicroBackend>&) { return nullptr; }

}  // namespace pb
