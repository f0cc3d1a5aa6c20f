#pragma once
// exp, expm1 and tanh in float and double as plain IEEE adds, multiplies and selects, for the CPU
// loops and the CUDA kernels alike.
//
// Why not libm: a call to expf is one scalar call per element that the host compiler cannot vectorise
// (it made BatchNormAct's silu ten times slower than its relu), and glibc's exp and CUDA's are
// different functions that disagree in the last bit. These are branch-free, so the per-ISA loops
// vectorise them, and the build contracts no FMA on either side, so every CPU variant computes the
// bits the GPU computes (docs/design.md principle 2). The double versions exist for the same reason: one
// formula for every dtype, the same bits on CPU and GPU, and vectorised float64 loops.
//
// Error against the exact values, over every float / 10^8 random doubles: exp 0.98 / 1.03 ulp,
// expm1 1.52 / 2.29 ulp, tanh 2.50 / 2.50 ulp (glibc's expf: 0.50). Results below the range round
// to subnormals and then 0, results above it are inf, NaN stays NaN. tests/test_batch_norm.py
// (test_activation_accuracy_over_the_whole_range) holds the activations built on them to 4 ulp.
//
// Method: x = n ln2 + r with |r| <= ln2 / 2 (Cody and Waite: ln2 in two parts, the first short enough
// that n * kLn2Hi is exact), e^r - 1 = r + r^2 q(r) with q a polynomial fitted to (e^r - 1 - r) / r^2
// (weighted minimax, 0.06 ulp of e^r), and the scaling by 2^n done on the exponent bits.
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace danlu {

template <typename To, typename From> DANLU_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  memcpy(&to, &from, sizeof(to));
  return to;
}

// c0 + r (c1 + r (c2 + ...)).
template <typename M> DANLU_HD M horner(M, M c0) { return c0; }
template <typename M, typename... C> DANLU_HD M horner(M r, M c0, C... c) { return c0 + r * horner(r, c...); }

template <typename M> struct ExpConstants;
template <> struct ExpConstants<float> {
  using Int = int32_t;
  using Bits = uint32_t;
  static constexpr int kMantissaBits = 23, kBias = 127;
  // e^-104 rounds to 0 and e^89 overflows; clamping there keeps 2^(n/2) a normal float.
  static constexpr float kMin = -104.0f, kMax = 89.0f;
  static constexpr float kLog2e = 0x1.715476p+0f;
  static constexpr float kLn2Hi = 0x1.62e4p-1f, kLn2Lo = 0x1.7f7d1cp-20f;  // kLn2Hi: 15 bits, |n| <= 150
  static constexpr float kRoundingShift = 0x1.8p23f;  // adding it rounds to an integer, kept in the low bits
  DANLU_HD static float q(float r) {
    return horner(r, 0x1.fffffcp-2f, 0x1.55548ap-3f, 0x1.555916p-5f, 0x1.123fb6p-7f, 0x1.6a1a8ap-10f);
  }
};
template <> struct ExpConstants<double> {
  using Int = int64_t;
  using Bits = uint64_t;
  static constexpr int kMantissaBits = 52, kBias = 1023;
  static constexpr double kMin = -746.0, kMax = 710.0;
  static constexpr double kLog2e = 0x1.71547652b82fep+0;
  static constexpr double kLn2Hi = 0x1.62e42fefa38p-1, kLn2Lo = 0x1.ef35793c7673p-45;  // 42 bits, |n| <= 1077
  static constexpr double kRoundingShift = 0x1.8p52;
  DANLU_HD static double q(double r) {
    return horner(r, 0x1.000000000000bp-1, 0x1.55555555554f0p-3, 0x1.555555555025cp-5, 0x1.1111111129942p-7,
                  0x1.6c16c185984e4p-10, 0x1.a01a01233fae6p-13, 0x1.a01995f9a6050p-16, 0x1.71df2eb47ad36p-19,
                  0x1.28b15c13e8e91p-22, 0x1.ad7ad163b79c0p-26);
  }
};

// 2^k for k in the normal exponent range.
template <typename M> DANLU_HD M pow2i(typename ExpConstants<M>::Int k) {
  using E = ExpConstants<M>;
  return bit_cast<M>(typename E::Bits(k + E::kBias) << E::kMantissaBits);
}

// e^x = 2^n e^r: returns e^r - 1 and n.
template <typename M> struct ExpReduced {
  M expm1_r;
  typename ExpConstants<M>::Int n;
};
template <typename M> DANLU_HD ExpReduced<M> exp_reduce(M x) {
  using E = ExpConstants<M>;
  x = x < E::kMin ? E::kMin : x;  // comparisons, not min/max: NaN stays NaN
  x = x > E::kMax ? E::kMax : x;
  const M shifted = x * E::kLog2e + E::kRoundingShift;
  const M n = shifted - E::kRoundingShift;
  const M r = (x - n * E::kLn2Hi) - n * E::kLn2Lo;
  using Bits = typename E::Bits;
  return {r + r * r * E::q(r), typename E::Int(bit_cast<Bits>(shifted) - bit_cast<Bits>(E::kRoundingShift))};
}

template <typename M> DANLU_HD M exp_m(M x) {
  const ExpReduced<M> e = exp_reduce(x);
  // 2^n in two factors: near the ends of the range 2^n is no float while e^x still is (a subnormal)
  // or must overflow to inf. The first product is exact, the second rounds once.
  const typename ExpConstants<M>::Int half = e.n / 2;
  return (M(1) + e.expm1_r) * pow2i<M>(half) * pow2i<M>(e.n - half);
}

template <typename M> DANLU_HD M expm1_m(M x) {
  using E = ExpConstants<M>;
  const ExpReduced<M> e = exp_reduce(x);
  // e^x - 1 = 2 ((h - 1/2) + h (e^r - 1)) with h = 2^(n-1): h - 1/2 and the products are exact
  // over the range that matters, so the sum rounds once, and n = 0 gives e^r - 1 itself (no
  // cancellation near 0). Halving keeps h a float up to the overflow; where 2^(n-1) would be below
  // the normal range the result is -1 whatever h is.
  const typename E::Int n = e.n < 2 - E::kBias ? 2 - E::kBias : e.n;
  const M h = pow2i<M>(n - 1);
  return M(2) * ((h - M(0.5)) + h * e.expm1_r);
}

// tanh(z) = -expm1(-2|z|) / (2 + expm1(-2|z|)): the exponent is never positive, so nothing
// overflows for large |z| (the quotient goes to 1), and expm1 keeps the relative accuracy for small
// |z|, where 1 - e^(-2|z|) would cancel. Below 2^-30, tanh(z) rounds to z in float and double
// alike, which also gives ±0 its sign.
template <typename M> DANLU_HD M tanh_m(M z) {
  const M minus_abs = z < M(0) ? z : -z;
  const M m = expm1_m(M(2) * minus_abs);
  const M t = m / (M(2) + m);  // tanh(-|z|)
  return minus_abs > M(-0x1p-30) ? z : z < M(0) ? t : -t;
}

}  // namespace danlu
