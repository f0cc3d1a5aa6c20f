#include "common/check.h"
#include "common/cpu_isa.h"
#include "dropout/dropout.h"

namespace danlu {

void check_dropout_args(const DropoutArgs& a, bool backward) {
  DANLU_CHECK(a.numel >= 0, "dropout: negative numel " << a.numel);
  if (a.numel == 0) return;
  DANLU_CHECK(a.x != 0 && a.y != 0, "dropout: null input or output");
  DANLU_CHECK(!backward || a.mask != 0, "dropout backward: null mask");
  DANLU_CHECK(a.bias == 0 || (a.bias_size > 0 && a.bias_size <= kDropoutMaxBiasSize),
              "dropout: bias given with bias_size " << a.bias_size << " (expected 1 to " << kDropoutMaxBiasSize << ")");
  DANLU_CHECK(a.divisor > 0 || a.threshold == 0, "dropout: divisor " << a.divisor << " for kept elements");
}

void dropout_forward_cpu(const DropoutArgs& a, int nt) {
  check_dropout_args(a, false);
  if (a.numel == 0) return;
  call_for_cpu_isa(generic::dropout_forward_cpu, avx2::dropout_forward_cpu, avx512::dropout_forward_cpu, a, nt);
}

void dropout_backward_cpu(const DropoutArgs& a, int nt) {
  check_dropout_args(a, true);
  if (a.numel == 0) return;
  call_for_cpu_isa(generic::dropout_backward_cpu, avx2::dropout_backward_cpu, avx512::dropout_backward_cpu, a, nt);
}

}  // namespace danlu
