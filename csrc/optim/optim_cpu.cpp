#include "common/check.h"
#include "common/cpu_isa.h"
#include "optim/optim.h"

namespace danlu {

void optim_step_cpu(const StepArgs& args, int num_threads) {
  DANLU_CHECK(args.num_tensors == 0 || args.table != 0, "optimizer step: null tensor table");
  DANLU_CHECK(args.num_tensors >= 0 && args.total >= 0, "optimizer step: negative sizes");
  call_for_cpu_isa(generic::optim_step_cpu, avx2::optim_step_cpu, avx512::optim_step_cpu, args, num_threads);
}

}  // namespace danlu
