#pragma once
// Element types, their float math types, and loads/stores that convert between them.
// The conversions round to nearest even on the host and the device alike.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/check.h"
#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace danlu {

// Codes shared with python/danlu/_native.py.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

struct alignas(2) Half { uint16_t bits; };
struct alignas(2) BFloat16 { uint16_t bits; };

// float64 tensors compute in double, every other dtype in float (as torch's fused kernels do).
template <typename T> struct MathTypeOf { using type = float; };
template <> struct MathTypeOf<double> { using type = double; };
template <typename T> using math_t = typename MathTypeOf<T>::type;

DANLU_HD float float_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
DANLU_HD uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

DANLU_HD float to_float(BFloat16 v) { return float_from_bits(uint32_t(v.bits) << 16); }
DANLU_HD BFloat16 to_bfloat16(float f) {
  uint32_t u = float_bits(f);
  // NaN keeps a quiet payload; everything else rounds to nearest even.
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return BFloat16{uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded)};
}

#if defined(__CUDACC__)
// cuda_fp16.h's conversions are host+device, so nvcc's host pass sees the same functions.
DANLU_HD float to_float(Half v) { return __half2float(__ushort_as_half(v.bits)); }
DANLU_HD Half to_half(float f) { return Half{__half_as_ushort(__float2half_rn(f))}; }
#else
// GCC's _Float16 compiles to F16C/AVX-512 conversions in the vector ISA variants.
DANLU_HD float to_float(Half v) { _Float16 h; memcpy(&h, &v.bits, 2); return float(h); }
DANLU_HD Half to_half(float f) { _Float16 h = _Float16(f); Half v; memcpy(&v.bits, &h, 2); return v; }
#endif

template <typename M, typename T> DANLU_HD M load_as(const T* p) {
  if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) return M(to_float(*p));
  else return M(*p);
}
template <typename T, typename M> DANLU_HD void store_from(T* p, M v) {
  if constexpr (std::is_same_v<T, Half>) *p = to_half(float(v));
  else if constexpr (std::is_same_v<T, BFloat16>) *p = to_bfloat16(float(v));
  else *p = T(v);
}

template <typename T> struct TypeTag { using type = T; };

// Calls fn(TypeTag<T>{}) with the element type named by a dtype code: one template serves every dtype.
template <typename Fn> decltype(auto) dispatch_dtype(int code, Fn&& fn) {
  switch (DType(code)) {
    case DType::Float32: return fn(TypeTag<float>{});
    case DType::Float64: return fn(TypeTag<double>{});
    case DType::Float16: return fn(TypeTag<Half>{});
    case DType::BFloat16: return fn(TypeTag<BFloat16>{});
  }
  DANLU_CHECK(false, "unsupported dtype code " << code << " (expected 0..3: float32, float64, float16, bfloat16)");
}

}  // namespace danlu
