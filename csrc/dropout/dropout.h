#pragma once
// Dropout as two native ops over a flat run of elements (the caller picks the order: memory order):
//   forward   y = residual + drop(x + bias), and the 1-bit keep mask
//   backward  y = drop(x) with the keep mask read back instead of drawn (x is the grad there)
// drop(v) = v / divisor where kept, v * 0 where dropped (dropout_math.h).
#include <cstdint>

namespace danlu {

constexpr int kDropoutMaskBits = 32;                 // elements per mask word
constexpr int64_t kDropoutMaxBiasSize = INT32_MAX;  // the CUDA kernels follow bias columns in 32 bits

struct DropoutArgs {
  int dtype = 0;  // of x, y, residual, bias (common/dtype.h codes)
  int64_t numel = 0;
  uintptr_t x = 0, y = 0;
  uintptr_t residual = 0;  // forward only; 0 = none
  uintptr_t bias = 0;      // forward only; 0 = none. Element i adds bias[i % bias_size].
  int64_t bias_size = 0;   // 1 to kDropoutMaxBiasSize
  // uint32 words, (numel + 31) / 32 of them: bit i % 32 of word i / 32 is set where element i is kept
  // (32 = kDropoutMaskBits).
  // Forward writes it (0: not wanted), backward reads it.
  uintptr_t mask = 0;
  uint64_t seed = 0, offset = 0;  // Philox key and counter high words (common/philox.h)
  uint32_t threshold = 0;         // element i is kept where its Philox word is below this
  double divisor = 1;             // kept elements are divided by it: the keep probability, or 1 for no scaling
};

// The cheap invariants, re-checked on the native side (Python validated the tensors); throws ValueError.
void check_dropout_args(const DropoutArgs& a, bool backward);

void dropout_forward_cpu(const DropoutArgs& a, int num_threads);
void dropout_backward_cpu(const DropoutArgs& a, int num_threads);

#define DANLU_DECLARE_DROPOUT_CPU_ISA(isa)                          \
  namespace isa {                                                   \
  void dropout_forward_cpu(const DropoutArgs& a, int num_threads);  \
  void dropout_backward_cpu(const DropoutArgs& a, int num_threads); \
  }
DANLU_DECLARE_DROPOUT_CPU_ISA(generic)
DANLU_DECLARE_DROPOUT_CPU_ISA(avx2)
DANLU_DECLARE_DROPOUT_CPU_ISA(avx512)
#undef DANLU_DECLARE_DROPOUT_CPU_ISA

#ifdef DANLU_WITH_CUDA
void dropout_forward_cuda(const DropoutArgs& a, int device, uintptr_t stream);
void dropout_backward_cuda(const DropoutArgs& a, int device, uintptr_t stream);
#endif

}  // namespace danlu
