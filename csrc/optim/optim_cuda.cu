// CUDA optimizer step: one launch per tensor table, whatever the number of tensors.
// Block b owns virtual elements [b * kElemsPerBlock, (b + 1) * kElemsPerBlock) and walks the
// tensors that overlap them; 16-byte vector loads where every pointer of the tensor is aligned.
#include <type_traits>

#include "common/cuda_runtime.h"
#include "common/vec16.h"
#include "optim/multi_tensor_step.h"
#include "optim/optim.h"

namespace danlu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kElemsPerBlock = 4096;  // a multiple of every dtype's vector width

struct DeviceScalars {
  double lr;
  const void* lr_ptr;
  bool lr_is_double;
  const float* grad_scale;
  const float* found_inf;
  unsigned int* step_counter;
};

template <class Rule, typename T> __device__ bool all_aligned16(const TensorPtrs<T>& x) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(x.param) | reinterpret_cast<uintptr_t>(x.grad);
  for (int k = 0; k < kMaxStates; ++k)
    if (uses_state<Rule>(k)) bits |= reinterpret_cast<uintptr_t>(x.state[k]);
  return bits % 16 == 0;
}

template <class Rule, typename T, bool kUnscale>
__device__ void update_segment(const TensorPtrs<T>& x, int64_t lo, int64_t hi, const Rule& rule,
                               const typename Rule::Coeffs& c, math_t<T> grad_scale) {
  using V = Vec16<T>;
  constexpr int W = V::kWidth;
  if (!all_aligned16<Rule>(x)) {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads)
      update_element<Rule, T, kUnscale>(x, i, rule, c, grad_scale);
    return;
  }
  // lo is a multiple of W: the table pads every tensor to the vector width.
  for (int64_t i = lo + int64_t(threadIdx.x) * W; i < hi; i += int64_t(kThreads) * W) {
    if (i + W > hi) {
      for (int64_t j = i; j < hi; ++j) update_element<Rule, T, kUnscale>(x, j, rule, c, grad_scale);
      continue;
    }
    V p = *reinterpret_cast<const V*>(x.param + i), g = *reinterpret_cast<const V*>(x.grad + i);
    V s[kMaxStates];
    DANLU_UNROLL
    for (int k = 0; k < kMaxStates; ++k)
      if (uses_state<Rule>(k)) s[k] = *reinterpret_cast<const V*>(x.state[k] + i);
    const TensorPtrs<T> regs{p.v, g.v, {s[0].v, s[1].v, s[2].v}};
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) update_element<Rule, T, kUnscale>(regs, j, rule, c, grad_scale);
    *reinterpret_cast<V*>(x.param + i) = p;
    if (kUnscale) *reinterpret_cast<V*>(x.grad + i) = g;
    DANLU_UNROLL
    for (int k = 0; k < kMaxStates; ++k)
      if (uses_state<Rule>(k)) *reinterpret_cast<V*>(x.state[k] + i) = s[k];
  }
}

template <class Rule, typename T, bool kUnscale>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_step_kernel(TensorTable tab, Rule rule, DeviceScalars ds) {
  using M = math_t<T>;
  // GradScaler found an inf or NaN: every block skips, so the steps stay as they are too.
  if (ds.found_inf && *ds.found_inf != 0.0f) return;
  const double lr = !ds.lr_ptr ? ds.lr
                    : ds.lr_is_double ? *static_cast<const double*>(ds.lr_ptr)
                                      : double(*static_cast<const float*>(ds.lr_ptr));
  const M grad_scale = kUnscale ? M(*ds.grad_scale) : M(1);
  const int64_t begin = int64_t(blockIdx.x) * kElemsPerBlock;
  const int64_t end = begin + kElemsPerBlock < tab.total ? begin + kElemsPerBlock : tab.total;
  tab.for_each_segment(begin, end, [&](int64_t t, int64_t lo, int64_t hi) {
    const double step = Rule::kCountsSteps ? next_step(tab, t) : 0.0;
    const typename Rule::Coeffs c = rule.coeffs(step, lr, tab.at(kFlagsRow, t));
    update_segment<Rule, T, kUnscale>(tensor_ptrs<Rule, T>(tab, t), lo, hi, rule, c, grad_scale);
  });
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
  if (threadIdx.x == 0) *ds.step_counter = 0;
}

}  // namespace

void optim_step_cuda(const StepArgs& a, int device, uintptr_t stream, uintptr_t step_counter) {
  DANLU_CHECK(a.num_tensors == 0 || a.table != 0, "optimizer step: null tensor table");
  DANLU_CHECK(step_counter != 0, "optimizer step: null step counter");
  DeviceGuard guard(device);
  const TensorTable tab{reinterpret_cast<int64_t*>(a.table), a.num_tensors, a.total};
  const DeviceScalars ds{a.lr, reinterpret_cast<const void*>(a.lr_ptr), a.lr_is_double,
                         reinterpret_cast<const float*>(a.grad_scale_ptr),
                         reinterpret_cast<const float*>(a.found_inf_ptr),
                         reinterpret_cast<unsigned int*>(step_counter)};
  const int64_t blocks = a.total > 0 ? (a.total + kElemsPerBlock - 1) / kElemsPerBlock : 1;
  DANLU_CHECK(blocks < (int64_t(1) << 31), "optimizer step: too many elements (" << a.total << ")");
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_rule<math_t<T>>(a, [&](const auto& rule) {
      using Rule = std::decay_t<decltype(rule)>;
      if (a.grad_scale_ptr)
        multi_tensor_step_kernel<Rule, T, true><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(tab, rule, ds);
      else
        multi_tensor_step_kernel<Rule, T, false><<<unsigned(blocks), kThreads, 0, cuda_stream>>>(tab, rule, ds);
    });
  });
  cuda_check(cudaGetLastError(), "launching the optimizer step kernel");
}

}  // namespace danlu
