// Element types of backend tensors, and a typed pointer into backend memory.
//
// With --dtype bf16 (SPEC 2.3's mixed precision) parameters, activations and their gradients are stored
// in bf16 while LayerNorm statistics, softmax statistics, master weights and AdamW's moments stay fp32.
// A TensorPtr carries the dtype of the elements it points to, so one Backend call serves both, and its
// arithmetic counts elements as float*'s does: `x + n·h` is row n of an (N, h) tensor in either dtype.
// A float* converts to it implicitly (fp32), so code that holds only fp32 tensors reads as before.
// Model code never dereferences one; backends take the elements with `as<float>()` (fp32) or
// `as<uint16_t>()` (bf16: the upper 16 bits of an IEEE fp32, kernels/cpu/bf16.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace pb {

enum class DType : uint8_t { f32, bf16 };

constexpr std::size_t dtype_bytes(DType t) { return t == DType::f32 ? 4 : 2; }
inline const char* dtype_name(DType t) { return t == DType::f32 ? "fp32" : "bf16"; }
// "fp32" or "bf16" (the names of --dtype); false for anything else.
inline bool parse_dtype(const std::string& name, DType* out) {
  if (name == "fp32") *out = DType::f32;
  else if (name == "bf16") *out = DType::bf16;
  else return false;
  return true;
}

// The C++ type that holds one element of a dtype: float, or uint16_t for bf16's bits.
template <typename T>
constexpr DType dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, uint16_t>, "fp32 is float, bf16 is uint16_t");
  return std::is_same_v<T, float> ? DType::f32 : DType::bf16;
}

template <bool kConst>
class BasicTensorPtr {
  using Void = std::conditional_t<kConst, const void, void>;
  using Byte = std::conditional_t<kConst, const unsigned char, unsigned char>;
  template <typename T>
  using Elem = std::conditional_t<kConst, const T, T>;

 public:
  BasicTensorPtr() = default;
  BasicTensorPtr(std::nullptr_t) {}  // NOLINT: a null tensor converts implicitly, as a null float* does
  BasicTensorPtr(Elem<float>* p) : data_(p) {}  // NOLINT: fp32 tensors as float*
  BasicTensorPtr(Void* data, DType dtype) : data_(data), dtype_(dtype) {}
  template <bool kOther, typename = std::enable_if_t<kConst && !kOther>>
  BasicTensorPtr(const BasicTensorPtr<kOther>& p) : data_(p.data()), dtype_(p.dtype()) {}  // NOLINT: T* → const T*

  Void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  explicit operator bool() const { return data_ != nullptr; }
  bool operator==(const BasicTensorPtr& o) const { return data_ == o.data_; }
  bool operator!=(const BasicTensorPtr& o) const { return data_ != o.data_; }

  // Element n on (negative: before).
  BasicTensorPtr operator+(std::ptrdiff_t n) const {
    return {static_cast<Byte*>(data_) + n * static_cast<std::ptrdiff_t>(dtype_bytes(dtype_)), dtype_};
  }
  BasicTensorPtr operator-(std::ptrdiff_t n) const { return *this + (-n); }
  BasicTensorPtr& operator+=(std::ptrdiff_t n) { return *this = *this + n; }

  // The elements as T (float for fp32, uint16_t for bf16); a tensor of another dtype is a logic error.
  template <typename T>
  Elem<T>* as() const {
    if (data_ != nullptr && dtype_ != dtype_of<T>()) {
      throw std::logic_error(std::string("a ") + dtype_name(dtype_) + " tensor used as " + dtype_name(dtype_of<T>()));
    }
    return static_cast<Elem<T>*>(data_);
  }

 private:
  Void* data_ = nullptr;
  DType dtype_ = DType::f32;
};

using TensorPtr = BasicTensorPtr<false>;
using ConstTensorPtr = BasicTensorPtr<true>;

}  // namespace pb
