// The CUDA backend: cuBLAS for the matrix products, CUDA kernels for the rest, a fused causal
// attention that keeps no S×S matrix, and a caching device allocator that reports to the tracker.
//
// Each tensor in its own dtype (kernels/backend.h, kernels/dtype.h): every kernel is a template over its
// tensors' element types (fp32 as float, bf16 as its uint16_t bits), computes in fp32 and rounds a bf16
// output once; the ops dispatch on the dtypes and refuse combinations they do not take with
// std::invalid_argument (docs/cuda.md, "Precision: dtype combinations"). bf16 tensors are cuBLAS
// CUDA_R_16BF operands as they are (fp32 accumulation, CUBLAS_COMPUTE_32F). For fp32 tensors, with
// `bf16_matmul` every matrix product rounds its two operands to bf16 (nearest even) into backend-owned
// device workspace and hands cuBLAS CUDA_R_16BF operands with fp32 accumulation and an fp32 output: the
// bf16 tensor cores are required, not merely permitted. Without it the products of fp32 tensors are
// plain fp32 (TF32 off), so that the fp32 mode agrees with the CPU backend to rounding.
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

// The PCI bus id of visible device `device` ("0000:1B:00.0"): the physical GPU, whatever
// CUDA_VISIBLE_DEVICES numbers it in this process; empty when it cannot be read.
std::string cuda_device_pci_bus_id(int device);

// True when this build has cuDNN's fused attention (kernels/cuda/cudnn_attention.h; PB_WITH_CUDNN).
bool cuda_cudnn_attention_built();
// "cuDNN 9.19.0 (frontend 1.32.0)"; empty without it.
std::string cuda_cudnn_version();

// A backend on `device`, whose work runs on one compute stream. With `cudnn_attention` (a build that
// has it) attention_forward and attention_backward run cuDNN's fused attention on bf16 tensors
// (std::invalid_argument on fp32 ones); otherwise parabench's own kernels.
std::unique_ptr<Backend> make_cuda_backend(int device, bool bf16_matmul, bool cudnn_attention = false);

// The stream a CUDA backend queues its work on (communicators order their work after it).
cudaStream_t cuda_compute_stream(Backend& backend);

// Marks this process's device failed by something outside the backend's own calls (a NCCL watchdog
// that aborted its communicator, from its own thread): the backend's next wait or launch throws
// RunError (exit 3) with `why`. The first failure is kept.
void cuda_fail_async(const std::string& why);
// True once cuda_fail_async has been called in this process; its reason ("" before).
bool cuda_failed_async();
std::string cuda_async_failure();

// Settings of the environment that must precede MPI's and CUDA's threads (main calls it first): cuDNN's
// attention workspace cap (kernels/cuda/cudnn_attention.cpp), unless the user has set it.
void cuda_prepare_environment();

// Throws RunError (exit 3) naming the call, file and line when `status` is not cudaSuccess.
void cuda_check(cudaError_t status, const char* call, const char* file, int line);

}  // namespace pb

#define PB_CUDA_CHECK(call) ::pb::cuda_check((call), #call, __FILE__, __LINE__)
