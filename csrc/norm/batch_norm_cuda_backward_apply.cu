// CUDA BatchNorm backward, elementwise pass: dx (and the residual's grad dz) from x, dy and the reduction's sums,
// with the formulas of batch_norm_math.h.
#include "norm/batch_norm_cuda.cuh"

namespace danlu {
namespace bn_cuda {
namespace {

// A thread's runs per iteration, whose 16-byte loads are all in flight together: one run each of x, dy and the
// residual (32-48 B), two for float32 (64-96 B). They wait as loaded (four registers a run), not converted. More
// runs of the other dtypes would have ptxas spill around the division calls of the activations' grads (sm_100).
// At 50-90 registers (ptxas), 700-1200 threads per SM: 32-100 KB in flight per SM.
template <typename T> constexpr int kRuns = sizeof(T) == 4 ? 2 : 1;

template <typename M> struct Constants {
  ChannelAffine<M> affine;
  ChannelGrad<M> grad;
  __device__ Constants(const BatchNormArgs& a, M inv_count, int64_t c)
      : affine(channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                              ptr<const M>(a.bias), c)),
        grad(channel_grad(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight), ptr<const M>(a.sum_dz),
                          ptr<const M>(a.sum_dz_xhat), inv_count, c)) {}
};

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) apply_kernel(BatchNormArgs a, ElementwisePlan plan) {
  using M = math_t<T>;
  constexpr int W = Vec16<T>::kWidth;
  const Activation<M, kAct> act{M(a.act_param)};
  const M inv_count = inverse_count<M>(a.count_ptr ? *ptr<const double>(a.count_ptr) : a.count, a.batch_stats);
  const T* x = ptr<const T>(a.x);
  const T* res = kResidual ? ptr<const T>(a.residual) : nullptr;
  const T* dy = ptr<const T>(a.dy);
  T* dx = ptr<T>(a.dx);
  T* dres = kResidual ? ptr<T>(a.dresidual) : nullptr;
  const bool aligned = aligned16(x, res, dy, dx, dres);
  int64_t run = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  ChannelWalk walk(a, run * W);  // at the first element of the thread's next run
  for (; run < plan.runs; run += kRuns<T> * plan.stride) {
    Vec16<T> xs[kRuns<T>], rs[kRuns<T>], dys[kRuns<T>];
    DANLU_UNROLL
    for (int u = 0; u < kRuns<T>; ++u) {
      const int64_t i = (run + u * plan.stride) * W;
      const int n = run_length(plan.total, i, W);
      xs[u] = load_raw(x + i, n, aligned && n == W);
      if constexpr (kResidual) rs[u] = load_raw(res + i, n, aligned && n == W);
      dys[u] = load_raw(dy + i, n, aligned && n == W);
    }
    DANLU_UNROLL
    for (int u = 0; u < kRuns<T>; ++u) {
      const int64_t i = (run + u * plan.stride) * W;
      const int n = run_length(plan.total, i, W);
      ChannelWalk at = walk;
      Constants<M> k(a, inv_count, at.c);
      M dzs[W], dxs[W];
      DANLU_UNROLL
      for (int j = 0; j < W; ++j) {
        const M xj = load_as<M>(xs[u].v + j), r = kResidual ? load_as<M>(rs[u].v + j) : M(0);
        dzs[j] = element_dz<kResidual>(act, k.affine, xj, r, load_as<M>(dys[u].v + j));
        dxs[j] = input_grad(k.grad, xj, dzs[j]);
        if (j + 1 < n && at.next(a)) k = Constants<M>(a, inv_count, at.c);
      }
      if constexpr (kResidual) store_run(dres + i, dzs, n, aligned && n == W);
      store_run(dx + i, dxs, n, aligned && n == W);
      walk.jump(a, plan.step_pos, plan.step_channels);
    }
  }
}

}  // namespace
}  // namespace bn_cuda

void batch_norm_backward_apply_cuda(const BatchNormArgs& a, int device, uintptr_t stream) {
  using namespace bn_cuda;
  check_batch_norm_args(a, BatchNormOp::BackwardApply);
  on_device(total_elems(a) > 0, device, stream, "launching the batch norm backward kernel", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const ElementwisePlan plan(a, Vec16<T>::kWidth, kRuns<T>);
      dispatch_activation(a.activation, [&](auto act) {
        if (a.residual) apply_kernel<T, decltype(act)::value, true><<<plan.blocks, kThreads, 0, s>>>(a, plan);
        else apply_kernel<T, decltype(act)::value, false><<<plan.blocks, kThreads, 0, s>>>(a, plan);
      });
    });
  });
}

}  // namespace danlu
