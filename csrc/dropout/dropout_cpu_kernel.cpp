// CPU dropout, compiled once per ISA (CMakeLists.txt sets DANLU_CPU_ISA and the flags).
// Work goes in blocks of 64 elements: 16 Philox blocks drawn side by side in SIMD registers
// (common/philox_cpu.h), two mask words, and a vectorised pass over the values.
#include <omp.h>

#include <algorithm>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/philox_cpu.h"
#include "dropout/dropout.h"
#include "dropout/dropout_math.h"

namespace danlu {
namespace DANLU_CPU_ISA {
namespace {

constexpr int64_t kBlock = 2 * kDropoutMaskBits;  // two mask words

// The kept bits of 32 elements as one mask word (an OR reduction that vectorises).
uint32_t pack_word(const uint32_t* __restrict kept) {
  uint32_t word = 0;
  for (int e = 0; e < kDropoutMaskBits; ++e) word |= kept[e] << e;
  return word;
}

// The values to drop: x, plus bias[i % bias_size] where there is a bias, in the math type.
template <typename T, typename M>
void load_inputs(const T* __restrict x, const T* __restrict bias, int64_t bias_size, int64_t start, int n,
                 M* __restrict v) {
  for (int e = 0; e < n; ++e) v[e] = load_as<M>(x + start + e);
  if (!bias) return;
  // Split the block where rows of bias_size elements end, so each stretch adds a contiguous bias slice.
  for (int e = 0; e < n;) {
    const int64_t column = (start + e) % bias_size;
    const int run = int(std::min<int64_t>(n - e, bias_size - column));
    for (int k = 0; k < run; ++k) v[e + k] = v[e + k] + load_as<M>(bias + column + k);
    e += run;
  }
}

// Everything by value and not inlined into the parallel region, so GCC knows no store can change the
// pointers and vectorises the loops (as in optim_cpu_kernel.cpp).
template <typename T, bool kResidual>
__attribute__((noinline)) void forward_blocks(DropoutArgs a, int64_t block_lo, int64_t block_hi) {
  using M = math_t<T>;
  const T* __restrict x = reinterpret_cast<const T*>(a.x);
  const T* __restrict bias = reinterpret_cast<const T*>(a.bias);
  const T* __restrict residual = reinterpret_cast<const T*>(a.residual);
  T* __restrict y = reinterpret_cast<T*>(a.y);
  uint32_t* __restrict mask = reinterpret_cast<uint32_t*>(a.mask);
  const M divisor = M(a.divisor);
  alignas(64) uint32_t r[kBlock], kept[kBlock];
  alignas(64) M v[kBlock];
  for (int64_t b = block_lo; b < block_hi; ++b) {
    const int64_t start = b * kBlock;
    const int n = int(std::min<int64_t>(kBlock, a.numel - start));
    draw_philox_words(uint64_t(b) * (kBlock / 4), kBlock / 4, a.offset, a.seed, r);  // r[e]: element start + e
    load_inputs(x, bias, a.bias_size, start, n, v);
    for (int e = 0; e < kBlock; ++e) kept[e] = e < n && is_kept(r[e], a.threshold);
#pragma omp simd
    for (int e = 0; e < n; ++e) {
      M out = drop(v[e], kept[e] != 0, divisor);
      if constexpr (kResidual) out = out + load_as<M>(residual + start + e);
      store_from(y + start + e, out);
    }
    if (!mask) continue;
    mask[2 * b] = pack_word(kept);
    if (n > kDropoutMaskBits) mask[2 * b + 1] = pack_word(kept + kDropoutMaskBits);
  }
}

template <typename T>
__attribute__((noinline)) void backward_blocks(DropoutArgs a, int64_t block_lo, int64_t block_hi) {
  using M = math_t<T>;
  const T* __restrict dy = reinterpret_cast<const T*>(a.x);
  T* __restrict dx = reinterpret_cast<T*>(a.y);
  const uint32_t* __restrict mask = reinterpret_cast<const uint32_t*>(a.mask);
  const M divisor = M(a.divisor);
  alignas(64) uint32_t kept[kBlock];
  for (int64_t b = block_lo; b < block_hi; ++b) {
    const int64_t start = b * kBlock;
    const int n = int(std::min<int64_t>(kBlock, a.numel - start));
    const uint32_t words[2] = {mask[2 * b], n > kDropoutMaskBits ? mask[2 * b + 1] : 0u};
    for (int e = 0; e < kBlock; ++e) kept[e] = (words[e / kDropoutMaskBits] >> (e % kDropoutMaskBits)) & 1u;
#pragma omp simd
    for (int e = 0; e < n; ++e) store_from(dx + start + e, drop(load_as<M>(dy + start + e), kept[e] != 0, divisor));
  }
}

// Splits the blocks of a.numel elements between threads in contiguous ranges.
template <class Fn> void parallel_blocks(const DropoutArgs& a, int num_threads, Fn&& fn) {
  const int64_t blocks = (a.numel + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads_for(a.numel, num_threads))
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t share = (blocks + nt - 1) / nt;
    fn(std::min(blocks, tid * share), std::min(blocks, (tid + 1) * share));
  }
}

}  // namespace

void dropout_forward_cpu(const DropoutArgs& a, int num_threads) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    parallel_blocks(a, num_threads, [&](int64_t lo, int64_t hi) {
      if (a.residual) forward_blocks<T, true>(a, lo, hi);
      else forward_blocks<T, false>(a, lo, hi);
    });
  });
}

void dropout_backward_cpu(const DropoutArgs& a, int num_threads) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    parallel_blocks(a, num_threads, [&](int64_t lo, int64_t hi) { backward_blocks<T>(a, lo, hi); });
  });
}

}  // namespace DANLU_CPU_ISA
}  // namespace danlu
