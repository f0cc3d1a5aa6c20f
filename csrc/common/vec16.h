#pragma once
// 16-byte vectors of elements: the widest load and store one CUDA thread issues in one instruction.
// A kernel moves a run of kWidth consecutive elements with one of them when the address is 16-byte
// aligned, and element by element otherwise or for a run cut short at the end of a tensor.
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace danlu {

template <typename T> struct alignas(16) Vec16 {
  static constexpr int kWidth = 16 / sizeof(T);
  T v[kWidth];
};

// Whether every pointer is 16-byte aligned; a null pointer (a tensor the call does not have) is.
template <typename... T> DANLU_HD bool aligned16(const T*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

// v[0, n) = p[0, n) in the math type M, with one 16-byte load when `vector` (p aligned, n = kWidth).
template <typename M, typename T> DANLU_HD void load_run(M (&v)[Vec16<T>::kWidth], const T* p, int n, bool vector) {
  if (vector) {
    const Vec16<T> packed = *reinterpret_cast<const Vec16<T>*>(p);
    DANLU_UNROLL
    for (int j = 0; j < Vec16<T>::kWidth; ++j) v[j] = load_as<M>(packed.v + j);
    return;
  }
  DANLU_UNROLL
  for (int j = 0; j < Vec16<T>::kWidth; ++j)
    if (j < n) v[j] = load_as<M>(p + j);
}

// p[0, n) = v[0, n) rounded to T, with one 16-byte store when `vector`.
template <typename T, typename M> DANLU_HD void store_run(T* p, const M (&v)[Vec16<T>::kWidth], int n, bool vector) {
  if (vector) {
    Vec16<T> packed;
    DANLU_UNROLL
    for (int j = 0; j < Vec16<T>::kWidth; ++j) store_from(packed.v + j, v[j]);
    *reinterpret_cast<Vec16<T>*>(p) = packed;
    return;
  }
  DANLU_UNROLL
  for (int j = 0; j < Vec16<T>::kWidth; ++j)
    if (j < n) store_from(p + j, v[j]);
}

}  // namespace danlu
