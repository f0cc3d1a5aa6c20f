// CPU optimizer step, compiled once per ISA (CMakeLists.txt sets DANLU_CPU_ISA and the flags).
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "optim/multi_tensor_step.h"
#include "optim/optim.h"

namespace danlu {
namespace DANLU_CPU_ISA {
namespace {

// Threads' ranges start on 64-element boundaries so no two threads share a cache line.
constexpr int64_t kSplitAlign = 64;

// Everything by value and not inlined into the parallel region: GCC then knows that no store through
// the tensor pointers can change the pointers or the hyper-parameters, and vectorises the loop.
template <class Rule, typename T, bool kUnscale>
__attribute__((noinline)) void update_range(TensorPtrs<T> x, int64_t lo, int64_t hi, Rule rule, typename Rule::Coeffs c,
                                            math_t<T> grad_scale) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) update_element<Rule, T, kUnscale>(x, i, rule, c, grad_scale);
}

template <class Rule, typename T, bool kUnscale>
void run(const TensorTable& tab, const Rule& rule, const std::vector<typename Rule::Coeffs>& coeffs,
         math_t<T> grad_scale, int num_threads) {
#pragma omp parallel num_threads(threads_for(tab.total, num_threads))
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t share = (tab.total + nt - 1) / nt;
    const int64_t chunk = (share + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
    const int64_t begin = std::min(tab.total, tid * chunk), end = std::min(tab.total, begin + chunk);
    tab.for_each_segment(begin, end, [&](int64_t t, int64_t lo, int64_t hi) {
      update_range<Rule, T, kUnscale>(tensor_ptrs<Rule, T>(tab, t), lo, hi, rule, coeffs[size_t(t)], grad_scale);
    });
  }
}

double read_lr(const StepArgs& a) {
  if (!a.lr_ptr) return a.lr;
  return a.lr_is_double ? *reinterpret_cast<const double*>(a.lr_ptr) : *reinterpret_cast<const float*>(a.lr_ptr);
}

}  // namespace

void optim_step_cpu(const StepArgs& a, int num_threads) {
  // GradScaler found an inf or NaN: the whole step is skipped, steps included.
  if (a.found_inf_ptr && *reinterpret_cast<const float*>(a.found_inf_ptr) != 0.0f) return;
  TensorTable tab{reinterpret_cast<int64_t*>(a.table), a.num_tensors, a.total};
  const double lr = read_lr(a);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using M = math_t<T>;
    dispatch_rule<M>(a, [&](const auto& rule) {
      using Rule = std::decay_t<decltype(rule)>;
      std::vector<typename Rule::Coeffs> coeffs(size_t(tab.n));
      for (int64_t t = 0; t < tab.n; ++t) {
        const double step = Rule::kCountsSteps ? next_step(tab, t) : 0.0;
        coeffs[size_t(t)] = rule.coeffs(step, lr, tab.at(kFlagsRow, t));
      }
      if (a.grad_scale_ptr)
        run<Rule, T, true>(tab, rule, coeffs, M(*reinterpret_cast<const float*>(a.grad_scale_ptr)), num_threads);
      else run<Rule, T, false>(tab, rule, coeffs, M(1), num_threads);
      for (int64_t t = 0; t < tab.n; ++t) finish_tensor_step(tab, t, Rule::kCountsSteps);
    });
  });
}

}  // namespace DANLU_CPU_ISA
}  // namespace danlu
