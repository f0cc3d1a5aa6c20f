// CUDA BatchNorm backward, reduction pass: per-channel sums of dz = dy * act'(z) and dz * xhat in the blocking of
// batch_norm_math.h (the CPU's bits).
#include "norm/batch_norm_cuda.cuh"

namespace danlu {
namespace bn_cuda {
namespace {

// A lane loads its elements in groups, each group's loads issued before its math: 8 loads per tensor in flight per
// thread (x, dy and the residual: 32-48 B for 16-bit inputs, 64-96 B for float32), 1 for float64 (16-24 B), fewer
// registers than all kLaneSteps at once. The sums still take the elements in lane order.
template <typename M> constexpr int kGroup = sizeof(M) == 8 ? 1 : 8;

// The per-channel constants the sums need.
template <typename M> struct GradConstants {
  ChannelAffine<M> affine;
  M invstd;
  __device__ GradConstants(const BatchNormArgs& a, int64_t c)
      : affine(channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                              ptr<const M>(a.bias), c)),
        invstd(ptr<const M>(a.invstd)[c]) {}
};

// Adds element k's dz and dz * xhat to a lane's sums, or +0 past the lane's elements.
template <bool kResidual, typename M, ActKind kAct>
__device__ void add_element(const Activation<M, kAct>& act, const GradConstants<M>& g, bool valid, M x, M residual,
                            M dy, M& dz_sum, M& dz_xhat_sum) {
  const M dz = element_dz<kResidual>(act, g.affine, x, residual, dy);
  dz_sum = dz_sum + (valid ? dz : M(0));
  dz_xhat_sum = dz_xhat_sum + (valid ? dz * normalized(x, g.affine.mean, g.invstd) : M(0));
}

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
__device__ GradSums rows_block_sums(const BatchNormArgs& a, math_t<T> (*lanes)[kChannelTile], int64_t c,
                                    bool has_channel, int64_t first_row, int n) {
  using M = math_t<T>;
  const Activation<M, kAct> act{M(a.act_param)};
  const GradConstants<M> g(a, has_channel ? c : 0);
  const int lane = threadIdx.x / kChannelTile, steps = has_channel ? lane_steps(lane, n) : 0;
  const int64_t first = (first_row + lane) * a.channels + c, lane_stride = int64_t(kLanes) * a.channels;
  const T *x = ptr<const T>(a.x), *res = ptr<const T>(a.residual), *dy = ptr<const T>(a.dy);
  M dz_sum = M(0), dz_xhat_sum = M(0);
  DANLU_UNROLL
  for (int k0 = 0; k0 < kLaneSteps; k0 += kGroup<M>) {
    M xs[kGroup<M>], rs[kGroup<M>], dys[kGroup<M>];
    DANLU_UNROLL
    for (int j = 0; j < kGroup<M>; ++j) {
      const bool valid = k0 + j < steps;
      const int64_t i = first + (k0 + j) * lane_stride;
      xs[j] = valid ? load_as<M>(x + i) : M(0);
      rs[j] = kResidual && valid ? load_as<M>(res + i) : M(0);
      dys[j] = valid ? load_as<M>(dy + i) : M(0);
    }
    DANLU_UNROLL
    for (int j = 0; j < kGroup<M>; ++j)
      add_element<kResidual>(act, g, k0 + j < steps, xs[j], rs[j], dys[j], dz_sum, dz_xhat_sum);
  }
  const M dz = column_lane_tree(lanes, dz_sum);
  return block_sums(dz, column_lane_tree(lanes, dz_xhat_sum));
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) nchw_sums_kernel(BatchNormArgs a, ReducePlan plan, LaneStep step,
                                                              GradSums* out) {
  nchw_reduction<SumsStore<math_t<T>>>(a, plan, out, [&](int64_t c, int64_t e0, int n) {
    return nchw_block_sums<T, kAct, kResidual>(a, step, c, e0, n);
  });
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kRowThreads) rows_sums_kernel(BatchNormArgs a, ReducePlan plan, GradSums* out) {
  __shared__ math_t<T> lanes[kLanes][kChannelTile];
  rows_reduction<SumsStore<math_t<T>>>(a, plan, out, [&](int64_t c, bool has_channel, int64_t first_row, int n) {
    return rows_block_sums<T, kAct, kResidual>(a, lanes, c, has_channel, first_row, n);
  });
}

}  // namespace
}  // namespace bn_cuda

void batch_norm_backward_reduce_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace) {
  using namespace bn_cuda;
  check_batch_norm_args(a, BatchNormOp::BackwardReduce);
  on_device(a.channels > 0, device, stream, "launching the batch norm backward reduction kernels",
            [&](cudaStream_t s) {
              dispatch_dtype(a.dtype, [&](auto tag) {
                using T = typename decltype(tag)::type;
                dispatch_activation(a.activation, [&](auto act) {
                  constexpr ActKind kAct = decltype(act)::value;
                  const auto launch = [&](auto residual) {
                    constexpr bool kResidual = decltype(residual)::value;
                    launch_reduction<SumsStore<math_t<T>>>(a, s, workspace, [&](const ReducePlan& plan,
                                                                                unsigned grid, GradSums* out) {
                      if (a.inner > 1)
                        nchw_sums_kernel<T, kAct, kResidual><<<grid, kThreads, 0, s>>>(a, plan, LaneStep(a), out);
                      else
                        rows_sums_kernel<T, kAct, kResidual><<<grid, kRowThreads, 0, s>>>(a, plan, out);
                    });
                  };
                  if (a.residual) launch(std::true_type{});
                  else launch(std::false_type{});
                });
              });
            });
}

}  // namespace danlu
