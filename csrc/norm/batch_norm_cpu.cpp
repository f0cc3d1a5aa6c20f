// CPU entry points (the cheap invariants, then the variant for the processor's ISA) and the argument checks that
// the CUDA entry points share.
#include "common/check.h"
#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "norm/batch_norm.h"
#include "norm/batch_norm_math.h"

namespace danlu {

void check_batch_norm_args(const BatchNormArgs& a, BatchNormOp op) {
  DANLU_CHECK(a.rows >= 0 && a.channels >= 0 && a.inner >= 0 && a.ranks >= 1, "batch norm: negative sizes");
  const bool elements = a.rows * a.channels * a.inner > 0, channels = a.channels > 0;
  DANLU_CHECK(!elements || a.x != 0 || op == BatchNormOp::Finalize, "batch norm: null input");
  const bool finished = a.out_mean != 0 && a.out_invstd != 0 && a.out_var != 0;
  switch (op) {
    case BatchNormOp::Stats:
      DANLU_CHECK(!channels || a.moments != 0 || finished, "batch norm stats: no output");
      return;
    case BatchNormOp::Finalize:
      DANLU_CHECK(!channels || (a.moments != 0 && finished), "batch norm finalize: null buffers");
      return;
    default: break;
  }
  DANLU_CHECK(!channels || (a.mean != 0 && a.invstd != 0), "batch norm: null statistics");
  if (op == BatchNormOp::Forward) {
    DANLU_CHECK(!elements || a.y != 0, "batch norm forward: null output");
  } else if (op == BatchNormOp::BackwardReduce) {
    DANLU_CHECK(!channels || (a.sum_dz != 0 && a.sum_dz_xhat != 0), "batch norm backward: null sums");
    DANLU_CHECK(!elements || a.dy != 0, "batch norm backward: null output grad");
  } else {
    DANLU_CHECK(!elements || (a.dy != 0 && a.dx != 0 && (!a.residual || a.dresidual != 0)),
                "batch norm backward: null grads");
    DANLU_CHECK(!a.batch_stats || !channels || (a.sum_dz != 0 && a.sum_dz_xhat != 0), "batch norm backward: null sums");
    DANLU_CHECK(!a.batch_stats || !elements || a.count_ptr != 0 || a.count > 0, "batch norm backward: no count");
  }
}

namespace {

// Checks the arguments, then runs the variant of `op` for the processor's ISA.
template <class Generic, class Avx2, class Avx512>
void on_isa(const BatchNormArgs& a, BatchNormOp op, int nt, Generic generic_op, Avx2 avx2_op, Avx512 avx512_op) {
  check_batch_norm_args(a, op);
  call_for_cpu_isa(generic_op, avx2_op, avx512_op, a, nt);
}

}  // namespace

void batch_norm_stats_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, BatchNormOp::Stats, nt, generic::batch_norm_stats_cpu, avx2::batch_norm_stats_cpu,
         avx512::batch_norm_stats_cpu);
}

void batch_norm_finalize_cpu(const BatchNormArgs& a) {
  check_batch_norm_args(a, BatchNormOp::Finalize);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using M = math_t<typename decltype(tag)::type>;
    Moments* m = reinterpret_cast<Moments*>(a.moments);
    for (int64_t c = 0; c < a.channels; ++c) {
      merge_tree(m + c, a.ranks, a.channels);  // into rank 0's row, which store_statistics leaves as it is
      store_statistics<M>(a, c, m[c]);
    }
  });
}

void batch_norm_forward_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, BatchNormOp::Forward, nt, generic::batch_norm_forward_cpu, avx2::batch_norm_forward_cpu,
         avx512::batch_norm_forward_cpu);
}

void batch_norm_backward_reduce_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, BatchNormOp::BackwardReduce, nt, generic::batch_norm_backward_reduce_cpu,
         avx2::batch_norm_backward_reduce_cpu, avx512::batch_norm_backward_reduce_cpu);
}

void batch_norm_backward_apply_cpu(const BatchNormArgs& a, int nt) {
  on_isa(a, BatchNormOp::BackwardApply, nt, generic::batch_norm_backward_apply_cpu, avx2::batch_norm_backward_apply_cpu,
         avx512::batch_norm_backward_apply_cpu);
}

}  // namespace danlu
