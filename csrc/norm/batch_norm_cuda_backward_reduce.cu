// CUDA BatchNorm backward, reduction pass: per-channel sums of dz = dy * act'(z) and dz * xhat in the blocking of
// batch_norm_math.h (the CPU's bits). The NCHW kernels are here, the channels-last ones in
// batch_norm_cuda_backward_reduce_rows.cu.
#include "norm/batch_norm_cuda_sums.cuh"

namespace danlu {
namespace bn_cuda {
namespace {

template <typename T, ActKind kAct, bool kResidual>
__device__ GradSums nchw_block_sums(const BatchNormArgs& a, const LaneStep& step, int64_t c, int64_t e0, int n) {
  using M = math_t<T>;
  const Activation<M, kAct> act{M(a.act_param)};
  const GradConstants<M> g(a, c);
  const T *x = ptr<const T>(a.x), *res = ptr<const T>(a.residual), *dy = ptr<const T>(a.dy);
  const int steps = lane_steps(threadIdx.x % kLanes, n);
  NchwCursor at(a, e0 + threadIdx.x % kLanes);
  M dz_sum = M(0), dz_xhat_sum = M(0);
  DANLU_UNROLL
  for (int k0 = 0; k0 < kLaneSteps; k0 += kGroup<M>) {
    M xs[kGroup<M>], rs[kGroup<M>], dys[kGroup<M>];
    DANLU_UNROLL
    for (int j = 0; j < kGroup<M>; ++j) {
      const bool valid = k0 + j < steps;
      const int64_t i = at.offset(a, c);
      xs[j] = valid ? load_as<M>(x + i) : M(0);
      rs[j] = kResidual && valid ? load_as<M>(res + i) : M(0);
      dys[j] = valid ? load_as<M>(dy + i) : M(0);
      at.step(a, step);
    }
    DANLU_UNROLL
    for (int j = 0; j < kGroup<M>; ++j)
      add_element<kResidual>(act, g, k0 + j < steps, xs[j], rs[j], dys[j], dz_sum, dz_xhat_sum);
  }
  return block_sums(warp_lane_tree(dz_sum), warp_lane_tree(dz_xhat_sum));
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    nchw_sums_kernel(BatchNormArgs a, ReducePlan plan, LaneStep step, GradSums* out) {
  nchw_reduction<SumsStore<math_t<T>>>(a, plan, out, [&](int64_t c, int64_t e0, int n) {
    return nchw_block_sums<T, kAct, kResidual>(a, step, c, e0, n);
  });
}

}  // namespace
}  // namespace bn_cuda

void batch_norm_backward_reduce_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace) {
  using namespace bn_cuda;
  check_batch_norm_args(a, BatchNormOp::BackwardReduce);
  on_device(a.channels > 0, device, stream, "launching the batch norm backward reduction kernels", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_reduction<SumsStore<math_t<T>>>(a, s, workspace,
                                             [&](const ReducePlan& plan, unsigned grid, GradSums* out) {
                                               if (a.inner == 1) return launch_rows_sums<T>(a, s, plan, grid, out);
                                               dispatch_sums_kernel(a, [&](auto act, auto residual) {
                                                 nchw_sums_kernel<T, decltype(act)::value, decltype(residual)::value>
                                                     <<<grid, kThreads, 0, s>>>(a, plan, LaneStep(a), out);
                                               });
                                             });
    });
  });
}

}  // namespace danlu
