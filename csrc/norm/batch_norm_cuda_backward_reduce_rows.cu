// CUDA BatchNorm backward, reduction pass, channels last: the first kernel (see batch_norm_cuda_backward_reduce.cu).
#include "norm/batch_norm_cuda_sums.cuh"

namespace danlu {
namespace bn_cuda {
namespace {

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
__global__ void __launch_bounds__(kRowThreads) rows_sums_kernel(BatchNormArgs a, ReducePlan plan, GradSums* out) {
  __shared__ math_t<T> lanes[kLanes][kChannelTile];
  rows_reduction<SumsStore<math_t<T>>>(a, plan, out, [&](int64_t c, bool has_channel, int64_t first_row, int n) {
    return rows_block_sums<T, kAct, kResidual>(a, lanes, c, has_channel, first_row, n);
  });
}

}  // namespace

template <typename T>
void launch_rows_sums(const BatchNormArgs& a, cudaStream_t s, const ReducePlan& plan, unsigned grid, GradSums* out) {
  dispatch_sums_kernel(a, [&](auto act, auto residual) {
    rows_sums_kernel<T, decltype(act)::value, decltype(residual)::value><<<grid, kRowThreads, 0, s>>>(a, plan, out);
  });
}
template void launch_rows_sums<float>(const BatchNormArgs&, cudaStream_t, const ReducePlan&, unsigned, GradSums*);
template void launch_rows_sums<double>(const BatchNormArgs&, cudaStream_t, const ReducePlan&, unsigned, GradSums*);
template void launch_rows_sums<Half>(const BatchNormArgs&, cudaStream_t, const ReducePlan&, unsigned, GradSums*);
template void launch_rows_sums<BFloat16>(const BatchNormArgs&, cudaStream_t, const ReducePlan&, unsigned, GradSums*);

}  // namespace bn_cuda
}  // namespace danlu
