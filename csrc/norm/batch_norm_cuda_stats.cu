// CUDA BatchNorm statistics: the per-channel moments of x in the blocking of batch_norm_math.h (the CPU's bits),
// finished into mean, invstd and the unbiased var; and finalize, which merges a process group's moments.
#include "norm/batch_norm_cuda.cuh"

namespace danlu {
namespace bn_cuda {
namespace {

// One block of an NCHW channel, reduced by one warp: two passes over the kLaneSteps values each lane holds in
// registers (kLaneSteps loads in flight per thread: 32 B for 16-bit x, 64 B for float32, 128 B for float64).
template <typename T>
__device__ Moments nchw_block_stats(const BatchNormArgs& a, const LaneStep& step, int64_t c, int64_t e0, int n) {
  using M = math_t<T>;
  const T* x = ptr<const T>(a.x);
  const int steps = lane_steps(threadIdx.x % kLanes, n);
  NchwCursor at(a, e0 + threadIdx.x % kLanes);
  M v[kLaneSteps];
  DANLU_UNROLL
  for (int k = 0; k < kLaneSteps; ++k) {
    v[k] = k < steps ? load_as<M>(x + at.offset(a, c)) : M(0);
    at.step(a, step);
  }
  M sum = M(0);
  DANLU_UNROLL
  for (int k = 0; k < kLaneSteps; ++k) sum = sum + v[k];
  const M mean = block_mean(__shfl_sync(kFullMask, warp_lane_tree(sum), 0), n);
  M deviations = M(0), squares = M(0);
  DANLU_UNROLL
  for (int k = 0; k < kLaneSteps; ++k) {
    const M d = k < steps ? v[k] - mean : M(0);
    deviations = deviations + d;
    squares = squares + d * d;
  }
  const M deviation_sum = warp_lane_tree(deviations);
  return block_moments(n, mean, deviation_sum, warp_lane_tree(squares));
}

// One block of rows of channels-last x for kChannelTile channels (coalesced: a warp reads 32 consecutive channels
// of a row); the same two passes and the same loads in flight per thread as the NCHW kernel.
template <typename T>
__device__ Moments rows_block_stats(const BatchNormArgs& a, math_t<T> (*lanes)[kChannelTile], int64_t c,
                                    bool has_channel, int64_t first_row, int n) {
  using M = math_t<T>;
  const int lane = threadIdx.x / kChannelTile, steps = has_channel ? lane_steps(lane, n) : 0;
  const T* x = ptr<const T>(a.x) + (first_row + lane) * a.channels + c;
  const int64_t lane_stride = int64_t(kLanes) * a.channels;
  M v[kLaneSteps];
  DANLU_UNROLL
  for (int k = 0; k < kLaneSteps; ++k) v[k] = k < steps ? load_as<M>(x + k * lane_stride) : M(0);
  M sum = M(0);
  DANLU_UNROLL
  for (int k = 0; k < kLaneSteps; ++k) sum = sum + v[k];
  const M mean = block_mean(column_lane_tree(lanes, sum), n);
  M deviations = M(0), squares = M(0);
  DANLU_UNROLL
  for (int k = 0; k < kLaneSteps; ++k) {
    const M d = k < steps ? v[k] - mean : M(0);
    deviations = deviations + d;
    squares = squares + d * d;
  }
  const M deviation_sum = column_lane_tree(lanes, deviations);
  return block_moments(n, mean, deviation_sum, column_lane_tree(lanes, squares));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nchw_stats_kernel(BatchNormArgs a, ReducePlan plan, LaneStep step, Moments* out) {
  nchw_reduction<StatsStore<math_t<T>>>(
      a, plan, out, [&](int64_t c, int64_t e0, int n) { return nchw_block_stats<T>(a, step, c, e0, n); });
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) rows_stats_kernel(BatchNormArgs a, ReducePlan plan, Moments* out) {
  __shared__ math_t<T> lanes[kLanes][kChannelTile];
  rows_reduction<StatsStore<math_t<T>>>(a, plan, out, [&](int64_t c, bool has_channel, int64_t first_row, int n) {
    return rows_block_stats<T>(a, lanes, c, has_channel, first_row, n);
  });
}

// A process group's statistics: one thread per channel merges the ranks' moments ([ranks][channels]) into rank
// 0's row, in the tree of batch_norm_math.h, and finishes them.
template <typename M> __global__ void finalize_kernel(BatchNormArgs a) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.channels) return;
  Moments* m = ptr<Moments>(a.moments);
  merge_tree(m + c, a.ranks, a.channels);
  store_statistics<M>(a, c, m[c]);
}

}  // namespace
}  // namespace bn_cuda

int64_t batch_norm_cuda_workspace_bytes(const BatchNormArgs& a) {
  // Sized for the larger partial, so one size serves both reductions.
  return bn_cuda::ReducePlan(a).workspace_partials(a.channels) * int64_t(sizeof(Moments));
}

void batch_norm_stats_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace) {
  using namespace bn_cuda;
  check_batch_norm_args(a, BatchNormOp::Stats);
  on_device(a.channels > 0, device, stream, "launching the batch norm statistics kernels", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_reduction<StatsStore<math_t<T>>>(
          a, s, workspace, [&](const ReducePlan& plan, unsigned grid, Moments* out) {
            if (a.inner > 1) nchw_stats_kernel<T><<<grid, kThreads, 0, s>>>(a, plan, LaneStep(a), out);
            else rows_stats_kernel<T><<<grid, kRowThreads, 0, s>>>(a, plan, out);
          });
    });
  });
}

void batch_norm_finalize_cuda(const BatchNormArgs& a, int device, uintptr_t stream) {
  using namespace bn_cuda;
  check_batch_norm_args(a, BatchNormOp::Finalize);
  on_device(a.channels > 0, device, stream, "launching the batch norm finalize kernel", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using M = math_t<typename decltype(tag)::type>;
      finalize_kernel<M><<<unsigned((a.channels + kThreads - 1) / kThreads), kThreads, 0, s>>>(a);
    });
  });
}

}  // namespace danlu
