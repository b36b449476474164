// The CPU backend: OpenBLAS sgemm (or oneDNN's bf16 matmul) for the matrix products, OpenMP loops for
// the rest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/backend.h"

namespace pb {

// threads: compute threads for BLAS and OpenMP (≥ 1). bf16_matmul: the matrix products round their
// operands to bf16 and accumulate in fp32 (kernels/cpu/bf16_gemm.h); every tensor stays fp32.
std::unique_ptr<Backend> make_cpu_backend(int threads, bool bf16_matmul = false);

// The host CPU's model name (/proc/cpuinfo), for the result file's /system.
std::string cpu_model_name();

// The context-parallel attention ops of the CPU backend (kernels/cpu/cp_ops.cpp) and its mixture-of-experts
// ops (kernels/cpu/moe_ops.cpp): the CPU backend's overrides of the Backend calls of the same name, whose
// comments in kernels/backend.h are the contract.
namespace cpu {
void attention_block_forward(float* out, float* lse, const float* q, const float* k, const float* v, int q_stride,
                             int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                             int heads);
void attention_merge(float* out, float* lse, const float* out_b, const float* lse_b, int B, int Sq, int C, int heads);
void attention_block_delta(float* delta, const float* dout, const float* out, int B, int Sq, int C, int heads);
void attention_block_backward(float* dq, float* dk, float* dv, const float* dout, const float* lse,
                              const float* delta, const float* q, const float* k, const float* v, int q_stride,
                              int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                              int heads);
void copy_2d(float* dst, std::size_t dst_stride, const float* src, std::size_t src_stride, std::size_t rows,
             std::size_t cols);

void moe_router_forward(int32_t* expert, float* gate, float* probs, const float* logits, int N, int E, int k);
void moe_router_backward(float* dlogits, const float* dgate, const float* gate, const int32_t* expert, int N, int E,
                         int k);
void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k, int capacity);
void moe_aux_loss(float* dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                  float coef, float grad_scale);
void moe_dispatch(float* buf, const float* inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                  int C, int h);
void moe_dispatch_backward(float* dinp, const float* dbuf, const int32_t* expert, const int32_t* slot, int N, int E,
                           int k, int C, int h);
void moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert, const int32_t* slot, int N,
                 int E, int k, int C, int h);
void moe_combine_backward(float* dbuf, float* dgate, const float* dout, const float* buf, const float* gate,
                          const int32_t* expert, const int32_t* slot, int N, int E, int k, int C, int h);
}  // namespace cpu

}  // namespace pb
