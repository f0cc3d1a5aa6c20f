// CUDA BatchNorm. Reductions run in two deterministic stages: blocks write per-(split, channel)
// partials to a workspace that Python allocates, then one thread per channel merges them in split
// order. No float atomics, so the same input gives the same bits every run.
//   NCHW (inner > 1): a block owns one channel and one split of its rows * inner elements.
//   channels last (inner == 1): a block owns 32 channels (coalesced) and one split of the rows.
// Threads move runs of W = 16 / sizeof(T) consecutive elements, with one 16-byte access per tensor
// where every pointer is aligned (common/vec16.h): the elementwise kernels everywhere, the reductions
// where a run never crosses a row of a channel (NCHW with W dividing inner). The runs are the same
// whether or not they are read as vectors, so alignment never changes the order of a sum.
#include <algorithm>
#include <type_traits>

#include "common/cuda_runtime.h"
#include "common/dtype.h"
#include "common/vec16.h"
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

// The channel this thread reduces (channels last: may be past the last channel).
__device__ int64_t owned_channel(const BatchNormArgs& a) {
  return a.inner > 1 ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * kChannelTile + threadIdx.x % kChannelTile;
}

// Visits this thread's share of (channel, split) as runs: fn(i, n) for the n consecutive elements of x
// from index i. When W divides inner (NCHW), runs are W long and the splits fall between runs, so a run
// never crosses a row of the channel; otherwise every run is one element.
template <int W, class Fn> __device__ void for_each_owned(const BatchNormArgs& a, int64_t splits, Fn&& fn) {
  const int64_t split = blockIdx.y, c = owned_channel(a);
  if (a.inner > 1) {
    const int64_t run = a.inner % W == 0 ? W : 1, runs = a.rows * a.inner / run;
    const int64_t lo = runs * split / splits, hi = runs * (split + 1) / splits;
    for (int64_t m = lo + threadIdx.x; m < hi; m += kThreads) {
      const int64_t e = m * run;  // index within the channel's rows * inner elements
      fn((e / a.inner * a.channels + c) * a.inner + e % a.inner, int(run));
    }
  } else {
    if (c >= a.channels) return;
    const int64_t lo = a.rows * split / splits, hi = a.rows * (split + 1) / splits;
    for (int64_t r = lo + threadIdx.x / kChannelTile; r < hi; r += kRowLanes) fn(r * a.channels + c, 1);
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
  constexpr int W = Vec16<T>::kWidth;
  const T* x = ptr<const T>(a.x);
  const bool aligned = aligned16(x);
  Moments<M> acc;
  for_each_owned<W>(a, splits, [&](int64_t i, int n) {
    M xs[W];
    load_run(xs, x + i, n, aligned && n == W);
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) {
      if (j == n) break;
      acc.count = acc.count + M(1);
      const M delta = xs[j] - acc.mean;
      acc.mean = acc.mean + delta / acc.count;
      acc.m2 = acc.m2 + delta * (xs[j] - acc.mean);
    }
  });
  const int64_t c = owned_channel(a);
  if (block_merge(a, acc) && c < a.channels) partial[blockIdx.y * a.channels + c] = acc;
}

template <typename M> __device__ ChannelAffine<M> affine_of(const BatchNormArgs& a, int64_t c) {
  return channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight), ptr<const M>(a.bias), c);
}
template <typename M> __device__ ChannelGrad<M> grad_of(const BatchNormArgs& a, int64_t c) {
  return channel_grad(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight), ptr<const M>(a.sum_dz),
                      ptr<const M>(a.sum_dz_xhat), M(a.count), a.batch_stats, c);
}

// z = (x - mean) * invstd * w + b (+ residual), the input of the activation.
template <bool kResidual, typename M> __device__ M pre_activation(const ChannelAffine<M>& k, M x, M residual) {
  const M z = (x - k.mean) * k.scale + k.shift;
  return kResidual ? z + residual : z;
}

// dz = dy * act'(z) of one element, z recomputed exactly as the forward computed it.
template <bool kResidual, typename M, ActKind kAct>
__device__ M element_dz(const Activation<M, kAct>& act, const ChannelAffine<M>& k, M x, M residual, M dy) {
  if constexpr (kAct == ActKind::Identity) return dy;
  else return dy * act.grad(pre_activation<kResidual>(k, x, residual));
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) reduce_kernel(BatchNormArgs a, int64_t splits, Sums<math_t<T>>* partial) {
  using M = math_t<T>;
  constexpr int W = Vec16<T>::kWidth;
  const Activation<M, kAct> act{M(a.act_param)};
  const T* x = ptr<const T>(a.x);
  const T* res = kResidual ? ptr<const T>(a.residual) : nullptr;
  const T* dy = ptr<const T>(a.dy);
  const bool aligned = aligned16(x, res, dy);
  const int64_t c = owned_channel(a);
  Sums<M> acc;
  for_each_owned<W>(a, splits, [&](int64_t i, int n) {
    const ChannelAffine<M> k = affine_of<M>(a, c);
    const M invstd = ptr<const M>(a.invstd)[c];
    const bool vector = aligned && n == W;
    M xs[W], rs[W] = {}, dys[W];
    load_run(xs, x + i, n, vector);
    if constexpr (kResidual) load_run(rs, res + i, n, vector);
    load_run(dys, dy + i, n, vector);
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) {
      if (j == n) break;
      const M dz = element_dz<kResidual>(act, k, xs[j], rs[j], dys[j]);
      acc.dz = acc.dz + dz;
      acc.dz_xhat = acc.dz_xhat + dz * ((xs[j] - k.mean) * invstd);
    }
  });
  if (block_merge(a, acc) && c < a.channels) partial[blockIdx.y * a.channels + c] = acc;
}

// Where each reduction's per-channel result goes: stats gives mean and M2, backward_reduce the two sums.
template <typename M> __device__ void store_channel(const BatchNormArgs& a, int64_t c, const Moments<M>& m) {
  ptr<M>(a.out_mean)[c] = m.mean;
  ptr<M>(a.out_m2)[c] = m.m2;
}
template <typename M> __device__ void store_channel(const BatchNormArgs& a, int64_t c, const Sums<M>& s) {
  ptr<M>(a.sum_dz)[c] = s.dz;
  ptr<M>(a.sum_dz_xhat)[c] = s.dz_xhat;
}

// The second stage of a reduction: one thread per channel merges the splits' partials in split order.
template <class Partial> __global__ void finish_kernel(BatchNormArgs a, int64_t splits, const Partial* partial) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.channels) return;
  Partial acc;
  for (int64_t s = 0; s < splits; ++s) acc.merge(partial[s * a.channels + c]);
  store_channel(a, c, acc);
}

// Grid-stride loop of the elementwise kernels: fn(i, n) for the run of elements [i, i + n) of x,
// n = W but at the end.
template <int W, class Fn> __device__ void for_each_run(int64_t total, Fn&& fn) {
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * W; i < total; i += int64_t(gridDim.x) * kThreads * W)
    fn(i, total - i < W ? int(total - i) : W);
}

// The channels of consecutive elements of x from index i on: two divisions a run, not one an element.
struct ChannelWalk {
  int64_t c, pos;  // the element's channel, and its index within its run of inner elements of that channel
  __device__ ChannelWalk(const BatchNormArgs& a, int64_t i) : c(i / a.inner % a.channels), pos(i % a.inner) {}
  // Steps to the next element; true when that one starts another channel.
  __device__ bool next(const BatchNormArgs& a) {
    if (++pos < a.inner) return false;
    pos = 0;
    c = c + 1 == a.channels ? 0 : c + 1;
    return true;
  }
};

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) forward_kernel(BatchNormArgs a, int64_t total) {
  using M = math_t<T>;
  constexpr int W = Vec16<T>::kWidth;
  const Activation<M, kAct> act{M(a.act_param)};
  const T* x = ptr<const T>(a.x);
  const T* res = kResidual ? ptr<const T>(a.residual) : nullptr;
  T* y = ptr<T>(a.y);
  const bool aligned = aligned16(x, res, y);
  for_each_run<W>(total, [&](int64_t i, int n) {
    const bool vector = aligned && n == W;
    M xs[W] = {}, rs[W] = {}, ys[W];  // zeros past n: the math runs on every lane, only n are stored
    load_run(xs, x + i, n, vector);
    if constexpr (kResidual) load_run(rs, res + i, n, vector);
    ChannelWalk walk(a, i);
    ChannelAffine<M> k = affine_of<M>(a, walk.c);
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) {
      ys[j] = act.forward(pre_activation<kResidual>(k, xs[j], rs[j]));
      if (j + 1 < n && walk.next(a)) k = affine_of<M>(a, walk.c);
    }
    store_run(y + i, ys, n, vector);
  });
}

template <typename T, ActKind kAct, bool kResidual>
__global__ void __launch_bounds__(kThreads) apply_kernel(BatchNormArgs a, int64_t total) {
  using M = math_t<T>;
  constexpr int W = Vec16<T>::kWidth;
  const Activation<M, kAct> act{M(a.act_param)};
  const T* x = ptr<const T>(a.x);
  const T* res = kResidual ? ptr<const T>(a.residual) : nullptr;
  const T* dy = ptr<const T>(a.dy);
  T* dx = ptr<T>(a.dx);
  T* dres = kResidual ? ptr<T>(a.dresidual) : nullptr;
  const bool aligned = aligned16(x, res, dy, dx, dres);
  for_each_run<W>(total, [&](int64_t i, int n) {
    const bool vector = aligned && n == W;
    M xs[W] = {}, rs[W] = {}, dys[W] = {}, dzs[W], dxs[W];
    load_run(xs, x + i, n, vector);
    if constexpr (kResidual) load_run(rs, res + i, n, vector);
    load_run(dys, dy + i, n, vector);
    ChannelWalk walk(a, i);
    ChannelAffine<M> k = affine_of<M>(a, walk.c);
    ChannelGrad<M> g = grad_of<M>(a, walk.c);
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) {
      dzs[j] = element_dz<kResidual>(act, k, xs[j], rs[j], dys[j]);
      const M xhat = (xs[j] - g.mean) * g.invstd;
      dxs[j] = (dzs[j] - g.mean_dz - xhat * g.mean_dz_xhat) * g.dz_scale;
      if (j + 1 < n && walk.next(a)) {
        k = affine_of<M>(a, walk.c);
        g = grad_of<M>(a, walk.c);
      }
    }
    if constexpr (kResidual) store_run(dres + i, dzs, n, vector);
    store_run(dx + i, dxs, n, vector);
  });
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

// Blocks for one run of W elements per thread; past 65535 * 8, threads loop over more runs.
unsigned elementwise_blocks(int64_t total, int W) {
  return unsigned(std::clamp<int64_t>((total + kThreads * W - 1) / (kThreads * W), 1, 65535 * 8));
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
                      uintptr_t workspace) {
  const Grid g = reduction_grid(a);
  auto* partial = ptr<Partial>(workspace);
  partials<<<dim3(unsigned(g.channel_blocks), unsigned(g.splits)), kThreads, 0, s>>>(a, g.splits, partial);
  finish_kernel<<<unsigned((a.channels + kThreads - 1) / kThreads), kThreads, 0, s>>>(a, g.splits, partial);
}

// One elementwise kernel over x; pick(tag, act, residual) names the instantiation.
template <class Pick> void launch_elementwise(const BatchNormArgs& a, cudaStream_t s, Pick&& pick) {
  dispatch_elementwise(a, [&](auto tag, auto act, auto residual) {
    const unsigned blocks = elementwise_blocks(total_elems(a), Vec16<typename decltype(tag)::type>::kWidth);
    pick(tag, act, residual)<<<blocks, kThreads, 0, s>>>(a, total_elems(a));
  });
}

}  // namespace

void batch_norm_stats_cuda(const BatchNormArgs& a, int device, uintptr_t stream, uintptr_t workspace) {
  on_device(a.channels > 0, device, stream, "launching the batch norm statistics kernels", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      launch_reduction(a, s, stats_kernel<T>, workspace);
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
                launch_reduction(a, s, reduce_kernel<T, decltype(act)::value, decltype(residual)::value>, workspace);
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
