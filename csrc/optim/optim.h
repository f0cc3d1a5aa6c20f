#pragma once
#include <cstdint>

#include "optim/update_rules.h"

namespace danlu {

// One fused step over every tensor of the table, in one parallel region. num_threads as torch's.
void optim_step_cpu(const StepArgs& args, int num_threads);

#define DANLU_DECLARE_CPU_ISA(isa)                            \
  namespace isa {                                             \
  void optim_step_cpu(const StepArgs& args, int num_threads); \
  }
DANLU_DECLARE_CPU_ISA(generic)
DANLU_DECLARE_CPU_ISA(avx2)
DANLU_DECLARE_CPU_ISA(avx512)
#undef DANLU_DECLARE_CPU_ISA

#ifdef DANLU_WITH_CUDA
// One kernel launch on `stream` of `device`. `step_counter` is a uint32 of device scratch memory (zeroed on
// `stream` before the launch) with which the kernel's last block finds itself, to update steps and flags once.
void optim_step_cuda(const StepArgs& args, int device, uintptr_t stream, uintptr_t step_counter);
#endif

}  // namespace danlu
