// The CPU backend: oneDNN's or OpenBLAS's sgemm (or oneDNN's bf16 matmul) for the matrix products,
// OpenMP loops for the rest.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/backend.h"
#include "kernels/cpu/sgemm.h"

namespace pb {

// threads: compute threads for BLAS and OpenMP (≥ 1). bf16_matmul: the matrix products of fp32 tensors
// round their operands to bf16 and accumulate in fp32 (kernels/cpu/bf16_gemm.h). Every op also runs on
// bf16 tensors (kernels/backend.h); their products take the bf16 operands as they are, whatever
// bf16_matmul says. sgemm: the library of the fp32 products (and of the attention's per-head products).
std::unique_ptr<Backend> make_cpu_backend(int threads, bool bf16_matmul = false,
                                          cpu::SgemmLibrary sgemm = cpu::default_sgemm_library());

// The host CPU's model name (/proc/cpuinfo), for the result file's /system.
std::string cpu_model_name();

// The context-parallel attention ops of the CPU backend (kernels/cpu/cp_ops.cpp) and its mixture-of-experts
// ops (kernels/cpu/moe_ops.cpp): the CPU backend's overrides of the Backend calls of the same name, whose
// comments in kernels/backend.h are the contract, with their dtypes: each of the context-parallel ops'
// tensors in either dtype (q, k, v and dout widened to fp32 per sample and head, outputs summed in fp32
// and rounded once); copy_2d and each MoE op with its tensors all in one dtype. Anything else throws
// std::invalid_argument.
namespace cpu {
void attention_block_forward(TensorPtr out, float* lse, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v,
                             int q_stride, int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq,
                             int Sk, int C, int heads, int kv_heads);
void attention_merge(TensorPtr out, float* lse, ConstTensorPtr out_b, const float* lse_b, int B, int Sq, int C,
                     int heads);
void attention_block_delta(float* delta, ConstTensorPtr dout, ConstTensorPtr out, int B, int Sq, int C, int heads);
void attention_block_backward(TensorPtr dq, TensorPtr dk, TensorPtr dv, ConstTensorPtr dout, const float* lse,
                              const float* delta, ConstTensorPtr q, ConstTensorPtr k, ConstTensorPtr v, int q_stride,
                              int kv_stride, const int32_t* pos_q, const int32_t* pos_k, int B, int Sq, int Sk, int C,
                              int heads, int kv_heads);
void copy_2d(TensorPtr dst, std::size_t dst_stride, ConstTensorPtr src, std::size_t src_stride, std::size_t rows,
             std::size_t cols);

void moe_router_forward(int32_t* expert, float* gate, float* probs, ConstTensorPtr logits, int N, int E, int k);
void moe_router_backward(TensorPtr dlogits, const float* dgate, const float* gate, const int32_t* expert, int N,
                         int E, int k);
void moe_assign(int32_t* slot, int32_t* counts, const int32_t* expert, int N, int E, int k, int capacity);
void moe_aux_loss(TensorPtr dlogits, double* aux_sum, const float* probs, const int32_t* counts, int N, int E, int k,
                  float coef, float grad_scale);
void moe_dispatch(TensorPtr buf, ConstTensorPtr inp, const int32_t* expert, const int32_t* slot, int N, int E, int k,
                  int C, int h);
void moe_dispatch_backward(TensorPtr dinp, ConstTensorPtr dbuf, const int32_t* expert, const int32_t* slot, int N,
                           int E, int k, int C, int h);
void moe_combine(TensorPtr out, ConstTensorPtr buf, const float* gate, const int32_t* expert, const int32_t* slot,
                 int N, int E, int k, int C, int h);
void moe_combine_backward(TensorPtr dbuf, float* dgate, ConstTensorPtr dout, ConstTensorPtr buf, const float* gate,
                          const int32_t* expert, const int32_t* slot, int N, int E, int k, int C, int h);
}  // namespace cpu

}  // namespace pb
