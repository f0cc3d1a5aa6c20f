#pragma once
// Per-element update math of every optimizer, shared by the CPU loops and the CUDA kernels.
// Each rule mirrors the operation order of torch's single-tensor (foreach=False) implementation,
// but keeps intermediates in the math type M (float, or double for float64) instead of rounding to
// the param dtype after every operation. Options that change which state tensors exist are template
// parameters; the others are uniform selects so the loops stay branch-free and vectorise.
#include <cmath>
#include <cstdint>

#include "common/check.h"
#include "common/macros.h"
#include "common/multi_tensor.h"

namespace danlu {

enum class OptimKind : int { Adam = 0, Sgd = 1, Rmsprop = 2, Adagrad = 3 };

// Everything one fused step needs; filled by python/danlu/optim/_base.py.
struct StepArgs {
  int kind = 0;
  int dtype = 0;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  double momentum = 0, dampening = 0, alpha = 0, lr_decay = 0;
  bool maximize = false, decoupled_weight_decay = false, amsgrad = false, nesterov = false, centered = false;
  uintptr_t table = 0;  // int64 [kNumRows, num_tensors], host memory for CPU, device memory for CUDA
  int64_t num_tensors = 0, total = 0;
  // CUDA: int64 [num_blocks], the first tensor of each block's virtual range (common/multi_tensor.h).
  uintptr_t block_first_tensor = 0;
  int64_t num_blocks = 0;
  uintptr_t lr_ptr = 0;  // 0-d lr tensor on the params' device, or 0 to use lr
  bool lr_is_double = false;
  uintptr_t grad_scale_ptr = 0, found_inf_ptr = 0;  // float32 0-d tensors from GradScaler, or 0
};

// A uniform on/off option held in the math type: `maximize(-g, g)` is -g when it is on. GCC
// vectorises a select on a float comparison but not one on a scalar bool among 16-bit loads.
template <typename M> struct Option {
  M on;
  DANLU_HD explicit Option(bool enabled = false) : on(enabled ? M(1) : M(0)) {}
  DANLU_HD M operator()(M if_on, M if_off) const { return on != M(0) ? if_on : if_off; }
};

// torch's lerp with a uniform weight: self + w * (end - self) for |w| < 0.5, else
// end - (end - self) * (1 - w). The formula is picked once, not per element.
template <typename M> struct Lerp {
  M weight;
  Option<M> small_weight;
  DANLU_HD explicit Lerp(double w = 0) : weight(M(w)), small_weight(M(w) < M(0.5) && M(w) > M(-0.5)) {}
  DANLU_HD M operator()(M self, M end) const {
    return small_weight(self + weight * (end - self), end - (end - self) * (M(1) - weight));
  }
};

// sqrt in the math type itself: an unqualified sqrt(float) would pick ::sqrt(double).
DANLU_HD float sqrt_m(float x) { return sqrtf(x); }
DANLU_HD double sqrt_m(double x) { return sqrt(x); }

// Whether state slot k of the table is used by Rule.
template <class Rule> DANLU_HD constexpr bool uses_state(int k) { return (Rule::kStateMask >> k) & 1u; }

// torch.maximum: NaN in either argument propagates.
template <typename M> DANLU_HD M nan_max(M a, M b) { return ((a != a) | (a > b)) ? a : b; }

// grad after maximize and (coupled) L2 weight decay, as every torch optimizer starts.
template <typename M> DANLU_HD M decayed_grad(M g, M p, Option<M> maximize, M weight_decay) {
  g = maximize(-g, g);
  return weight_decay != M(0) ? g + weight_decay * p : g;
}

template <typename M, bool kAmsgrad> struct AdamRule {
  static constexpr unsigned kStateMask = kAmsgrad ? 0b111 : 0b011;  // exp_avg, exp_avg_sq, max_exp_avg_sq
  static constexpr bool kCountsSteps = true;
  double beta1_, beta2_, weight_decay_;
  Lerp<M> towards_grad;  // exp_avg.lerp_(grad, 1 - beta1)
  M beta2, one_minus_beta2, eps, l2_decay;
  Option<M> maximize, decoupled;

  explicit AdamRule(const StepArgs& a)
      : beta1_(a.beta1), beta2_(a.beta2), weight_decay_(a.weight_decay), towards_grad(1 - a.beta1), beta2(M(a.beta2)),
        one_minus_beta2(M(1 - a.beta2)), eps(M(a.eps)), l2_decay(M(a.decoupled_weight_decay ? 0.0 : a.weight_decay)),
        maximize(a.maximize), decoupled(a.decoupled_weight_decay && a.weight_decay != 0) {}

  struct Coeffs {
    M step_size, bias_correction2_sqrt, param_decay;
  };
  // Scalars in double, as torch computes them in Python, then rounded to M.
  DANLU_HD Coeffs coeffs(double step, double lr, int64_t /*flags*/) const {
    double bias_correction1 = 1 - pow(beta1_, step);
    double bias_correction2 = 1 - pow(beta2_, step);
    return {M(lr / bias_correction1), M(sqrt(bias_correction2)), M(1 - lr * weight_decay_)};
  }
  DANLU_HD void apply(M& p, M g, M (&s)[kMaxStates], const Coeffs& c) const {
    p = decoupled(p * c.param_decay, p);
    g = decayed_grad(g, p, maximize, l2_decay);
    s[0] = towards_grad(s[0], g);
    s[1] = s[1] * beta2 + one_minus_beta2 * g * g;
    M second = s[1];
    if constexpr (kAmsgrad) second = s[2] = nan_max(s[2], s[1]);
    M denom = sqrt_m(second) / c.bias_correction2_sqrt + eps;
    p = p + -c.step_size * s[0] / denom;
  }
};

template <typename M, bool kMomentum> struct SgdRule {
  static constexpr unsigned kStateMask = kMomentum ? 0b001 : 0;  // momentum_buffer
  static constexpr bool kCountsSteps = false;
  M weight_decay, momentum, one_minus_dampening;
  Option<M> maximize, nesterov;

  explicit SgdRule(const StepArgs& a)
      : weight_decay(M(a.weight_decay)), momentum(M(a.momentum)), one_minus_dampening(M(1 - a.dampening)),
        maximize(a.maximize), nesterov(a.nesterov) {}

  struct Coeffs {
    M lr;
    Option<M> first_step;
  };
  DANLU_HD Coeffs coeffs(double /*step*/, double lr, int64_t flags) const {
    return {M(lr), Option<M>((flags & kFirstStep) != 0)};
  }
  DANLU_HD void apply(M& p, M g, M (&s)[kMaxStates], const Coeffs& c) const {
    g = decayed_grad(g, p, maximize, weight_decay);
    if constexpr (kMomentum) {
      // The first step's buffer is a copy of the grad; the select ignores the uninitialised memory.
      s[0] = c.first_step(g, s[0] * momentum + one_minus_dampening * g);
      g = nesterov(g + momentum * s[0], s[0]);
    }
    p = p + -c.lr * g;
  }
};

template <typename M, bool kMomentum, bool kCentered> struct RmspropRule {
  static constexpr unsigned kStateMask =
      0b001 | (kMomentum ? 0b010 : 0) | (kCentered ? 0b100 : 0);  // square_avg, momentum_buffer, grad_avg
  static constexpr bool kCountsSteps = true;
  M weight_decay, alpha, one_minus_alpha, eps, momentum;
  Lerp<M> towards_grad;  // grad_avg.lerp_(grad, 1 - alpha)
  Option<M> maximize;

  explicit RmspropRule(const StepArgs& a)
      : weight_decay(M(a.weight_decay)), alpha(M(a.alpha)), one_minus_alpha(M(1 - a.alpha)), eps(M(a.eps)),
        momentum(M(a.momentum)), towards_grad(1 - a.alpha), maximize(a.maximize) {}

  struct Coeffs {
    M lr;
  };
  DANLU_HD Coeffs coeffs(double /*step*/, double lr, int64_t /*flags*/) const { return {M(lr)}; }
  DANLU_HD void apply(M& p, M g, M (&s)[kMaxStates], const Coeffs& c) const {
    g = decayed_grad(g, p, maximize, weight_decay);
    s[0] = s[0] * alpha + one_minus_alpha * g * g;
    M avg;
    if constexpr (kCentered) {
      s[2] = towards_grad(s[2], g);
      avg = sqrt_m(s[0] + M(-1) * s[2] * s[2]);
    } else {
      avg = sqrt_m(s[0]);
    }
    avg = avg + eps;
    if constexpr (kMomentum) {
      s[1] = s[1] * momentum + g / avg;
      p = p + -c.lr * s[1];
    } else {
      p = p + -c.lr * g / avg;
    }
  }
};

template <typename M> struct AdagradRule {
  static constexpr unsigned kStateMask = 0b001;  // sum
  static constexpr bool kCountsSteps = true;
  double lr_decay_;
  M weight_decay, eps;
  Option<M> maximize;

  explicit AdagradRule(const StepArgs& a)
      : lr_decay_(a.lr_decay), weight_decay(M(a.weight_decay)), eps(M(a.eps)), maximize(a.maximize) {}

  struct Coeffs {
    M clr;
  };
  DANLU_HD Coeffs coeffs(double step, double lr, int64_t /*flags*/) const {
    return {M(lr / (1 + (step - 1) * lr_decay_))};
  }
  DANLU_HD void apply(M& p, M g, M (&s)[kMaxStates], const Coeffs& c) const {
    g = decayed_grad(g, p, maximize, weight_decay);
    s[0] = s[0] + M(1) * g * g;
    M std_dev = sqrt_m(s[0]) + eps;
    p = p + -c.clr * g / std_dev;
  }
};

// Calls fn(rule) with the rule that StepArgs names, for math type M (host only).
template <typename M, typename Fn> void dispatch_rule(const StepArgs& a, Fn&& fn) {
  switch (OptimKind(a.kind)) {
    case OptimKind::Adam: return a.amsgrad ? fn(AdamRule<M, true>(a)) : fn(AdamRule<M, false>(a));
    case OptimKind::Sgd: return a.momentum != 0 ? fn(SgdRule<M, true>(a)) : fn(SgdRule<M, false>(a));
    case OptimKind::Rmsprop:
      if (a.momentum > 0) return a.centered ? fn(RmspropRule<M, true, true>(a)) : fn(RmspropRule<M, true, false>(a));
      return a.centered ? fn(RmspropRule<M, false, true>(a)) : fn(RmspropRule<M, false, false>(a));
    case OptimKind::Adagrad: return fn(AdagradRule<M>(a));
  }
  DANLU_CHECK(false, "unknown optimizer kind " << a.kind);
}

}  // namespace danlu
