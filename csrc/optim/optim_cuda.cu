// CUDA optimizer step: one launch per tensor table, whatever the number of tensors.
//
// Block b owns virtual elements [b, b + 1) * kCudaElemsPerBlock of the table's index space (tensors laid end to
// end, each padded to the vector width) and starts at the tensor Python's block map names for it: no search.
// The block takes the tensors overlapping its range in chunks of up to kThreads:
//   1. thread j reads tensor j of the chunk (offset, size, pointers, step) and computes its coefficients (two
//      double pows for Adam) into shared memory: one round of dependent loads for the whole chunk, in parallel;
//   2. the chunk's 16-byte vectors are dealt to the threads, kVectors per thread at a time, whichever tensor
//      each belongs to (a shared-memory search), so a block of small tensors keeps every thread busy.
// In flight: every thread issues the loads of its kVectors 16-byte vectors of each tensor (param, grad,
// states) before it computes any of them: 2 vectors of a 32-bit type, 1 of a 16- or 64-bit one, so 128-160 B
// (64-80 B) per thread for Adam. The kernels use 44-88 registers (no spills, no stack: __launch_bounds__ keeps
// ptxas from trading registers for occupancy), so 2-4 blocks of 256 threads share an SM: 32-160 KB in flight
// per SM, against the ~32 KB an H100/H200 SM needs for full HBM bandwidth. Vectors cut short by the end of a
// tensor, or of tensors whose pointers are not all 16-byte aligned, move element by element into the same
// registers.
#include <algorithm>
#include <new>
#include <type_traits>

#include "common/cuda_runtime.h"
#include "common/vec16.h"
#include "optim/multi_tensor_step.h"
#include "optim/optim.h"

namespace danlu {
namespace {

constexpr int kThreads = 256;

struct DeviceScalars {
  double lr;
  const void* lr_ptr;
  bool lr_is_double;
  const float* grad_scale;
  const float* found_inf;
  unsigned int* step_counter;
  const int64_t* block_first_tensor;
};

template <class Rule, typename T> __device__ bool all_aligned16(const TensorPtrs<T>& x) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(x.param) | reinterpret_cast<uintptr_t>(x.grad);
  DANLU_UNROLL
  for (int k = 0; k < kMaxStates; ++k)
    if (uses_state<Rule>(k)) bits |= reinterpret_cast<uintptr_t>(x.state[k]);
  return bits % 16 == 0;
}

// One chunk's tensors in shared memory, as thread j of the block read tensor j of the chunk.
template <class Rule, typename T> struct Chunk {
  using Coeffs = typename Rule::Coeffs;
  int64_t start[kThreads];  // virtual index where the tensor starts
  int64_t numel[kThreads];
  TensorPtrs<T> ptrs[kThreads];
  bool aligned[kThreads];
  // Coeffs may have constructors, which __shared__ variables may not: raw storage, written with placement.
  alignas(Coeffs) unsigned char coeff_bytes[kThreads * sizeof(Coeffs)];
  __device__ Coeffs& coeffs(int s) { return reinterpret_cast<Coeffs*>(coeff_bytes)[s]; }

  // The last of the first `count` tensors that starts at or before v (empty tensors start where the next one
  // does, so the one found holds v).
  __device__ int find(int64_t v, int count) const {
    int lo = 0, hi = count;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (start[mid] <= v) lo = mid;
      else hi = mid;
    }
    return lo;
  }
};

// The kVectors vectors of one thread: raw element registers, loaded before any is computed.
template <class Rule, typename T, int kVectors> struct Registers {
  Vec16<T> param[kVectors], grad[kVectors], state[kMaxStates][kVectors];
  int seg[kVectors];
  int64_t index[kVectors];  // of the vector's first element inside its tensor
  int valid[kVectors];      // elements of the vector inside its tensor: W, fewer at its end, 0 past it

  __device__ TensorPtrs<T> regs(int u) {
    return {param[u].v, grad[u].v, {state[0][u].v, state[1][u].v, state[2][u].v}};
  }
};

// to[0, n) = from[0, n): one 16-byte access when `vector`, else element by element in a fixed-trip loop, so the
// register side stays in registers.
template <typename T> __device__ void move_vector(T* to, const T* from, int n, bool vector) {
  if (vector) {
    *reinterpret_cast<Vec16<T>*>(to) = *reinterpret_cast<const Vec16<T>*>(from);
    return;
  }
  DANLU_UNROLL
  for (int j = 0; j < Vec16<T>::kWidth; ++j)
    if (j < n) to[j] = from[j];
}

template <class Rule, typename T, bool kUnscale>
__global__ void __launch_bounds__(kThreads, 2) multi_tensor_step_kernel(TensorTable tab, Rule rule, DeviceScalars ds) {
  using M = math_t<T>;
  using Coeffs = typename Rule::Coeffs;
  constexpr int W = Vec16<T>::kWidth;
  constexpr int kVectors = sizeof(T) == 4 ? 2 : 1;
  __shared__ Chunk<Rule, T> chunk;

  // Independent loads, issued together.
  const bool skip = ds.found_inf && *ds.found_inf != 0.0f;
  const double lr = !ds.lr_ptr        ? ds.lr
                    : ds.lr_is_double ? *static_cast<const double*>(ds.lr_ptr)
                                      : double(*static_cast<const float*>(ds.lr_ptr));
  const M grad_scale = kUnscale ? M(*ds.grad_scale) : M(1);
  int64_t first = ds.block_first_tensor[blockIdx.x];
  if (skip) return;  // GradScaler found an inf or NaN: every block skips, so the steps stay as they are too

  const int64_t begin = int64_t(blockIdx.x) * kCudaElemsPerBlock;
  const int64_t end = begin + kCudaElemsPerBlock < tab.total ? begin + kCudaElemsPerBlock : tab.total;
  for (;;) {
    const int64_t mine = first + threadIdx.x;
    const bool in_chunk = mine < tab.n && tab.at(kOffsetRow, mine) < end;
    if (in_chunk) {
      const TensorPtrs<T> ptrs = tensor_ptrs<Rule, T>(tab, mine);
      chunk.start[threadIdx.x] = tab.at(kOffsetRow, mine);
      chunk.numel[threadIdx.x] = tab.at(kNumelRow, mine);
      chunk.ptrs[threadIdx.x] = ptrs;
      chunk.aligned[threadIdx.x] = all_aligned16<Rule>(ptrs);
      const double step = Rule::kCountsSteps ? next_step(tab, mine) : 0.0;
      new (&chunk.coeffs(threadIdx.x)) Coeffs(rule.coeffs(step, lr, tab.at(kFlagsRow, mine)));
    }
    // The chunk's tensors are a prefix of the threads (offsets only grow), and count is the same in every thread.
    const int count = __syncthreads_count(in_chunk);
    if (count == 0) break;
    const int64_t lo = begin > chunk.start[0] ? begin : chunk.start[0];
    const int64_t next = count == kThreads && first + count < tab.n ? tab.at(kOffsetRow, first + count) : end;
    const int64_t hi = next < end ? next : end;

    // lo is a multiple of W (block starts and tensor starts are), so every vector lies inside one tensor's range.
    for (int64_t base = lo + int64_t(threadIdx.x) * W; base < hi; base += int64_t(kThreads) * W * kVectors) {
      Registers<Rule, T, kVectors> r;
      DANLU_UNROLL
      for (int u = 0; u < kVectors; ++u) {
        const int64_t v = base + int64_t(u) * kThreads * W;
        r.seg[u] = v < hi ? chunk.find(v, count) : 0;
        r.index[u] = v - chunk.start[r.seg[u]];
        const int64_t left = chunk.numel[r.seg[u]] - r.index[u];
        r.valid[u] = v >= hi || left <= 0 ? 0 : left < W ? int(left) : W;
      }
      DANLU_UNROLL
      for (int u = 0; u < kVectors; ++u) {
        if (r.valid[u] == 0) continue;
        const TensorPtrs<T>& x = chunk.ptrs[r.seg[u]];
        const bool vector = r.valid[u] == W && chunk.aligned[r.seg[u]];
        const int64_t i = r.index[u];
        move_vector(r.param[u].v, x.param + i, r.valid[u], vector);
        move_vector(r.grad[u].v, x.grad + i, r.valid[u], vector);
        DANLU_UNROLL
        for (int k = 0; k < kMaxStates; ++k)
          if (uses_state<Rule>(k)) move_vector(r.state[k][u].v, x.state[k] + i, r.valid[u], vector);
      }
      DANLU_UNROLL
      for (int u = 0; u < kVectors; ++u) {
        const TensorPtrs<T> regs = r.regs(u);
        const Coeffs& c = chunk.coeffs(r.seg[u]);
        DANLU_UNROLL
        for (int j = 0; j < W; ++j)
          if (j < r.valid[u]) update_element<Rule, T, kUnscale>(regs, j, rule, c, grad_scale);
      }
      DANLU_UNROLL
      for (int u = 0; u < kVectors; ++u) {
        if (r.valid[u] == 0) continue;
        const TensorPtrs<T>& x = chunk.ptrs[r.seg[u]];
        const bool vector = r.valid[u] == W && chunk.aligned[r.seg[u]];
        const int64_t i = r.index[u];
        move_vector(x.param + i, r.param[u].v, r.valid[u], vector);
        if (kUnscale) move_vector(x.grad + i, r.grad[u].v, r.valid[u], vector);
        DANLU_UNROLL
        for (int k = 0; k < kMaxStates; ++k)
          if (uses_state<Rule>(k)) move_vector(x.state[k] + i, r.state[k][u].v, r.valid[u], vector);
      }
    }
    __syncthreads();  // the next chunk overwrites the shared tensors
    if (count < kThreads) break;
    first += kThreads;
  }

  // Steps and flags are read by every block above; the last block to finish updates them once.
  __shared__ bool is_last_block;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    is_last_block = atomicAdd(ds.step_counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  for (int64_t t = threadIdx.x; t < tab.n; t += kThreads) finish_tensor_step(tab, t, Rule::kCountsSteps);
}

}  // namespace

void optim_step_cuda(const StepArgs& a, int device, uintptr_t stream, uintptr_t step_counter) {
  DANLU_CHECK(a.num_tensors == 0 || a.table != 0, "optimizer step: null tensor table");
  DANLU_CHECK(step_counter != 0, "optimizer step: null step counter");
  // At least one block, so that steps of empty tensors still count.
  const int64_t blocks = std::max<int64_t>(1, (a.total + kCudaElemsPerBlock - 1) / kCudaElemsPerBlock);
  DANLU_CHECK(a.block_first_tensor != 0 && a.num_blocks == blocks,
              "optimizer step: the block map has " << a.num_blocks << " entries, the step needs " << blocks);
  DANLU_CHECK(blocks < (int64_t(1) << 31), "optimizer step: too many elements (" << a.total << ")");
  DeviceGuard guard(device);
  const TensorTable tab{reinterpret_cast<int64_t*>(a.table), a.num_tensors, a.total};
  const DeviceScalars ds{a.lr,
                         reinterpret_cast<const void*>(a.lr_ptr),
                         a.lr_is_double,
                         reinterpret_cast<const float*>(a.grad_scale_ptr),
                         reinterpret_cast<const float*>(a.found_inf_ptr),
                         reinterpret_cast<unsigned int*>(step_counter),
                         reinterpret_cast<const int64_t*>(a.block_first_tensor)};
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  // Zeroed on the launch's own stream before every launch: a counter left over from a launch on another
  // stream, or from one that never finished, cannot pick the wrong last block.
  cuda_check(cudaMemsetAsync(ds.step_counter, 0, sizeof(unsigned int), cuda_stream), "zeroing the step counter");
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_rule<math_t<T>>(a, [&](const auto& rule) {
      using Rule = std::decay_t<decltype(rule)>;
      if (a.grad_scale_ptr)
        multi_tensor_step_kernel<Rule, T, true><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(tab, rule, ds);
      else multi_tensor_step_kernel<Rule, T, false><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(tab, rule, ds);
    });
  });
  cuda_check(cudaGetLastError(), "launching the optimizer step kernel");
}

}  // namespace danlu
