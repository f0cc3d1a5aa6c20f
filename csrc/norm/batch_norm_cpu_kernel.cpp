// CPU BatchNorm, compiled once per ISA (CMakeLists.txt sets DANLU_CPU_ISA and the flags).
// Reductions use a fixed partition of the data and merge partials in a fixed order, so results do
// not depend on the thread count; lanes are explicit so they do not depend on the vector width.
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "norm/batch_norm.h"
#include "norm/batch_norm_math.h"

namespace danlu {
namespace DANLU_CPU_ISA {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kBlockElems = 1 << 14;  // one reduction block: fits in L1/L2, read twice

template <typename P> P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

// Sum over lanes in a fixed order.
template <typename M> M lane_total(const M (&lane)[kLanes]) {
  M total = 0;
  for (int l = 0; l < kLanes; ++l) total += lane[l];
  return total;
}

// Two passes over one cache-resident run: the mean, then squared deviations from it.
template <typename T, typename M> __attribute__((noinline)) Moments<M> run_moments(const T* x, int64_t n) {
  M lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += load_as<M>(x + i + l);
  for (; i < n; ++i) lane[i % kLanes] += load_as<M>(x + i);
  const M mean = lane_total(lane) / M(n);
  M dev[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const M d = load_as<M>(x + i + l) - mean;
      dev[l] += d * d;
    }
  for (; i < n; ++i) {
    const M d = load_as<M>(x + i) - mean;
    dev[i % kLanes] += d * d;
  }
  return {M(n), mean, lane_total(dev)};
}

// Channels-last block: `rows` rows of C channels; per-channel moments into out[0..C).
template <typename T, typename M>
__attribute__((noinline)) void rows_moments(const T* x, int64_t rows, int64_t C, M* sum, Moments<M>* out) {
  // Summing deviations from the block's first row keeps the sum small when the mean is large.
  std::fill(sum, sum + C, M(0));
  for (int64_t r = 1; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) sum[c] += load_as<M>(x + r * C + c) - load_as<M>(x + c);
  for (int64_t c = 0; c < C; ++c) sum[c] = load_as<M>(x + c) + sum[c] / M(rows);  // now the block mean
  std::vector<M> m2(size_t(C), M(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const M d = load_as<M>(x + r * C + c) - sum[c];
      m2[size_t(c)] += d * d;
    }
  for (int64_t c = 0; c < C; ++c) out[c] = {M(rows), sum[c], m2[size_t(c)]};
}

// The fixed row blocks of a channels-last reduction.
struct RowBlocks {
  int64_t rows_per_block, count;
  RowBlocks(int64_t rows, int64_t C)
      // At least 16 rows a block, so the partials stay well below the size of x for wide layers.
      : rows_per_block(std::max<int64_t>(16, kBlockElems / std::max<int64_t>(C, 1))),
        count((rows + rows_per_block - 1) / rows_per_block) {}
  int64_t size(int64_t b, int64_t rows) const { return std::min(rows_per_block, rows - b * rows_per_block); }
};

template <typename T> void stats(const BatchNormArgs& a, int nt) {
  using M = math_t<T>;
  const T* x = ptr<const T>(a.x);
  M* out_mean = ptr<M>(a.out_mean);
  M* out_m2 = ptr<M>(a.out_m2);
  const int64_t R = a.rows, C = a.channels, I = a.inner;
  if (I > 1) {  // a channel is R runs of I contiguous elements
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
      Moments<M> acc;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i0 = 0; i0 < I; i0 += kBlockElems)
          acc.merge(run_moments<T, M>(x + (r * C + c) * I + i0, std::min(kBlockElems, I - i0)));
      out_mean[c] = acc.mean;
      out_m2[c] = acc.m2;
    }
    return;
  }
  const RowBlocks blocks(R, C);
  std::vector<Moments<M>> partial(size_t(blocks.count * C));
#pragma omp parallel num_threads(nt)
  {
    std::vector<M> scratch(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks.count; ++b)
      rows_moments<T, M>(x + b * blocks.rows_per_block * C, blocks.size(b, R), C, scratch.data(),
                         partial.data() + b * C);
  }
  for (int64_t c = 0; c < C; ++c) {
    Moments<M> acc;
    for (int64_t b = 0; b < blocks.count; ++b) acc.merge(partial[size_t(b * C + c)]);
    out_mean[c] = acc.mean;
    out_m2[c] = acc.m2;
  }
}

// Structure-of-arrays copies of the per-channel constants, so channels-last loops vectorise over c.
template <typename M> struct AffineArrays {
  std::vector<M> mean, scale, shift;
  explicit AffineArrays(const BatchNormArgs& a) : mean(a.channels), scale(a.channels), shift(a.channels) {
    for (int64_t c = 0; c < a.channels; ++c) {
      const ChannelAffine<M> k = channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd),
                                                ptr<const M>(a.weight), ptr<const M>(a.bias), c);
      mean[size_t(c)] = k.mean, scale[size_t(c)] = k.scale, shift[size_t(c)] = k.shift;
    }
  }
};
template <typename M> struct GradArrays {
  std::vector<M> invstd, dz_scale, mean_dz, mean_dz_xhat;
  explicit GradArrays(const BatchNormArgs& a)
      : invstd(a.channels), dz_scale(a.channels), mean_dz(a.channels), mean_dz_xhat(a.channels) {
    for (int64_t c = 0; c < a.channels; ++c) {
      const ChannelGrad<M> k = channel_grad(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                                            ptr<const M>(a.sum_dz), ptr<const M>(a.sum_dz_xhat), M(a.count),
                                            a.batch_stats, c);
      invstd[size_t(c)] = k.invstd, dz_scale[size_t(c)] = k.dz_scale;
      mean_dz[size_t(c)] = k.mean_dz, mean_dz_xhat[size_t(c)] = k.mean_dz_xhat;
    }
  }
};

// The index of the per-channel constants of element i of run r (runs numbered from first_run).
template <int64_t kStride> struct RunChannels {
  int64_t first_run, channels;
  int64_t base(int64_t r) const { return kStride ? 0 : (first_run + r) % channels; }
};

// The frame of both elementwise passes. x as runs of `width` contiguous elements: one channel's inner
// elements (NCHW: stride 0, the constants of that channel throughout) or one channels-last row (stride 1:
// channel = index in the row). Calls fn(act, channels, offset, runs, width, residual) for blocks of
// consecutive runs in parallel, with the activation, the stride and whether there is a residual as
// compile-time arguments. Blocks of several runs keep short runs (7x7 maps, 64-channel rows) from paying a
// call and a loop set-up each.
template <typename M, class Fn> void for_each_block(const BatchNormArgs& a, int nt, Fn&& fn) {
  constexpr int64_t kBlockElems = 8192;
  const bool nchw = a.inner > 1;
  const int64_t width = nchw ? a.inner : a.channels, runs = nchw ? a.rows * a.channels : a.rows;
  const int64_t per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(width, 1));
  const int64_t blocks = (runs + per_block - 1) / per_block;
  dispatch_activation(a.activation, [&](auto kind) {
    const Activation<M, decltype(kind)::value> act{M(a.act_param)};
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * per_block, count = std::min(per_block, runs - first);
      auto call = [&](auto stride) {
        const RunChannels<decltype(stride)::value> ch{first, a.channels};
        if (a.residual) fn(act, ch, first * width, count, width, std::true_type{});
        else fn(act, ch, first * width, count, width, std::false_type{});
      };
      if (nchw) call(std::integral_constant<int64_t, 0>{});
      else call(std::integral_constant<int64_t, 1>{});
    }
  });
}

template <typename T, bool kResidual, ActKind kAct, int64_t kStride, typename M>
__attribute__((noinline)) void forward_runs(const T* x, const T* res, T* y, int64_t runs, int64_t width,
                                            RunChannels<kStride> ch, AffineArrays<M> const* k,
                                            Activation<M, kAct> act) {
  const M *mean = k->mean.data(), *scale = k->scale.data(), *shift = k->shift.data();
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t off = r * width, c0 = ch.base(r);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const int64_t c = c0 + i * kStride;
      M z = (load_as<M>(x + off + i) - mean[c]) * scale[c] + shift[c];
      if constexpr (kResidual) z = z + load_as<M>(res + off + i);
      store_from(y + off + i, act.forward(z));
    }
  }
}

template <typename T> void forward(const BatchNormArgs& a, int nt) {
  using M = math_t<T>;
  const AffineArrays<M> k(a);
  const T* x = ptr<const T>(a.x);
  const T* res = ptr<const T>(a.residual);
  T* y = ptr<T>(a.y);
  for_each_block<M>(a, nt, [&](const auto& act, auto ch, int64_t off, int64_t runs, int64_t width, auto residual) {
    constexpr bool kResidual = decltype(residual)::value;
    forward_runs<T, kResidual>(x + off, kResidual ? res + off : nullptr, y + off, runs, width, ch, &k, act);
  });
}

// dz of one element: dy * act'(z), z recomputed exactly as the forward computed it.
template <typename T, ActKind kAct, bool kResidual, typename M>
DANLU_HD M element_dz(const T* x, const T* res, const T* dy, int64_t i, M mean, M scale, M shift,
                      const Activation<M, kAct>& act) {
  if constexpr (kAct == ActKind::Identity) {
    return load_as<M>(dy + i);
  } else {
    M z = (load_as<M>(x + i) - mean) * scale + shift;
    if constexpr (kResidual) z = z + load_as<M>(res + i);
    return load_as<M>(dy + i) * act.grad(z);
  }
}

template <typename T, ActKind kAct, bool kResidual, typename M>
__attribute__((noinline)) void reduce_run(const T* x, const T* res, const T* dy, int64_t n, M mean, M scale,
                                          M shift, M invstd, Activation<M, kAct> act, M& sum_dz, M& sum_dz_xhat) {
  M lane_dz[kLanes] = {}, lane_dzx[kLanes] = {};
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int64_t width = std::min<int64_t>(kLanes, n - i0);
    for (int l = 0; l < width; ++l) {
      const M dz = element_dz<T, kAct, kResidual>(x, res, dy, i0 + l, mean, scale, shift, act);
      lane_dz[l] += dz;
      lane_dzx[l] += dz * ((load_as<M>(x + i0 + l) - mean) * invstd);
    }
  }
  sum_dz = lane_total(lane_dz);
  sum_dz_xhat = lane_total(lane_dzx);
}

template <typename T, ActKind kAct, bool kResidual, typename M>
__attribute__((noinline)) void reduce_rows(const T* x, const T* res, const T* dy, int64_t rows, int64_t C,
                                           const M* mean, const M* scale, const M* shift, const M* invstd,
                                           Activation<M, kAct> act, M* sum_dz, M* sum_dz_xhat) {
  std::fill(sum_dz, sum_dz + C, M(0));
  std::fill(sum_dz_xhat, sum_dz_xhat + C, M(0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const M dz = element_dz<T, kAct, kResidual>(x + off, res ? res + off : nullptr, dy + off, c, mean[c],
                                                  scale[c], shift[c], act);
      sum_dz[c] += dz;
      sum_dz_xhat[c] += dz * ((load_as<M>(x + off + c) - mean[c]) * invstd[c]);
    }
  }
}

template <typename T> void backward_reduce(const BatchNormArgs& a, int nt) {
  using M = math_t<T>;
  const AffineArrays<M> k(a);
  const T* x = ptr<const T>(a.x);
  const T* res = ptr<const T>(a.residual);
  const T* dy = ptr<const T>(a.dy);
  const M* invstd = ptr<const M>(a.invstd);
  M* out_dz = ptr<M>(a.sum_dz);
  M* out_dzx = ptr<M>(a.sum_dz_xhat);
  const int64_t R = a.rows, C = a.channels, I = a.inner;
  dispatch_activation(a.activation, [&](auto kind) {
    constexpr ActKind kAct = decltype(kind)::value;
    const Activation<M, kAct> act{M(a.act_param)};
    if (I > 1) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
      for (int64_t c = 0; c < C; ++c) {
        M total_dz = 0, total_dzx = 0;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t off = (r * C + c) * I;
          M s_dz, s_dzx;
          if (res)
            reduce_run<T, kAct, true>(x + off, res + off, dy + off, I, k.mean[c], k.scale[c], k.shift[c], invstd[c],
                                      act, s_dz, s_dzx);
          else
            reduce_run<T, kAct, false>(x + off, nullptr, dy + off, I, k.mean[c], k.scale[c], k.shift[c],
                                       invstd[c], act, s_dz, s_dzx);
          total_dz += s_dz;
          total_dzx += s_dzx;
        }
        out_dz[c] = total_dz;
        out_dzx[c] = total_dzx;
      }
      return;
    }
    const RowBlocks blocks(R, C);
    std::vector<M> partial(size_t(2 * blocks.count * C));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < blocks.count; ++b) {
      const int64_t off = b * blocks.rows_per_block * C;
      M* p_dz = partial.data() + 2 * b * C;
      if (res)
        reduce_rows<T, kAct, true>(x + off, res + off, dy + off, blocks.size(b, R), C, k.mean.data(),
                                   k.scale.data(), k.shift.data(), invstd, act, p_dz, p_dz + C);
      else
        reduce_rows<T, kAct, false>(x + off, nullptr, dy + off, blocks.size(b, R), C, k.mean.data(),
                                    k.scale.data(), k.shift.data(), invstd, act, p_dz, p_dz + C);
    }
    for (int64_t c = 0; c < C; ++c) {
      M total_dz = 0, total_dzx = 0;
      for (int64_t b = 0; b < blocks.count; ++b) {
        total_dz += partial[size_t(2 * b * C + c)];
        total_dzx += partial[size_t(2 * b * C + C + c)];
      }
      out_dz[c] = total_dz;
      out_dzx[c] = total_dzx;
    }
  });
}

// Writes dx, and with a residual its grad dz too (the caller always provides both buffers).
template <typename T, bool kResidual, ActKind kAct, int64_t kStride, typename M>
__attribute__((noinline)) void apply_runs(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t runs,
                                          int64_t width, RunChannels<kStride> ch, AffineArrays<M> const* k,
                                          GradArrays<M> const* g, Activation<M, kAct> act) {
  const M *mean = k->mean.data(), *scale = k->scale.data(), *shift = k->shift.data();
  const M *invstd = g->invstd.data(), *dz_scale = g->dz_scale.data();
  const M *mean_dz = g->mean_dz.data(), *mean_dz_xhat = g->mean_dz_xhat.data();
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t off = r * width, c0 = ch.base(r);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const int64_t c = c0 + i * kStride, e = off + i;
      const M dz = element_dz<T, kAct, kResidual>(x, res, dy, e, mean[c], scale[c], shift[c], act);
      if constexpr (kResidual) store_from(dres + e, dz);
      const M xhat = (load_as<M>(x + e) - mean[c]) * invstd[c];
      store_from(dx + e, (dz - mean_dz[c] - xhat * mean_dz_xhat[c]) * dz_scale[c]);
    }
  }
}

template <typename T> void backward_apply(const BatchNormArgs& a, int nt) {
  using M = math_t<T>;
  const AffineArrays<M> k(a);
  const GradArrays<M> g(a);
  const T* x = ptr<const T>(a.x);
  const T* res = ptr<const T>(a.residual);
  const T* dy = ptr<const T>(a.dy);
  T* dx = ptr<T>(a.dx);
  T* dres = ptr<T>(a.dresidual);
  for_each_block<M>(a, nt, [&](const auto& act, auto ch, int64_t off, int64_t runs, int64_t width, auto residual) {
    constexpr bool kResidual = decltype(residual)::value;
    apply_runs<T, kResidual>(x + off, kResidual ? res + off : nullptr, dy + off, dx + off,
                             kResidual ? dres + off : nullptr, runs, width, ch, &k, &g, act);
  });
}

int useful_threads(const BatchNormArgs& a, int nt) { return threads_for(a.rows * a.channels * a.inner, nt); }

template <typename Fn> void with_dtype(const BatchNormArgs& a, Fn&& fn) {
  dispatch_dtype(a.dtype, [&](auto tag) { fn(tag); });
}

}  // namespace

void batch_norm_stats_cpu(const BatchNormArgs& a, int nt) {
  with_dtype(a, [&](auto tag) { stats<typename decltype(tag)::type>(a, useful_threads(a, nt)); });
}
void batch_norm_forward_cpu(const BatchNormArgs& a, int nt) {
  with_dtype(a, [&](auto tag) { forward<typename decltype(tag)::type>(a, useful_threads(a, nt)); });
}
void batch_norm_backward_reduce_cpu(const BatchNormArgs& a, int nt) {
  with_dtype(a, [&](auto tag) { backward_reduce<typename decltype(tag)::type>(a, useful_threads(a, nt)); });
}
void batch_norm_backward_apply_cpu(const BatchNormArgs& a, int nt) {
  with_dtype(a, [&](auto tag) { backward_apply<typename decltype(tag)::type>(a, useful_threads(a, nt)); });
}

}  // namespace DANLU_CPU_ISA
}  // namespace danlu
