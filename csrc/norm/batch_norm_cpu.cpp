#include "common/check.h"
#include "common/cpu_isa.h"
#include "norm/batch_norm.h"

namespace danlu {
namespace {

void check_shape(const BatchNormArgs& a) {
  DANLU_CHECK(a.rows >= 0 && a.channels >= 0 && a.inner >= 0, "batch norm: negative sizes");
  DANLU_CHECK(a.rows * a.channels * a.inner == 0 || a.x != 0, "batch norm: null input");
  DANLU_CHECK(a.channels == 0 || (a.mean != 0 || a.out_mean != 0), "batch norm: null statistics");
}

// Checks the shape, then runs the variant of `op` for the processor's ISA.
template <class Generic, class Avx2, class Avx512>
void on_isa(const BatchNormArgs& a, int nt, Generic generic_op, Avx2 avx2_op, Avx512 avx512_op) {
  check_shape(a);
  call_for_cpu_isa(generic_op, avx2_op, avx512_op, a, nt);
}

}  // namespace

void batch_norm_stats_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, nt, generic::batch_norm_stats_cpu, avx2::batch_norm_stats_cpu, avx512::batch_norm_stats_cpu);
}
void batch_norm_forward_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, nt, generic::batch_norm_forward_cpu, avx2::batch_norm_forward_cpu, avx512::batch_norm_forward_cpu);
}
void batch_norm_backward_reduce_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, nt, generic::batch_norm_backward_reduce_cpu, avx2::batch_norm_backward_reduce_cpu,
         avx512::batch_norm_backward_reduce_cpu);
}
void batch_norm_backward_apply_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, nt, generic::batch_norm_backward_apply_cpu, avx2::batch_norm_backward_apply_cpu,
         avx512::batch_norm_backward_apply_cpu);
}

}  // namespace danlu
