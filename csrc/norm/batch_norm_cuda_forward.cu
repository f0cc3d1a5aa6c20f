// CUDA BatchNorm forward: y = act((x - mean) * invstd * w + b + residual), elementwise with the formulas of
// batch_norm_math.h.
#include "norm/batch_norm_cuda.cuh"

namespace danlu {
namespace bn_cuda {
namespace {

// A thread's runs per iteration, whose 16-byte loads are all in flight together: 32 B of x, and 32 B of the
// residual. They wait as loaded (four registers a run), not converted. At 50-75 registers (ptxas) that is about
// 900 threads per SM: 32-64 KB in flight per SM.
template <typename T> constexpr int kRuns = 2;

template <typename M> __device__ ChannelAffine<M> affine_of(const BatchNormArgs& a, int64_t c) {
  return channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight), ptr<const M>(a.bias), c);
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) forward_kernel(BatchNormArgs a, ElementwisePlan plan) {
  using M = math_t<T>;
  constexpr int W = Vec16<T>::kWidth;
  const Activation<M, kAct> act{M(a.act_param)};
  const T* x = ptr<const T>(a.x);
  const T* res = kResidual ? ptr<const T>(a.residual) : nullptr;
  T* y = ptr<T>(a.y);
  const bool aligned = aligned16(x, res, y);
  int64_t run = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  ChannelWalk walk(a, run * W);  // at the first element of the thread's next run
  for (; run < plan.runs; run += kRuns<T> * plan.stride) {
    Vec16<T> xs[kRuns<T>], rs[kRuns<T>];
    DANLU_UNROLL
    for (int u = 0; u < kRuns<T>; ++u) {
      const int64_t i = (run + u * plan.stride) * W;
      const int n = run_length(plan.total, i, W);
      xs[u] = load_raw(x + i, n, aligned && n == W);
      if constexpr (kResidual) rs[u] = load_raw(res + i, n, aligned && n == W);
    }
    DANLU_UNROLL
    for (int u = 0; u < kRuns<T>; ++u) {
      const int64_t i = (run + u * plan.stride) * W;
      const int n = run_length(plan.total, i, W);
      ChannelWalk at = walk;
      ChannelAffine<M> k = affine_of<M>(a, at.c);
      M ys[W];
      DANLU_UNROLL
      for (int j = 0; j < W; ++j) {
        const M r = kResidual ? load_as<M>(rs[u].v + j) : M(0);
        ys[j] = act.forward(pre_activation<kResidual>(k, load_as<M>(xs[u].v + j), r));
        if (j + 1 < n && at.next(a)) k = affine_of<M>(a, at.c);
      }
      store_run(y + i, ys, n, aligned && n == W);
      walk.jump(a, plan.step_pos, plan.step_channels);
    }
  }
}

}  // namespace
}  // namespace bn_cuda

void batch_norm_forward_cuda(const BatchNormArgs& a, int device, uintptr_t stream) {
  using namespace bn_cuda;
  check_batch_norm_args(a, BatchNormOp::Forward);
  on_device(total_elems(a) > 0, device, stream, "launching the batch norm forward kernel", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const ElementwisePlan plan(a, Vec16<T>::kWidth, kRuns<T>);
      dispatch_activation(a.activation, [&](auto act) {
        if (a.residual) forward_kernel<T, decltype(act)::value, true><<<plan.blocks, kThreads, 0, s>>>(a, plan);
        else forward_kernel<T, decltype(act)::value, false><<<plan.blocks, kThreads, 0, s>>>(a, plan);
      });
    });
  });
}

}  // namespace danlu
