#pragma once
// BatchNorm as native ops, the decomposition torch's own (and SyncBatchNorm's) kernels use:
//   stats            per-channel moments of x (Moments: count, mean, M2), and with out_mean set, finished:
//                    mean, invstd = 1 / sqrt(var + eps) and the unbiased var (batch_norm_math.h finish_moments)
//   finalize         merges `ranks` sets of per-channel moments (a process group's), then finishes them
//   forward          y = act((x - mean) * invstd * w + b + residual)
//   backward_reduce  per-channel sums of dz and dz * xhat, dz = dy * act'(z)
//   backward_apply   dx from dz and those sums; dresidual = dz (both always written: with a residual,
//                    the caller provides both buffers even if it needs only one grad)
// The reductions follow the one blocking of batch_norm_math.h on the CPU and on CUDA: the same bits on both.
#include <cstdint>

namespace danlu {

struct BatchNormArgs {
  int dtype = 0;  // of x, y, residual, dy, dx, dresidual (common/dtype.h codes)
  int64_t rows = 0, channels = 0, inner = 0;  // x as [rows, channels, inner], contiguous
  int activation = 0;  // ActKind
  double act_param = 0;
  // Per-channel arrays in the math type M (float32, float64 for float64 x); weight/bias 0 = not affine.
  uintptr_t mean = 0, invstd = 0, weight = 0, bias = 0;
  // stats and finalize: Moments (three doubles) per channel, [ranks][channels] for finalize, which merges them in
  // place (rank 0's row ends up holding the merged moments); 0 = not wanted (stats).
  uintptr_t moments = 0;
  int64_t ranks = 1;
  double eps = 0;
  uintptr_t out_mean = 0, out_invstd = 0, out_var = 0;  // finished statistics (M); 0 = not wanted (stats)
  uintptr_t sum_dz = 0, sum_dz_xhat = 0;  // backward_reduce outputs, backward_apply inputs (M)
  // Elements per channel behind the statistics (backward_apply): count, or where nonzero the double at count_ptr
  // (on x's device: a process group's count, known only there).
  double count = 0;
  uintptr_t count_ptr = 0;
  bool batch_stats = true;  // backward_apply: statistics came from this batch
  // Full-size tensors; residual, dx, dresidual may be 0.
  uintptr_t x = 0, y = 0, residual = 0, dy = 0, dx = 0, dresidual = 0;
};

// The cheap invariants every entry point re-checks (Python validated the tensors); throws std::invalid_argument.
enum class BatchNormOp { Stats, Finalize, Forward, BackwardReduce, BackwardApply };
void check_batch_norm_args(const BatchNormArgs& a, BatchNormOp op);

void batch_norm_stats_cpu(const BatchNormArgs& a, int num_threads);
void batch_norm_finalize_cpu(const BatchNormArgs& a);
void batch_norm_forward_cpu(const BatchNormArgs& a, int num_threads);
void batch_norm_backward_reduce_cpu(const BatchNormArgs& a, int num_threads);
void batch_norm_backward_apply_cpu(const BatchNormArgs& a, int num_threads);

#define DANLU_DECLARE_BN_CPU_ISA(isa)                                           \
  namespace isa {                                                               \
  void batch_norm_stats_cpu(const BatchNormArgs& a, int num_threads);           \
  void batch_norm_forward_cpu(const BatchNormArgs& a, int num_threads);         \
  void batch_norm_backward_reduce_cpu(const BatchNormArgs& a, int num_threads); \
  void batch_norm_backward_apply_cpu(const BatchNormArgs& a, int num_threads);  \
  }
DANLU_DECLARE_BN_CPU_ISA(generic)
DANLU_DECLARE_BN_CPU_ISA(avx2)
DANLU_DECLARE_BN_CPU_ISA(avx512)
#undef DANLU_DECLARE_BN_CPU_ISA

#ifdef DANLU_WITH_CUDA
// Bytes of device workspace the reductions (stats, backward_reduce) need; Python allocates it.
int64_t batch_norm_cuda_workspace_bytes(const BatchNormArgs& a);
void batch_norm_stats_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace);
void batch_norm_finalize_cuda(const BatchNormArgs& a, int device, uintptr_t stream);
void batch_norm_forward_cuda(const BatchNormArgs& a, int device, uintptr_t stream);
void batch_norm_backward_reduce_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace);
void batch_norm_backward_apply_cuda(const BatchNormArgs& a, int device, uintptr_t stream);
#endif

}  // namespace danlu
