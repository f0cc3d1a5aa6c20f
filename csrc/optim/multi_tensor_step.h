#pragma once
// One optimizer step on one element, shared by the CPU loop and the CUDA kernel: load in the math
// type, unscale the grad for GradScaler (writing the unscaled grad back, as torch's fused kernels
// do), apply the rule, store.
#include "common/dtype.h"
#include "common/multi_tensor.h"
#include "optim/update_rules.h"

namespace danlu {

template <typename T> struct TensorPtrs {
  T* param;
  T* grad;
  T* state[kMaxStates];
};

template <class Rule, typename T> DANLU_HD TensorPtrs<T> tensor_ptrs(const TensorTable& tab, int64_t t) {
  TensorPtrs<T> x{tab.ptr<T>(kParamRow, t), tab.ptr<T>(kGradRow, t), {}};
  for (int k = 0; k < kMaxStates; ++k) x.state[k] = uses_state<Rule>(k) ? tab.ptr<T>(kStateRow + k, t) : nullptr;
  return x;
}

template <class Rule, typename T, bool kUnscale, typename M>
DANLU_HD void update_element(const TensorPtrs<T>& x, int64_t i, const Rule& rule, const typename Rule::Coeffs& c,
                             M grad_scale) {
  M p = load_as<M>(x.param + i);
  M g = load_as<M>(x.grad + i);
  if constexpr (kUnscale) {
    g = g / grad_scale;
    store_from(x.grad + i, g);
  }
  M s[kMaxStates] = {};
  DANLU_UNROLL
  for (int k = 0; k < kMaxStates; ++k)
    if (uses_state<Rule>(k)) s[k] = load_as<M>(x.state[k] + i);
  rule.apply(p, g, s, c);
  store_from(x.param + i, p);
  DANLU_UNROLL
  for (int k = 0; k < kMaxStates; ++k)
    if (uses_state<Rule>(k)) store_from(x.state[k] + i, s[k]);
}

// After a step that ran (not skipped for an inf): count it and retire first-step flags.
DANLU_HD void finish_tensor_step(TensorTable& tab, int64_t t, bool counts_steps) {
  if (counts_steps) *tab.ptr<float>(kStepRow, t) += 1.0f;
  tab.at(kFlagsRow, t) &= ~int64_t(kFirstStep);
}

// The step count a tensor's update uses: its stored float32 step plus one, as torch's `step_t += 1`.
DANLU_HD double next_step(const TensorTable& tab, int64_t t) { return double(*tab.ptr<float>(kStepRow, t) + 1.0f); }

}  // namespace danlu
