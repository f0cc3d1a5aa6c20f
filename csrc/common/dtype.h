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

// Codes exported to Python as danlu._C.dtype_codes.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

struct alignas(2) Half {
  uint16_t bits;
};
struct alignas(2) BFloat16 {
  uint16_t bits;
};

// float64 tensors compute in double, every other dtype in float (as torch's fused kernels do).
template <typename T> struct MathTypeOf {
  using type = float;
};
template <> struct MathTypeOf<double> {
  using type = double;
};
template <typename T> using math_t = typename MathTypeOf<T>::type;

DANLU_HD float float_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
DANLU_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

DANLU_HD float bfloat16_to_float(uint16_t bits) { return float_from_bits(uint32_t(bits) << 16); }
DANLU_HD uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  // NaN stays a quiet NaN; everything else rounds to nearest even.
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

#if defined(__CUDACC__)
// cuda_fp16.h's conversions are host+device, so nvcc's host pass sees the same functions.
DANLU_HD float half_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
DANLU_HD uint16_t float_to_half(float f) { return __half_as_ushort(__float2half_rn(f)); }
#else
// Branch-free bit conversions that the host compiler vectorises (_Float16 only vectorises with
// AVX512-FP16). They round to nearest even, exactly as the F16C and CUDA conversions do.
DANLU_HD float half_to_float(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16, exp_mantissa = bits & 0x7FFFu;
  // Scaling by 2^112 rebiases the exponent and normalises subnormals in one multiply.
  const float magnitude = float_from_bits(exp_mantissa << 13) * 5.192296858534828e+33f;
  const uint32_t inf_nan = (exp_mantissa << 13) | 0x7F800000u;
  return float_from_bits((exp_mantissa >= 0x7C00u ? inf_nan : float_bits(magnitude)) | sign);
}
DANLU_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  // Subnormal results: adding 0.5f leaves the rounded half mantissa in the low bits.
  const uint32_t subnormal = float_bits(float_from_bits(a) + 0.5f) - 0x3F000000u;
  // Normal results: rebias the exponent (0xC8000000 = -112 << 23) and round to nearest even.
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t out = a > 0x7F800000u ? 0x7E00u : a >= 0x47800000u ? 0x7C00u : a < 0x38800000u ? subnormal : normal;
  return uint16_t(out | sign);
}
#endif

// 16-bit elements are read and written as raw uint16_t, which the vectoriser handles (the structs it
// would not).
template <typename M, typename T> DANLU_HD M load_as(const T* p) {
  if constexpr (std::is_same_v<T, Half>) return M(half_to_float(*reinterpret_cast<const uint16_t*>(p)));
  else if constexpr (std::is_same_v<T, BFloat16>) return M(bfloat16_to_float(*reinterpret_cast<const uint16_t*>(p)));
  else return M(*p);
}
template <typename T, typename M> DANLU_HD void store_from(T* p, M v) {
  if constexpr (std::is_same_v<T, Half>) *reinterpret_cast<uint16_t*>(p) = float_to_half(float(v));
  else if constexpr (std::is_same_v<T, BFloat16>) *reinterpret_cast<uint16_t*>(p) = float_to_bfloat16(float(v));
  else *p = T(v);
}

template <typename T> struct TypeTag {
  using type = T;
};

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
