#pragma once
// BatchNorm math shared by the CPU loops and the CUDA kernels: activations and their derivatives,
// the stable merge of partial statistics, and the per-element forward and backward formulas.
//
// x is viewed as [rows, channels, inner], contiguous in that order:
//   NCHW / NCDHW:            rows = N, inner = H*W(*D)
//   channels_last(_3d), NC:  rows = N*H*W(*D), inner = 1
#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/exp.h"
#include "common/macros.h"

namespace danlu {

enum class ActKind : int { Identity = 0, Relu = 1, LeakyRelu = 2, Elu = 3, Silu = 4, Sigmoid = 5, Tanh = 6 };

// act(z) and d act / dz, with torch's formulas (param: leaky_relu's negative_slope, elu's alpha).
// exp_m, expm1_m and tanh_m (common/exp.h) are arithmetic, not libm calls: the CPU loops vectorise
// them, and the CPU computes the very bits the GPU does.
template <typename M, ActKind kAct> struct Activation {
  M param;
  DANLU_HD M forward(M z) const {
    if constexpr (kAct == ActKind::Relu) return z < M(0) ? M(0) : z;  // NaN stays NaN, as torch.relu
    else if constexpr (kAct == ActKind::LeakyRelu) return z > M(0) ? z : z * param;
    else if constexpr (kAct == ActKind::Elu) return z > M(0) ? z : param * expm1_m(z);
    else if constexpr (kAct == ActKind::Silu) return z / (M(1) + exp_m(-z));
    else if constexpr (kAct == ActKind::Sigmoid) return M(1) / (M(1) + exp_m(-z));
    else if constexpr (kAct == ActKind::Tanh) return tanh_m(z);
    else return z;
  }
  // At z = NaN each grad is what torch's backward gives: its relu and elu test z <= 0, leaky_relu z > 0.
  DANLU_HD M grad(M z) const {
    if constexpr (kAct == ActKind::Relu) return z <= M(0) ? M(0) : M(1);
    else if constexpr (kAct == ActKind::LeakyRelu) return z > M(0) ? M(1) : param;
    else if constexpr (kAct == ActKind::Elu) return z <= M(0) ? param * exp_m(z) : M(1);
    else if constexpr (kAct == ActKind::Silu) {
      M s = M(1) / (M(1) + exp_m(-z));
      return s * (M(1) + z * (M(1) - s));
    } else if constexpr (kAct == ActKind::Sigmoid) {
      M s = M(1) / (M(1) + exp_m(-z));
      return s * (M(1) - s);
    } else if constexpr (kAct == ActKind::Tanh) {
      M t = tanh_m(z);
      return M(1) - t * t;
    } else {
      return M(1);
    }
  }
};

// Calls fn(std::integral_constant<ActKind, kind>) for a runtime activation code (host only).
template <typename Fn> void dispatch_activation(int kind, Fn&& fn) {
  switch (ActKind(kind)) {
    case ActKind::Identity: return fn(std::integral_constant<ActKind, ActKind::Identity>{});
    case ActKind::Relu: return fn(std::integral_constant<ActKind, ActKind::Relu>{});
    case ActKind::LeakyRelu: return fn(std::integral_constant<ActKind, ActKind::LeakyRelu>{});
    case ActKind::Elu: return fn(std::integral_constant<ActKind, ActKind::Elu>{});
    case ActKind::Silu: return fn(std::integral_constant<ActKind, ActKind::Silu>{});
    case ActKind::Sigmoid: return fn(std::integral_constant<ActKind, ActKind::Sigmoid>{});
    case ActKind::Tanh: return fn(std::integral_constant<ActKind, ActKind::Tanh>{});
  }
  DANLU_CHECK(false, "unknown activation " << kind);
}

// Partial statistics of one channel: element count, mean and sum of squared deviations (M2).
// Partials merge with Chan et al.'s formula, which never subtracts two large sums of squares.
template <typename M> struct Moments {
  M count = 0, mean = 0, m2 = 0;
  DANLU_HD void merge(const Moments& o) {
    if (o.count == M(0)) return;
    const M total = count + o.count;
    const M delta = o.mean - mean;
    const M weight = o.count / total;
    mean = mean + delta * weight;
    m2 = m2 + o.m2 + delta * delta * count * weight;
    count = total;
  }
};

// Per-channel constants of the forward: z = (x - mean) * scale + shift (+ residual), y = act(z).
template <typename M> struct ChannelAffine {
  M mean, scale, shift;
};
template <typename M> DANLU_HD ChannelAffine<M> channel_affine(const M* mean, const M* invstd, const M* weight,
                                                               const M* bias, int64_t c) {
  const M w = weight ? weight[c] : M(1);
  return {mean[c], invstd[c] * w, bias ? bias[c] : M(0)};
}

// Per-channel constants of the backward. With batch statistics (training):
//   dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)),  xhat = (x - mean) * invstd
// With running statistics (eval), mean and invstd are constants: dx = w * invstd * dz.
template <typename M> struct ChannelGrad {
  M mean, invstd, dz_scale, mean_dz, mean_dz_xhat;
};
template <typename M>
DANLU_HD ChannelGrad<M> channel_grad(const M* mean, const M* invstd, const M* weight, const M* sum_dz,
                                     const M* sum_dz_xhat, M count, bool batch_stats, int64_t c) {
  const M w = weight ? weight[c] : M(1);
  const M inv_count = batch_stats ? M(1) / count : M(0);
  return {mean[c], invstd[c], w * invstd[c], sum_dz ? sum_dz[c] * inv_count : M(0),
          sum_dz_xhat ? sum_dz_xhat[c] * inv_count : M(0)};
}

}  // namespace danlu
