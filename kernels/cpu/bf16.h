// bfloat16 on the CPU: the upper 16 bits of an IEEE fp32, held as uint16_t bits. Conversion from fp32
// rounds to nearest, ties to even (as __float2bfloat16_rn, torch's .to(bfloat16) and the AVX-512 BF16
// instruction vcvtneps2bf16); a NaN stays a quiet NaN of the same sign.
//
// Below the conversions: what the CPU backend's kernels use to be written once for both dtypes. A kernel
// is a template over the element type of each tensor (float for fp32, uint16_t for bf16, as
// TensorPtr::as<T>() hands them out) that reads elements with load() and writes them with store(),
// computing in fp32 in between; the backend's override picks the instantiation from the tensors' dtypes
// with dispatch(), after common_dtype() has checked the tensors that must agree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/dtype.h"

namespace pb::cpu {

inline uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN: keep it quiet
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// dst[i] = bf16(src[i]) for n elements (OpenMP over the calling thread's team).
void to_bf16(uint16_t* dst, const float* src, std::size_t n);

// ---- kernels over the element type --------------------------------------------------------------

// An element as fp32 (exact for both), and a value stored as an element (bf16: rounded to nearest even).
inline float load(float x) { return x; }
inline float load(uint16_t x) { return bf16_to_float(x); }
inline void store(float& dst, float x) { dst = x; }
inline void store(uint16_t& dst, float x) { dst = float_to_bf16(x); }

template <typename T>
constexpr bool is_fp32 = std::is_same_v<std::remove_const_t<T>, float>;

// Where a kernel sums a row of an output over several terms: the row itself when it is fp32, otherwise
// `scratch` (as many floats), which finish_row() then rounds into the row once.
template <typename T>
float* accumulator_row(T* row, float* scratch) {
  if constexpr (is_fp32<T>) {
    return row;
  } else {
    return scratch;
  }
}
template <typename T>
void finish_row(T* row, const float* acc, std::size_t n) {
  if constexpr (!is_fp32<T>) {
    for (std::size_t i = 0; i < n; ++i) row[i] = float_to_bf16(acc[i]);
  }
}

// A row of n elements as fp32 for a kernel to read: the row itself when it is fp32, otherwise its
// elements widened into `scratch` (n floats). A reduction over the row then runs the same code, in the
// same order, for both dtypes.
template <typename T>
const float* fp32_row(const T* row, std::size_t n, float* scratch) {
  if constexpr (is_fp32<T>) {
    return row;
  } else {
    for (std::size_t i = 0; i < n; ++i) scratch[i] = bf16_to_float(row[i]);
    return scratch;
  }
}

// One tensor argument of an op, named for the error message.
struct NamedTensor {
  const char* name;
  ConstTensorPtr tensor;
};

// What the CPU backend says of a combination of dtypes it does not run: std::invalid_argument naming the
// op and every argument's dtype.
[[noreturn]] inline void unsupported_dtypes(const char* op, std::initializer_list<NamedTensor> args) {
  std::string what = std::string("cpu backend: ") + op + " does not support the dtypes (";
  bool first = true;
  for (const NamedTensor& a : args) {
    what += (first ? "" : ", ") + std::string(a.name) + " " + (a.tensor ? dtype_name(a.tensor.dtype()) : "null");
    first = false;
  }
  throw std::invalid_argument(what + ")");
}

// The dtype the non-null tensors of a group share (fp32 when all are null); otherwise unsupported_dtypes.
inline DType common_dtype(const char* op, std::initializer_list<NamedTensor> group) {
  bool found = false;
  DType dtype = DType::f32;
  for (const NamedTensor& a : group) {
    if (!a.tensor) continue;
    if (found && a.tensor.dtype() != dtype) unsupported_dtypes(op, group);
    dtype = a.tensor.dtype();
    found = true;
  }
  return dtype;
}

// f(T1{}, T2{}, ...) with T_i the element type of the i-th dtype (float for fp32, uint16_t for bf16):
// dispatch(f, a, b) instantiates f for the four combinations and calls the one of (a, b).
template <typename... Ts, typename F>
void dispatch(F&& f) {
  f(Ts{}...);
}
template <typename... Ts, typename F, typename... Rest>
void dispatch(F&& f, DType first, Rest... rest) {
  if (first == DType::bf16) {
    dispatch<Ts..., uint16_t>(f, rest...);
  } else {
    dispatch<Ts..., float>(f, rest...);
  }
}

}  // namespace pb::cpu
