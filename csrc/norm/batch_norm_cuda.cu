// CUDA BatchNorm. Reductions run in two deterministic stages: blocks write per-(split, channel)
// partials to a workspace that Python allocates, then one thread per channel merges them in split
// order. No float atomics, so the same input gives the same bits every run.
//   NCHW (inner > 1): a block owns one channel and one split of its rows * inner elements.
//   channels last (inner == 1): a block owns 32 channels (coalesced) and one split of the rows.
#include <algorithm>
#include <type_traits>

#include "common/cuda_runtime.h"
#include "common/dtype.h"
#include "norm/batch_norm.h"
#include "norm/batch_norm_math.h"

namespace danlu {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelTile = 32;                         // channels-last: channels per block
constexpr int kRowLanes = kThreads / kChannelTile;       // channels-last: rows in flight per block
constexpr int64_t kElemsPerSplit = 16384;                // work of one block of a reduction
constexpr int64_t kMaxSplits = 256;

template <typename P> __host__ __device__ P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

struct Grid {
  int64_t channel_blocks, splits;
};
// Depends on the shape only, so Python can size the workspace before the call.
Grid reduction_grid(const BatchNormArgs& a) {
  const int64_t per_channel = a.rows * a.inner;
  const int64_t splits = std::clamp<int64_t>((per_channel * (a.inner > 1 ? 1 : kChannelTile) + kElemsPerSplit - 1) /
                                                 kElemsPerSplit, 1, kMaxSplits);
  const int64_t channel_blocks = a.inner > 1 ? a.channels : (a.channels + kChannelTile - 1) / kChannelTile;
  return {channel_blocks, splits};
}

// Visits the elements of this thread's share of (channel, split): fn(c, index into x).
template <class Fn> __device__ void for_each_owned(const BatchNormArgs& a, int64_t splits, Fn&& fn) {
  const int64_t split = blockIdx.y;
  if (a.inner > 1) {
    const int64_t c = blockIdx.x, per_channel = a.rows * a.inner;
    const int64_t lo = per_channel * split / splits, hi = per_channel * (split + 1) / splits;
    for (int64_t m = lo + threadIdx.x; m < hi; m += kThreads)
      fn(c, (m / a.inner * a.channels + c) * a.inner + m % a.inner);
  } else {
    const int64_t c = int64_t(blockIdx.x) * kChannelTile + threadIdx.x % kChannelTile;
    if (c >= a.channels) return;
    const int64_t lo = a.rows * split / splits, hi = a.rows * (split + 1) / splits;
    for (int64_t r = lo + threadIdx.x / kChannelTile; r < hi; r += kRowLanes) fn(c, r * a.channels + c);
  }
}

// Merges the per-thread values of a block in a fixed order and returns, in thread 0 of each channel
// group, the block's value for that channel. Value needs merge().
template <class Value> __device__ bool block_merge(const BatchNormArgs& a, Value& v) {
  __shared__ Value shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  if (a.inner > 1) {  // all threads hold the same channel: a fixed tree
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) shared[threadIdx.x].merge(shared[threadIdx.x + width]);
      __syncthreads();
    }
    v = shared[0];
    return threadIdx.x == 0;
  }
  if (threadIdx.x >= kChannelTile) return false;
  for (int lane = 1; lane < kRowLanes; ++lane) v.merge(shared[threadIdx.x + lane * kChannelTile]);
  return true;
}

template <typename M> struct Sums {
  M dz = 0, dz_xhat = 0;
  __device__ void merge(const Sums& o) { dz += o.dz, dz_xhat += o.dz_xhat; }
};

template <typename T> __global__ void __launch_bounds__(kThreads) stats_kernel(BatchNormArgs a, int64_t splits,
                                                                                 Moments<math_t<T>>* partial) {
  using M = math_t<T>;
  Moments<M> acc;
  for_each_owned(a, splits, [&](int64_t, int64_t i) {
    const M x = load_as<M>(ptr<const T>(a.x) + i);
    acc.count = acc.count + M(1);
    const M delta = x - acc.mean;
    acc.mean = acc.mean + delta / acc.count;
    acc.m2 = acc.m2 + delta * (x - acc.mean);
  });
  const int64_t c = a.inner > 1 ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * kChannelTile + threadIdx.x % kChannelTile;
  if (block_merge(a, acc) && c < a.channels) partial[blockIdx.y * a.channels + c] = acc;
}

template <typename M> __global__ void stats_finish_kernel(BatchNormArgs a, int64_t splits, const Moments<M>* partial) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.channels) return;
  Moments<M> acc;
  for (int64_t s = 0; s < splits; ++s) acc.merge(partial[s * a.channels + c]);
  ptr<M>(a.out_mean)[c] = acc.mean;
  ptr<M>(a.out_m2)[c] = acc.m2;
}

template <typename T, ActKind kAct, bool kResidual, typename M>
__device__ M element_dz(const BatchNormArgs& a, const Activation<M, kAct>& act, const ChannelAffine<M>& k, int64_t i) {
  const M dy = load_as<M>(ptr<const T>(a.dy) + i);
  if constexpr (kAct == ActKind::Identity) {
    return dy;
  } else {
    M z = (load_as<M>(ptr<const T>(a.x) + i) - k.mean) * k.scale + k.shift;
    if constexpr (kResidual) z = z + load_as<M>(ptr<const T>(a.residual) + i);
    return dy * act.grad(z);
  }
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) reduce_kernel(BatchNormArgs a, int64_t splits, Sums<math_t<T>>* partial) {
  using M = math_t<T>;
  const Activation<M, kAct> act{M(a.act_param)};
  Sums<M> acc;
  for_each_owned(a, splits, [&](int64_t c, int64_t i) {
    const ChannelAffine<M> k = channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                                              ptr<const M>(a.bias), c);
    const M dz = element_dz<T, kAct, kResidual>(a, act, k, i);
    acc.dz = acc.dz + dz;
    acc.dz_xhat = acc.dz_xhat + dz * ((load_as<M>(ptr<const T>(a.x) + i) - k.mean) * ptr<const M>(a.invstd)[c]);
  });
  const int64_t c = a.inner > 1 ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * kChannelTile + threadIdx.x % kChannelTile;
  if (block_merge(a, acc) && c < a.channels) partial[blockIdx.y * a.channels + c] = acc;
}

template <typename M> __global__ void reduce_finish_kernel(BatchNormArgs a, int64_t splits, const Sums<M>* partial) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.channels) return;
  Sums<M> acc;
  for (int64_t s = 0; s < splits; ++s) acc.merge(partial[s * a.channels + c]);
  ptr<M>(a.sum_dz)[c] = acc.dz;
  ptr<M>(a.sum_dz_xhat)[c] = acc.dz_xhat;
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) forward_kernel(BatchNormArgs a, int64_t total) {
  using M = math_t<T>;
  const Activation<M, kAct> act{M(a.act_param)};
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t c = i / a.inner % a.channels;
    const ChannelAffine<M> k = channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                                              ptr<const M>(a.bias), c);
    M z = (load_as<M>(ptr<const T>(a.x) + i) - k.mean) * k.scale + k.shift;
    if constexpr (kResidual) z = z + load_as<M>(ptr<const T>(a.residual) + i);
    store_from(ptr<T>(a.y) + i, act.forward(z));
  }
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) apply_kernel(BatchNormArgs a, int64_t total) {
  using M = math_t<T>;
  const Activation<M, kAct> act{M(a.act_param)};
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t c = i / a.inner % a.channels;
    const ChannelAffine<M> k = channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                                              ptr<const M>(a.bias), c);
    const ChannelGrad<M> g = channel_grad(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                                          ptr<const M>(a.sum_dz), ptr<const M>(a.sum_dz_xhat), M(a.count),
                                          a.batch_stats, c);
    const M dz = element_dz<T, kAct, kResidual>(a, act, k, i);
    if constexpr (kResidual) store_from(ptr<T>(a.dresidual) + i, dz);
    const M xhat = (load_as<M>(ptr<const T>(a.x) + i) - g.mean) * g.invstd;
    store_from(ptr<T>(a.dx) + i, (dz - g.mean_dz - xhat * g.mean_dz_xhat) * g.dz_scale);
  }
}

// Calls fn(T, activation, residual) for the kernel template arguments the call needs.
template <typename Fn> void dispatch_elementwise(const BatchNormArgs& a, Fn&& fn) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    dispatch_activation(a.activation, [&](auto act) {
      if (a.residual) fn(tag, act, std::true_type{});
      else fn(tag, act, std::false_type{});
    });
  });
}

unsigned elementwise_blocks(int64_t total) {
  return unsigned(std::clamp<int64_t>((total + kThreads - 1) / kThreads, 1, 65535 * 8));
}

int64_t total_elems(const BatchNormArgs& a) { return a.rows * a.channels * a.inner; }

}  // namespace

int64_t batch_norm_cuda_workspace_bytes(const BatchNormArgs& a) {
  const Grid g = reduction_grid(a);
  const int64_t item = a.dtype == int(DType::Float64) ? sizeof(Moments<double>) : sizeof(Moments<float>);
  return g.splits * a.channels * item;
}

namespace {

// Runs launch(stream) on `device` when there is work, then checks the launches.
template <class Launch>
void on_device(bool has_work, int device, uintptr_t stream, const char* what, Launch&& launch) {
  if (!has_work) return;
  DeviceGuard guard(device);
  launch(reinterpret_cast<cudaStream_t>(stream));
  cuda_check(cudaGetLastError(), what);
}

// The two stages of a reduction: partials per (channel block, split), then one thread per channel.
template <class Partial>
void launch_reduction(const BatchNormArgs& a, cudaStream_t s, void (*partials)(BatchNormArgs, int64_t, Partial*),
                      void (*finish)(BatchNormArgs, int64_t, const Partial*), uintptr_t workspace) {
  const Grid g = reduction_grid(a);
  auto* partial = ptr<Partial>(workspace);
  partials<<<dim3(unsigned(g.channel_blocks), unsigned(g.splits)), kThreads, 0, s>>>(a, g.splits, partial);
  finish<<<unsigned((a.channels + kThreads - 1) / kThreads), kThreads, 0, s>>>(a, g.splits, partial);
}

// One elementwise kernel over x; pick(tag, act, residual) names the instantiation.
template <class Pick> void launch_elementwise(const BatchNormArgs& a, cudaStream_t s, Pick&& pick) {
  dispatch_elementwise(a, [&](auto tag, auto act, auto residual) {
    pick(tag, act, residual)<<<elementwise_blocks(total_elems(a)), kThreads, 0, s>>>(a, total_elems(a));
  });
}

}  // namespace

void batch_norm_stats_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace) {
  on_device(a.channels > 0, device, stream, "launching the batch norm statistics kernels", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_reduction(a, s, stats_kernel<T>, stats_finish_kernel<math_t<T>>, workspace);
    });
  });
}

void batch_norm_forward_cuda(const BatchNormArgs& a, int device, uintptr_t stream) {
  on_device(total_elems(a) > 0, device, stream, "launching the batch norm forward kernel", [&](cudaStream_t s) {
    launch_elementwise(a, s, [](auto tag, auto act, auto residual) {
      return forward_kernel<typename decltype(tag)::type, decltype(act)::value, decltype(residual)::value>;
    });
  });
}

void batch_norm_backward_reduce_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace) {
  on_device(a.channels > 0, device, stream, "launching the batch norm backward reduction kernels",
            [&](cudaStream_t s) {
              dispatch_elementwise(a, [&](auto tag, auto act, auto residual) {
                using T = typename decltype(tag)::type;
                launch_reduction(a, s, reduce_kernel<T, decltype(act)::value, decltype(residual)::value>,
                                 reduce_finish_kernel<math_t<T>>, workspace);
              });
            });
}

void batch_norm_backward_apply_cuda(const BatchNormArgs& a, int device, uintptr_t stream) {
  on_device(total_elems(a) > 0, device, stream, "launching the batch norm backward kernel", [&](cudaStream_t s) {
    launch_elementwise(a, s, [](auto tag, auto act, auto residual) {
      return apply_kernel<typename decltype(tag)::type, decltype(act)::value, decltype(residual)::value>;
    });
  });
}

}  // namespace danlu
