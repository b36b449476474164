// add_cuda_backends of a build without the CUDA backend (configured without PB_CUDA).
#include "bench/micro/backends.h"

namespace pb {

std::string add_cuda_backends(std::vector<MicroBackend>*) {
  return "not built (configure with --preset cuda)";
}

}  // namespace pb
