// CPU BatchNorm, compiled once per ISA (CMakeLists.txt sets DANLU_CPU_ISA and the flags). The math, the blocking
// of the reductions and their merge tree are batch_norm_math.h's, as on CUDA; this file only iterates. Lanes are
// explicit arrays, so results do not depend on the vector width, and threads take whole blocks (or aligned
// subtrees of blocks), so they do not depend on the thread count either.
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

template <typename P> P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

constexpr int64_t kChunkBlocks = 64;  // NCHW: the blocks of one channel a thread reduces, an aligned subtree
constexpr int kTile = 64;             // channels last: the channels a thread reduces over one block of rows

int64_t block_count(int64_t n) { return (n + kBlockElems - 1) / kBlockElems; }
int block_size(int64_t b, int64_t n) { return int(std::min<int64_t>(kBlockElems, n - b * kBlockElems)); }

// The partial statistics of one block of n values, v[i] being element i (batch_norm_math.h): lane sums of x for
// its mean, then of the deviations from it and their squares (the block is in cache).
template <typename M> __attribute__((noinline)) Moments block_stats(const M* v, int n) {
  M lane[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = lane[l] + v[i + l];
  for (int l = 0; i + l < n; ++l) lane[l] = lane[l] + v[i + l];
  const M mean = block_mean(lane_tree(lane), n);
  M dev[kLanes] = {}, sq[kLanes] = {};
  const auto add = [&](int l, M x) {
    const M d = x - mean;
    dev[l] = dev[l] + d;
    sq[l] = sq[l] + d * d;
  };
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) add(l, v[i + l]);
  for (int l = 0; i + l < n; ++l) add(l, v[i + l]);
  const M deviations = lane_tree(dev);
  return block_moments(n, mean, deviations, lane_tree(sq));
}

// NCHW: the n elements e0, e0 + 1, ... of channel c (element e = r * inner + i is x[(r * C + c) * inner + i]) as
// M values: a pointer into x where they are one run of M already, else copied into buf.
template <typename T, typename M>
const M* block_values(const BatchNormArgs& a, const T* x, int64_t c, int64_t e0, int n, M* buf) {
  int64_t r = e0 / a.inner, i = e0 % a.inner;
  if constexpr (std::is_same_v<T, M>) {
    if (i + n <= a.inner) return x + (r * a.channels + c) * a.inner + i;
  }
  for (int done = 0; done < n; ++r, i = 0) {
    const T* run = x + (r * a.channels + c) * a.inner + i;
    const int len = int(std::min<int64_t>(n - done, a.inner - i));
    for (int j = 0; j < len; ++j) buf[done + j] = load_as<M>(run + j);
    done += len;
  }
  return buf;
}

// Channels last: partials of `width` channels from c0 over the n rows of one block, each channel's lanes an
// array (lane l takes rows l, l + kLanes, ...) so that the loops vectorise over channels.
template <typename M> struct TileLanes {
  M v[kLanes][kTile];
  void clear(int width) {
    for (auto& lane : v) std::fill(lane, lane + width, M(0));
  }
  // lane_tree for every channel of the tile: the result is v[0].
  void tree(int width) {
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l)
#pragma omp simd
        for (int c = 0; c < width; ++c) v[l][c] = v[l][c] + v[l + w][c];
  }
};

template <typename T, typename M>
__attribute__((noinline)) void rows_block_stats(const T* x, int64_t C, int width, int n, TileLanes<M>& dev,
                                                TileLanes<M>& sq, Moments* out, int64_t out_stride) {
  dev.clear(width);
  for (int j = 0; j < n; ++j) {
    M* lane = dev.v[j % kLanes];
#pragma omp simd
    for (int c = 0; c < width; ++c) lane[c] = lane[c] + load_as<M>(x + j * C + c);
  }
  dev.tree(width);
  M mean[kTile];
  for (int c = 0; c < width; ++c) mean[c] = block_mean(dev.v[0][c], n);
  dev.clear(width);
  sq.clear(width);
  for (int j = 0; j < n; ++j) {
    M* lane_dev = dev.v[j % kLanes];
    M* lane_sq = sq.v[j % kLanes];
#pragma omp simd
    for (int c = 0; c < width; ++c) {
      const M d = load_as<M>(x + j * C + c) - mean[c];
      lane_dev[c] = lane_dev[c] + d;
      lane_sq[c] = lane_sq[c] + d * d;
    }
  }
  dev.tree(width);
  sq.tree(width);
  for (int c = 0; c < width; ++c) out[c * out_stride] = block_moments(n, mean[c], dev.v[0][c], sq.v[0][c]);
}

// Runs fn(item) for items [0, count) in parallel. Each item writes only its own partials, so the schedule does not
// change any result.
template <class Fn> void parallel_items(int64_t count, int nt, Fn&& fn) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t item = 0; item < count; ++item) fn(item);
}

// Block partials of every channel, [channels][blocks]: filled by fill(partial, blocks), then merged per channel
// in the tree; out(c, root) takes each channel's root.
template <class Partial, class Fill, class Out>
void reduce_channels(const BatchNormArgs& a, int nt, Fill&& fill, Out&& out) {
  const int64_t C = a.channels, n = a.rows * a.inner, blocks = block_count(n);
  std::vector<Partial> partial(size_t(C * blocks));
  fill(partial.data(), blocks);
  // NCHW fills merge each chunk of kChunkBlocks into its first entry; merging those roots completes the tree.
  const int64_t stride = a.inner > 1 ? kChunkBlocks : 1;
  const int64_t roots = (blocks + stride - 1) / stride;
#pragma omp parallel for num_threads(std::min<int64_t>(nt, C)) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    Partial* p = partial.data() + c * blocks;
    if (blocks == 0) {
      out(c, Partial{});
      continue;
    }
    merge_tree(p, roots, stride);
    out(c, p[0]);
  }
}

// NCHW: a thread takes kChunkBlocks blocks of one channel, computes their partials with block(c, b, e0, n) and
// merges them into the chunk's first entry.
template <class Partial, class Block>
void fill_channel_chunks(const BatchNormArgs& a, int nt, Partial* partial, int64_t blocks, Block&& block) {
  const int64_t n = a.rows * a.inner, chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  parallel_items(a.channels * chunks, nt, [&](int64_t item) {
    const int64_t c = item / chunks, first = item % chunks * kChunkBlocks;
    const int64_t count = std::min(kChunkBlocks, blocks - first);
    Partial* p = partial + c * blocks + first;
    for (int64_t b = 0; b < count; ++b) p[b] = block(c, (first + b) * kBlockElems, block_size(first + b, n));
    merge_tree(p, count, 1);
  });
}

// Channels last: a thread takes one block of rows for a tile of channels; rows(p, c0, width, r0, n) writes the
// partials of channels [c0, c0 + width) at p[c * blocks].
template <class Partial, class Rows>
void fill_row_blocks(const BatchNormArgs& a, int nt, Partial* partial, int64_t blocks, Rows&& rows) {
  const int64_t tiles = (a.channels + kTile - 1) / kTile;
  parallel_items(blocks * tiles, nt, [&](int64_t item) {
    const int64_t b = item / tiles, c0 = item % tiles * kTile;
    const int width = int(std::min<int64_t>(kTile, a.channels - c0));
    rows(partial + c0 * blocks + b, c0, width, b * kBlockElems, block_size(b, a.rows));
  });
}

template <typename T> void stats(const BatchNormArgs& a, int nt) {
  using M = math_t<T>;
  const T* x = ptr<const T>(a.x);
  const auto out = [&](int64_t c, const Moments& m) { store_statistics<M>(a, c, m); };
  if (a.inner > 1) {
    reduce_channels<Moments>(
        a, nt,
        [&](Moments* partial, int64_t blocks) {
          fill_channel_chunks(a, nt, partial, blocks, [&](int64_t c, int64_t e0, int n) {
            M buf[kBlockElems];
            return block_stats(block_values(a, x, c, e0, n, buf), n);
          });
        },
        out);
    return;
  }
  reduce_channels<Moments>(
      a, nt,
      [&](Moments* partial, int64_t blocks) {
        fill_row_blocks(a, nt, partial, blocks, [&](Moments* p, int64_t c0, int width, int64_t r0, int n) {
          TileLanes<M> dev, sq;
          rows_block_stats(x + r0 * a.channels + c0, a.channels, width, n, dev, sq, p, blocks);
        });
      },
      out);
}

// Structure-of-arrays copies of the per-channel constants, so channels-last loops vectorise over c.
template <typename M> struct AffineArrays {
  std::vector<M> mean, scale, shift;
  explicit AffineArrays(const BatchNormArgs& a) : mean(a.channels), scale(a.channels), shift(a.channels) {
    for (int64_t c = 0; c < a.channels; ++c) {
      const ChannelAffine<M> k =
          channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight), ptr<const M>(a.bias), c);
      mean[size_t(c)] = k.mean, scale[size_t(c)] = k.scale, shift[size_t(c)] = k.shift;
    }
  }
  ChannelAffine<M> operator[](int64_t c) const { return {mean[size_t(c)], scale[size_t(c)], shift[size_t(c)]}; }
};
double count_of(const BatchNormArgs& a) { return a.count_ptr ? *ptr<const double>(a.count_ptr) : a.count; }
template <typename M> struct GradArrays {
  std::vector<M> mean, invstd, dz_scale, mean_dz, mean_dz_xhat;
  explicit GradArrays(const BatchNormArgs& a)
      : mean(a.channels), invstd(a.channels), dz_scale(a.channels), mean_dz(a.channels), mean_dz_xhat(a.channels) {
    const M inv_count = inverse_count<M>(count_of(a), a.batch_stats);
    for (int64_t c = 0; c < a.channels; ++c) {
      const ChannelGrad<M> k = channel_grad(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                                            ptr<const M>(a.sum_dz), ptr<const M>(a.sum_dz_xhat), inv_count, c);
      mean[size_t(c)] = k.mean, invstd[size_t(c)] = k.invstd, dz_scale[size_t(c)] = k.dz_scale;
      mean_dz[size_t(c)] = k.mean_dz, mean_dz_xhat[size_t(c)] = k.mean_dz_xhat;
    }
  }
  ChannelGrad<M> operator[](int64_t c) const {
    const size_t i = size_t(c);
    return {mean[i], invstd[i], dz_scale[i], mean_dz[i], mean_dz_xhat[i]};
  }
};

// The backward's partial sums of one block of one channel (NCHW), from its x, residual and dy values.
template <bool kResidual, typename M, ActKind kAct>
__attribute__((noinline)) GradSums block_grad_sums(const M* xs, const M* rs, const M* dys, int n, ChannelAffine<M> k,
                                                   M invstd, Activation<M, kAct> act) {
  M lane_dz[kLanes] = {}, lane_dzx[kLanes] = {};
  const auto add = [&](int l, int i) {
    const M dz = element_dz<kResidual>(act, k, xs[i], kResidual ? rs[i] : M(0), dys[i]);
    lane_dz[l] = lane_dz[l] + dz;
    lane_dzx[l] = lane_dzx[l] + dz * normalized(xs[i], k.mean, invstd);
  };
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) add(l, i + l);
  for (int l = 0; i + l < n; ++l) add(l, i + l);
  return block_sums(lane_tree(lane_dz), lane_tree(lane_dzx));
}

// Channels last: the backward's partial sums of channels [c0, c0 + width) over one block of n rows.
template <bool kResidual, typename T, typename M, ActKind kAct>
__attribute__((noinline)) void rows_block_grad_sums(const T* x, const T* res, const T* dy, int64_t C, int width, int n,
                                                    const ChannelAffine<M>* k, const M* invstd, Activation<M, kAct> act,
                                                    TileLanes<M>& dz, TileLanes<M>& dzx, GradSums* out,
                                                    int64_t out_stride) {
  M mean[kTile], scale[kTile], shift[kTile];
  for (int c = 0; c < width; ++c) mean[c] = k[c].mean, scale[c] = k[c].scale, shift[c] = k[c].shift;
  dz.clear(width);
  dzx.clear(width);
  for (int j = 0; j < n; ++j) {
    M* lane_dz = dz.v[j % kLanes];
    M* lane_dzx = dzx.v[j % kLanes];
    const int64_t row = j * C;
#pragma omp simd
    for (int c = 0; c < width; ++c) {
      const M xc = load_as<M>(x + row + c);
      const M e_dz = element_dz<kResidual>(act, ChannelAffine<M>{mean[c], scale[c], shift[c]}, xc,
                                           kResidual ? load_as<M>(res + row + c) : M(0), load_as<M>(dy + row + c));
      lane_dz[c] = lane_dz[c] + e_dz;
      lane_dzx[c] = lane_dzx[c] + e_dz * normalized(xc, mean[c], invstd[c]);
    }
  }
  dz.tree(width);
  dzx.tree(width);
  for (int c = 0; c < width; ++c) out[c * out_stride] = block_sums(dz.v[0][c], dzx.v[0][c]);
}

template <typename T> void backward_reduce(const BatchNormArgs& a, int nt) {
  using M = math_t<T>;
  const AffineArrays<M> k(a);
  const T* x = ptr<const T>(a.x);
  const T* res = ptr<const T>(a.residual);
  const T* dy = ptr<const T>(a.dy);
  const M* invstd = ptr<const M>(a.invstd);
  const auto out = [&](int64_t c, const GradSums& s) { store_grad_sums<M>(a, c, s); };
  dispatch_activation(a.activation, [&](auto kind) {
    const Activation<M, decltype(kind)::value> act{M(a.act_param)};
    const auto with_residual = [&](auto fn) {
      if (res) fn(std::true_type{});
      else fn(std::false_type{});
    };
    if (a.inner > 1) {
      reduce_channels<GradSums>(
          a, nt,
          [&](GradSums* partial, int64_t blocks) {
            fill_channel_chunks(a, nt, partial, blocks, [&](int64_t c, int64_t e0, int n) {
              M xb[kBlockElems], rb[kBlockElems], dyb[kBlockElems];
              const M* xs = block_values(a, x, c, e0, n, xb);
              const M* dys = block_values(a, dy, c, e0, n, dyb);
              GradSums sums;
              with_residual([&](auto residual) {
                constexpr bool kResidual = decltype(residual)::value;
                const M* rs = kResidual ? block_values(a, res, c, e0, n, rb) : nullptr;
                sums = block_grad_sums<kResidual>(xs, rs, dys, n, k[c], invstd[c], act);
              });
              return sums;
            });
          },
          out);
      return;
    }
    reduce_channels<GradSums>(
        a, nt,
        [&](GradSums* partial, int64_t blocks) {
          fill_row_blocks(a, nt, partial, blocks, [&](GradSums* p, int64_t c0, int width, int64_t r0, int n) {
            TileLanes<M> dz, dzx;
            ChannelAffine<M> tile[kTile];
            for (int c = 0; c < width; ++c) tile[c] = k[c0 + c];
            const int64_t off = r0 * a.channels + c0;
            with_residual([&](auto residual) {
              constexpr bool kResidual = decltype(residual)::value;
              rows_block_grad_sums<kResidual>(x + off, kResidual ? res + off : nullptr, dy + off, a.channels, width, n,
                                              tile, invstd + c0, act, dz, dzx, p, blocks);
            });
          });
        },
        out);
  });
}

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
      const M z = pre_activation<kResidual>(ChannelAffine<M>{mean[c], scale[c], shift[c]}, load_as<M>(x + off + i),
                                            kResidual ? load_as<M>(res + off + i) : M(0));
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

// Writes dx, and with a residual its grad dz too (the caller always provides both buffers).
template <typename T, bool kResidual, ActKind kAct, int64_t kStride, typename M>
__attribute__((noinline)) void apply_runs(const T* x, const T* res, const T* dy, T* dx, T* dres, int64_t runs,
                                          int64_t width, RunChannels<kStride> ch, AffineArrays<M> const* k,
                                          GradArrays<M> const* g, Activation<M, kAct> act) {
  const M *mean = k->mean.data(), *scale = k->scale.data(), *shift = k->shift.data();
  const M *g_mean = g->mean.data(), *invstd = g->invstd.data(), *dz_scale = g->dz_scale.data();
  const M *mean_dz = g->mean_dz.data(), *mean_dz_xhat = g->mean_dz_xhat.data();
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t off = r * width, c0 = ch.base(r);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const int64_t c = c0 + i * kStride, e = off + i;
      const M xe = load_as<M>(x + e);
      const M dz = element_dz<kResidual>(act, ChannelAffine<M>{mean[c], scale[c], shift[c]}, xe,
                                         kResidual ? load_as<M>(res + e) : M(0), load_as<M>(dy + e));
      if constexpr (kResidual) store_from(dres + e, dz);
      const ChannelGrad<M> cg{g_mean[c], invstd[c], dz_scale[c], mean_dz[c], mean_dz_xhat[c]};
      store_from(dx + e, input_grad(cg, xe, dz));
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
