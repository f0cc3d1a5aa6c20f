#pragma once
// BatchNorm math shared by the CPU loops and the CUDA kernels (docs/design.md principle 2): activations and their
// derivatives, the per-element forward and backward formulas, and the statistics accumulator: the blocking of a
// reduction, the per-block algorithm and the tree that merges blocks. The CPU and CUDA sides call these and differ
// only in how they iterate, so the CPU tests check the numbers the GPU computes, bit for bit.
//
// x is viewed as [rows, channels, inner], contiguous in that order:
//   NCHW / NCDHW:            rows = N, inner = H*W(*D)
//   channels_last(_3d), NC:  rows = N*H*W(*D), inner = 1
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/exp.h"
#include "common/macros.h"
#include "norm/batch_norm.h"

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

// ---------------------------------------------------------------------------------------------
// Reductions (statistics and the backward's sums): one blocking, one per-block algorithm, one merge tree.
//
// A channel's n elements are taken in a fixed order (NCHW: e = row * inner + i; channels last: e = row) and cut
// into blocks of kBlockElems. Lane l of a block accumulates the block's elements l, l + kLanes, l + 2 kLanes, ...
// in that order, in the math type M; the kLanes lane values then combine in a halving tree (lane_tree). A block
// thus gives a partial, widened to double (block_moments: two passes over the block, its mean and then the
// deviations from it; block_sums: the backward's two sums), and the partials of a channel merge in the aligned
// pairwise tree over block indices (merge_tree), in double. float32 rounding stays inside blocks of 512 elements,
// the tree's depth grows with log2 of the count, and no operation order depends on threads, vector width or the
// device: the CPU and CUDA compute the same bits.
constexpr int kLanes = 32;
constexpr int kLaneSteps = 16;
constexpr int kBlockElems = kLanes * kLaneSteps;

// Lane l's elements of a block of n (<= kBlockElems): how many of the steps k = 0 .. kLaneSteps-1 it has. A step
// past them may add +0 to the lane (what a fixed-trip loop with a guard does) or nothing: the same, since a lane
// sum starts at +0 and is never -0 (x + 0 = x for every other x).
DANLU_HD int lane_steps(int lane, int n) { return n > lane ? (n - lane + kLanes - 1) / kLanes : 0; }

// The kLanes lane values combined: lane[l] += lane[l + w] for w = kLanes / 2, ..., 1; the result is lane[0].
// (A warp does the same with shuffles down by w.) Overwrites lane.
template <typename M> DANLU_HD M lane_tree(M (&lane)[kLanes]) {
  DANLU_UNROLL
  for (int w = kLanes / 2; w > 0; w /= 2) {
    DANLU_UNROLL
    for (int l = 0; l < w; ++l) lane[l] = lane[l] + lane[l + w];
  }
  return lane[0];
}

template <typename M> DANLU_HD M block_mean(M lane_total, int n) { return lane_total / M(n); }

// Statistics of part of a channel: element count, mean and sum of squared deviations (M2).
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  // Chan et al.'s merge, which never subtracts two large sums of squares. The mean is the weighted sum rather
  // than mean + delta * weight, so that an infinite mean stays infinite (torch's mean of data with an inf) instead
  // of becoming inf - inf. An empty side (count 0) leaves the other exactly as it is.
  DANLU_HD void merge(const Moments& o) {
    if (o.count == 0) return;
    if (count == 0) {
      *this = o;
      return;
    }
    const double total = count + o.count;
    const double w = count / total, w_o = o.count / total;
    const double delta = o.mean - mean;
    mean = mean * w + o.mean * w_o;
    m2 = m2 + o.m2 + delta * delta * count * w_o;
    count = total;
  }
};

// The backward's per-channel sums of dz and dz * xhat.
struct GradSums {
  double dz = 0, dz_xhat = 0;
  DANLU_HD void merge(const GradSums& o) {
    dz = dz + o.dz;
    dz_xhat = dz_xhat + o.dz_xhat;
  }
};

// A block's moments from its float mean and the lane-tree sums of the deviations d = x - mean and of d^2: the
// mean corrected by the deviations' sum and M2 = sum d^2 - (sum d)^2 / n (the corrected two-pass algorithm), in
// double. The float mean alone would be off by up to half an ulp of itself, which for data far from zero is much
// more than the block's spread warrants. A mean that is not finite (an inf or NaN in the block) stays as it is.
template <typename M> DANLU_HD Moments block_moments(int n, M mean, M deviations, M squares) {
  const double count = n, m = mean, s = deviations;
  if (!(m - m == 0)) return {count, m, double(squares)};  // inf - inf and NaN - NaN are NaN
  const double m2 = double(squares) - s * s / count;
  return {count, m + s / count, m2 < 0 ? 0.0 : m2};  // rounding may leave a constant block's M2 a hair below 0
}
template <typename M> DANLU_HD GradSums block_sums(M dz, M dz_xhat) { return {double(dz), double(dz_xhat)}; }

// The aligned pairwise tree over partials p[0], p[stride], ..., p[(n - 1) * stride], left in p[0]: at level s,
// node i (a multiple of 2s) takes in node i + s if there is one. Any aligned power-of-two range of blocks is a
// subtree, so a thread or a thread block may reduce such a range on its own and hand on its root.
template <class Partial> DANLU_HD void merge_tree(Partial* p, int64_t n, int64_t stride) {
  for (int64_t s = 1; s < n; s *= 2)
    for (int64_t i = 0; i + s < n; i += 2 * s) p[i * stride].merge(p[(i + s) * stride]);
}

// What training normalises with and what the running statistics take in, from a channel's merged moments:
// mean, 1 / sqrt(biased var + eps) and the unbiased var, computed in double and rounded once to M.
template <typename M> struct FinishedStats {
  M mean, invstd, var;
};
template <typename M> DANLU_HD FinishedStats<M> finish_moments(const Moments& m, double eps) {
  return {M(m.mean), M(1.0 / ::sqrt(m.m2 / m.count + eps)), M(m.m2 / (m.count - 1))};
}

// Where a reduction's per-channel results go (BatchNormArgs): the statistics' moments and/or finished statistics,
// and the backward's sums, rounded to M.
template <typename M> DANLU_HD void store_statistics(const BatchNormArgs& a, int64_t c, const Moments& m) {
  if (a.moments) reinterpret_cast<Moments*>(a.moments)[c] = m;
  if (a.out_mean) {
    const FinishedStats<M> s = finish_moments<M>(m, a.eps);
    reinterpret_cast<M*>(a.out_mean)[c] = s.mean;
    reinterpret_cast<M*>(a.out_invstd)[c] = s.invstd;
    reinterpret_cast<M*>(a.out_var)[c] = s.var;
  }
}
template <typename M> DANLU_HD void store_grad_sums(const BatchNormArgs& a, int64_t c, const GradSums& s) {
  reinterpret_cast<M*>(a.sum_dz)[c] = M(s.dz);
  reinterpret_cast<M*>(a.sum_dz_xhat)[c] = M(s.dz_xhat);
}

// ---------------------------------------------------------------------------------------------
// Per-element formulas

// Per-channel constants of the forward: z = (x - mean) * scale + shift (+ residual), y = act(z).
template <typename M> struct ChannelAffine {
  M mean, scale, shift;
};
template <typename M> DANLU_HD ChannelAffine<M> channel_affine(const M* mean, const M* invstd, const M* weight,
                                                               const M* bias, int64_t c) {
  const M w = weight ? weight[c] : M(1);
  return {mean[c], invstd[c] * w, bias ? bias[c] : M(0)};
}

// z, the input of the activation (and of its derivative in the backward, recomputed from x).
template <bool kResidual, typename M> DANLU_HD M pre_activation(const ChannelAffine<M>& k, M x, M residual) {
  const M z = (x - k.mean) * k.scale + k.shift;
  if constexpr (kResidual) return z + residual;
  else return z;
}

// dz = dy * act'(z) of one element: the grad of z, and of the residual.
template <bool kResidual, typename M, ActKind kAct>
DANLU_HD M element_dz(const Activation<M, kAct>& act, const ChannelAffine<M>& k, M x, M residual, M dy) {
  if constexpr (kAct == ActKind::Identity) return dy;
  else return dy * act.grad(pre_activation<kResidual>(k, x, residual));
}

template <typename M> DANLU_HD M normalized(M x, M mean, M invstd) { return (x - mean) * invstd; }

// Per-channel constants of the backward. With batch statistics (training):
//   dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)),  xhat = (x - mean) * invstd
// With running statistics (eval), mean and invstd are constants: dx = w * invstd * dz.
template <typename M> struct ChannelGrad {
  M mean, invstd, dz_scale, mean_dz, mean_dz_xhat;
};
// 1 / count, the factor that turns the reduction's sums into means (0 without batch statistics).
template <typename M> DANLU_HD M inverse_count(double count, bool batch_stats) {
  return batch_stats ? M(1) / M(count) : M(0);
}
template <typename M>
DANLU_HD ChannelGrad<M> channel_grad(const M* mean, const M* invstd, const M* weight, const M* sum_dz,
                                     const M* sum_dz_xhat, M inv_count, int64_t c) {
  const M w = weight ? weight[c] : M(1);
  return {mean[c], invstd[c], w * invstd[c], sum_dz ? sum_dz[c] * inv_count : M(0),
          sum_dz_xhat ? sum_dz_xhat[c] * inv_count : M(0)};
}

template <typename M> DANLU_HD M input_grad(const ChannelGrad<M>& g, M x, M dz) {
  return (dz - g.mean_dz - normalized(x, g.mean, g.invstd) * g.mean_dz_xhat) * g.dz_scale;
}

}  // namespace danlu
