#pragma once
// What the BatchNorm CUDA compile units share: launch helpers, the plans of the reductions (which the workspace
// size depends on) and the kernels that merge the reductions' partials. The reduction kernels (stats and the
// backward sums) follow the blocking of batch_norm_math.h and produce the CPU's bits; no float atomics.
#include <algorithm>
#include <type_traits>

#include "common/cuda_runtime.h"
#include "common/dtype.h"
#include "common/vec16.h"
#include "norm/batch_norm.h"
#include "norm/batch_norm_math.h"

namespace danlu {
namespace bn_cuda {

constexpr int kThreads = 256;            // threads of the elementwise and NCHW reduction kernels
constexpr int kWarps = kThreads / 32;    // NCHW reductions: a thread block reduces kWarps consecutive blocks
constexpr int kChannelTile = 32;  // channels-last reductions: channels of a thread block (one per lane column)
constexpr int kMergeWidth = 256;  // partials one thread block of a merge level combines
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kLanes == 32, "a warp reduces the lanes of a block with shuffles");
static_assert((kWarps & (kWarps - 1)) == 0 && (kMergeWidth & (kMergeWidth - 1)) == 0, "trees need powers of two");

template <typename P> __host__ __device__ P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

inline int64_t total_elems(const BatchNormArgs& a) { return a.rows * a.channels * a.inner; }

// Runs launch(stream) on `device` when there is work, then checks the launches.
template <class Launch>
void on_device(bool has_work, int device, uintptr_t stream, const char* what, Launch&& launch) {
  if (!has_work) return;
  DeviceGuard guard(device);
  launch(reinterpret_cast<cudaStream_t>(stream));
  cuda_check(cudaGetLastError(), what);
}

// How a reduction runs: the first kernel writes `partials` per channel (NCHW: the root of kWarps blocks, channels
// last: one block), then merge levels of kMergeWidth until one is left. Depends on the shape only, so Python can
// size the workspace before the call.
struct ReducePlan {
  int64_t per_channel, blocks, partials;
  explicit ReducePlan(const BatchNormArgs& a)
      : per_channel(a.rows * a.inner), blocks((per_channel + kBlockElems - 1) / kBlockElems),
        partials(a.inner > 1 ? (blocks + kWarps - 1) / kWarps : blocks) {}
  static int64_t next(int64_t n) { return (n + kMergeWidth - 1) / kMergeWidth; }
  // Partials of the workspace: the first kernel's, then the first merge level's; later levels reuse both.
  int64_t workspace_partials(int64_t channels) const {
    return partials > 1 ? channels * (partials + next(partials)) : 0;
  }
};

// A reduction's per-channel result: Store::store(a, c, root) writes it where BatchNormArgs says.
template <typename M> struct StatsStore {
  using Partial = Moments;
  static __device__ void store(const BatchNormArgs& a, int64_t c, const Moments& m) { store_statistics<M>(a, c, m); }
};
template <typename M> struct SumsStore {
  using Partial = GradSums;
  static __device__ void store(const BatchNormArgs& a, int64_t c, const GradSums& s) { store_grad_sums<M>(a, c, s); }
};

// The aligned pairwise tree (merge_tree) over node[0, kWidth) in shared memory, one level per step; node[0] ends
// up with the root. Every thread of the block calls it. Entries past the real ones are empty (Partial{}), which a
// merge leaves out exactly.
template <int kWidth, class Partial> __device__ void shared_merge_tree(Partial* node) {
  DANLU_UNROLL
  for (int s = 1; s < kWidth; s *= 2) {
    if (threadIdx.x < kWidth && threadIdx.x % (2 * s) == 0) node[threadIdx.x].merge(node[threadIdx.x + s]);
    __syncthreads();
  }
}

// One merge level: thread block (c, g) merges partials [g * kMergeWidth, (g + 1) * kMergeWidth) of channel c of
// in ([channels][n_in]) into out ([channels][n_out]), or, on the last level (n_out == 1), stores the root.
// Keeps one partial (16-24 bytes) per thread in flight: the levels after the first move little data.
template <class Store> __global__ void __launch_bounds__(kMergeWidth)
    merge_kernel(BatchNormArgs a, const typename Store::Partial* in, int64_t n_in, typename Store::Partial* out,
                 int64_t n_out) {
  using Partial = typename Store::Partial;
  __shared__ Partial node[kMergeWidth];
  const int64_t c = blockIdx.x / n_out, g = blockIdx.x % n_out, j = g * kMergeWidth + threadIdx.x;
  node[threadIdx.x] = j < n_in ? in[c * n_in + j] : Partial{};
  __syncthreads();
  shared_merge_tree<kMergeWidth>(node);
  if (threadIdx.x != 0) return;
  if (n_out == 1) Store::store(a, c, node[0]);
  else out[c * n_out + g] = node[0];
}

// ---------------------------------------------------------------------------------------------
// The first kernel of a reduction: blocks of kBlockElems of a channel, lane l of a block being lane l of a warp
// (NCHW) or row l of a thread block's rows (channels last). Every lane loads its kLaneSteps elements (or a group of
// them) before it adds any; the loads are scalar but coalesced (consecutive lanes or channels are consecutive
// elements), whatever the map size. At 40-64 registers (ptxas) that is 1000-1500 threads per SM and 32-48 KB in
// flight per SM for 16-bit inputs, 64-128 KB for float32 and float64 (the kernels say what each thread keeps).

// kLanes elements of a channel further on (NCHW): that many whole rows and the rest within a row.
struct LaneStep {
  int64_t rows, inner;
  explicit LaneStep(const BatchNormArgs& a) : rows(kLanes / a.inner), inner(kLanes % a.inner) {}
};

// A lane's walk over its elements of an NCHW channel: element e = r * inner + i of channel c is at
// x[(r * channels + c) * inner + i], and the next one of the lane is kLanes elements on.
struct NchwCursor {
  int64_t r, i;
  __device__ NchwCursor(const BatchNormArgs& a, int64_t e) : r(e / a.inner), i(e % a.inner) {}
  __device__ int64_t offset(const BatchNormArgs& a, int64_t c) const { return (r * a.channels + c) * a.inner + i; }
  __device__ void step(const BatchNormArgs& a, const LaneStep& s) {
    i += s.inner;
    r += s.rows;
    if (i >= a.inner) i -= a.inner, ++r;
  }
};

// lane_tree across a warp: shuffles down by kLanes / 2, ..., 1; lane 0 gets the result.
template <typename M> __device__ M warp_lane_tree(M v) {
  DANLU_UNROLL
  for (int w = kLanes / 2; w > 0; w /= 2) v = v + __shfl_down_sync(kFullMask, v, w);
  return v;
}

// lane_tree across the rows of a channels-last thread block (thread = row * kChannelTile + channel): every thread
// passes its lane value of its channel and gets the channel's result. Every thread of the block calls it.
template <typename M> __device__ M column_lane_tree(M (*lanes)[kChannelTile], M v) {
  const int column = threadIdx.x % kChannelTile, lane = threadIdx.x / kChannelTile;
  lanes[lane][column] = v;
  __syncthreads();
  DANLU_UNROLL
  for (int w = kLanes / 2; w > 0; w /= 2) {
    if (lane < w) lanes[lane][column] = lanes[lane][column] + lanes[lane + w][column];
    __syncthreads();
  }
  const M result = lanes[0][column];
  __syncthreads();  // before the next call writes lanes again
  return result;
}

// Where a first kernel's partial of channel c goes: out[c][j], or, when it is the channel's root, to Store.
template <class Store>
__device__ void put_partial(const BatchNormArgs& a, const ReducePlan& plan, typename Store::Partial* out, int64_t c,
                            int64_t j, const typename Store::Partial& p) {
  if (out) out[c * plan.partials + j] = p;
  else Store::store(a, c, p);
}

// NCHW: thread block b takes chunk b % partials of channel b / partials: kWarps consecutive blocks, warp w the
// block chunk * kWarps + w, reduced by block(c, e0, n) (the partial in lane 0); the kWarps partials then merge in
// shared memory, an aligned subtree of the channel's tree.
template <class Store, class Block>
__device__ void nchw_reduction(const BatchNormArgs& a, const ReducePlan& plan, typename Store::Partial* out,
                               Block&& block) {
  using Partial = typename Store::Partial;
  __shared__ Partial node[kWarps];
  const int64_t c = blockIdx.x / plan.partials, chunk = blockIdx.x % plan.partials;
  const int warp = threadIdx.x / kLanes;
  const int64_t b = chunk * kWarps + warp;
  Partial p{};
  if (b < plan.blocks)  // the same for the whole warp, whose shuffles need every lane
    p = block(c, b * kBlockElems, int(min(int64_t(kBlockElems), plan.per_channel - b * kBlockElems)));
  if (threadIdx.x % kLanes == 0) node[warp] = p;
  __syncthreads();
  shared_merge_tree<kWarps>(node);
  if (threadIdx.x == 0) put_partial<Store>(a, plan, out, c, chunk, node[0]);
}

// Channels last: thread block b takes block b / tiles of rows for channel tile b % tiles; thread (row lane l,
// channel column) reduces rows l, l + kLanes, ... of the block with rows(c, has_channel, first_row, n), which
// returns the channel's partial.
template <class Store, class Rows>
__device__ void rows_reduction(const BatchNormArgs& a, const ReducePlan& plan, typename Store::Partial* out,
                               Rows&& rows) {
  const int64_t tiles = (a.channels + kChannelTile - 1) / kChannelTile;
  const int64_t b = blockIdx.x / tiles, c = blockIdx.x % tiles * kChannelTile + threadIdx.x % kChannelTile;
  const int n = int(min(int64_t(kBlockElems), plan.per_channel - b * kBlockElems));
  const typename Store::Partial p = rows(c, c < a.channels, b * kBlockElems, n);
  if (threadIdx.x < kChannelTile && c < a.channels) put_partial<Store>(a, plan, out, c, b, p);
}

inline unsigned first_kernel_blocks(const BatchNormArgs& a, const ReducePlan& plan) {
  const int64_t tiles = (a.channels + kChannelTile - 1) / kChannelTile;
  const int64_t blocks = a.inner > 1 ? a.channels * plan.partials : plan.blocks * tiles;
  DANLU_CHECK(blocks < (int64_t(1) << 31), "batch norm: too many blocks for one launch");
  return unsigned(blocks);
}
constexpr int kRowThreads = kLanes * kChannelTile;  // threads of a channels-last reduction block

// ---------------------------------------------------------------------------------------------
// Elementwise kernels (forward, backward_apply): runs of W = 16 / sizeof(T) consecutive elements, each moved with
// one 16-byte access per tensor where every pointer is aligned (common/vec16.h) and element by element otherwise.
// Thread t of the grid takes runs t, t + S, t + 2S, ... (S = threads in the grid), kRuns of them at a time with
// every load of the kRuns issued before any math.

// The channel of an element of x, carried along as the index grows: divisions once per thread, not per run.
struct ChannelWalk {
  int64_t c, pos;  // the element's channel, and its index within its run of `inner` elements of that channel
  __device__ ChannelWalk(const BatchNormArgs& a, int64_t i) : c(i / a.inner % a.channels), pos(i % a.inner) {}
  // One element on; true when that one starts another channel.
  __device__ bool next(const BatchNormArgs& a) {
    if (++pos < a.inner) return false;
    pos = 0;
    c = c + 1 == a.channels ? 0 : c + 1;
    return true;
  }
  // A step of (q * channels + step_channels) * inner + step_pos elements (any q), as ElementwisePlan splits it.
  __device__ void jump(const BatchNormArgs& a, int64_t step_pos, int64_t step_channels) {
    pos += step_pos;
    const int64_t carry = pos >= a.inner;
    pos -= carry * a.inner;
    c += step_channels + carry;
    if (c >= a.channels) c -= a.channels;
  }
};

// A run as loaded, in T: four registers whatever the dtype, converted to M only where the math needs it.
template <typename T> __device__ Vec16<T> load_raw(const T* p, int n, bool vector) {
  if (vector) return *reinterpret_cast<const Vec16<T>*>(p);
  Vec16<T> raw{};
  DANLU_UNROLL
  for (int j = 0; j < Vec16<T>::kWidth; ++j)
    if (j < n) raw.v[j] = p[j];
  return raw;
}

// Elements of run i (from element i) that exist: W, fewer at the end, 0 past it.
__device__ inline int run_length(int64_t total, int64_t i, int width) {
  return i >= total ? 0 : total - i < width ? int(total - i) : width;
}

struct ElementwisePlan {
  int64_t total, runs, stride;  // elements, runs of W, and S: runs between a thread's consecutive runs
  int64_t step_pos, step_channels;  // S * W elements as ChannelWalk::jump takes them
  unsigned blocks;
  ElementwisePlan(const BatchNormArgs& a, int width, int runs_per_thread) {
    total = total_elems(a);
    runs = (total + width - 1) / width;
    // Past 65535 * 8 blocks a thread loops; that is several thread blocks per SM on any GPU.
    blocks = unsigned(std::clamp<int64_t>(
        (runs + int64_t(kThreads) * runs_per_thread - 1) / (int64_t(kThreads) * runs_per_thread), 1, 65535 * 8));
    stride = int64_t(blocks) * kThreads;
    const int64_t step = stride * width;
    step_pos = step % a.inner;
    step_channels = step / a.inner % a.channels;
  }
};

// Launches the first kernel of a reduction with first(plan, grid, out) (out: where its partials go, null when they
// are the roots already), then the merge levels. workspace holds ReducePlan::workspace_partials partials.
template <class Store, class First>
void launch_reduction(const BatchNormArgs& a, cudaStream_t s, uintptr_t workspace, First&& first) {
  using Partial = typename Store::Partial;
  const ReducePlan plan(a);
  if (plan.blocks == 0) {  // no elements: every channel's root is empty
    merge_kernel<Store><<<unsigned(a.channels), kMergeWidth, 0, s>>>(a, nullptr, 0, nullptr, 1);
    return;
  }
  const unsigned grid = first_kernel_blocks(a, plan);  // checks before anything runs
  DANLU_CHECK(a.channels * ReducePlan::next(plan.partials) < (int64_t(1) << 31),
              "batch norm: too many partials for one launch");
  Partial* level[2] = {ptr<Partial>(workspace), ptr<Partial>(workspace) + a.channels * plan.partials};
  first(plan, grid, plan.partials > 1 ? level[0] : nullptr);
  int which = 0;
  for (int64_t n = plan.partials; n > 1; n = ReducePlan::next(n), which ^= 1) {
    const int64_t n_out = ReducePlan::next(n);
    merge_kernel<Store>
        <<<unsigned(a.channels * n_out), kMergeWidth, 0, s>>>(a, level[which], n, level[which ^ 1], n_out);
  }
}

}  // namespace bn_cuda
}  // namespace danlu
