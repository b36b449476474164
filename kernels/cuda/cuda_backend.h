// The CUDA backend: cuBLAS for the matrix products, CUDA kernels for the rest, a fused causal
// attention that keeps no S×S matrix, and a caching device allocator that reports to the tracker.
//
// Every tensor is stored in fp32. With `bf16_matmul` every matrix product rounds its two operands to
// bf16 (nearest even) into backend-owned device workspace and hands cuBLAS CUDA_R_16BF operands with
// fp32 accumulation and an fp32 output (CUBLAS_COMPUTE_32F): the bf16 tensor cores are required, not
// merely permitted. Everything else, and all storage, stays fp32. Without it the products are plain
// fp32 (TF32 off), so that the fp32 mode agrees with the CPU backend to rounding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/backend.h"

namespace pb {

// The largest head dimension (hidden / heads) the fused attention kernels take.
inline constexpr int kCudaMaxHeadDim = 128;

// GPUs this process can see (0 when there is no driver or no device).
int cuda_visible_device_count();

// A backend on `device`, whose work runs on one compute stream.
std::unique_ptr<Backend> make_cuda_backend(int device, bool bf16_matmul);

// The stream a CUDA backend queues its work on (communicators order their work after it).
cudaStream_t cuda_compute_stream(Backend& backend);

// Throws RunError (exit 3) naming the call, file and line when `status` is not cudaSuccess.
void cuda_check(cudaError_t status, const char* call, const char* file, int line);

}  // namespace pb

#define PB_CUDA_CHECK(call) ::pb::cuda_check((call), #call, __FILE__, __LINE__)
