// CUDA dropout. A thread owns one Philox block at a time: 4 consecutive elements, loaded and stored
// as one vector when the pointers allow. Warps walk tiles of 32 blocks (128 elements), so the 4-bit
// masks of 8 neighbouring lanes make one 32-bit mask word, gathered with shuffles.
#include <algorithm>

#include "common/cuda_runtime.h"
#include "common/dtype.h"
#include "common/philox.h"
#include "dropout/dropout.h"
#include "dropout/dropout_math.h"

namespace danlu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kGroup = 4;  // elements per Philox block

template <typename T> struct alignas(kGroup * sizeof(T)) Pack {
  T v[kGroup];
};

template <typename T> __device__ bool pack_aligned(uintptr_t p) { return p % sizeof(Pack<T>) == 0; }

// v[j] = p[first + j] for j < n, as one vector load when the whole pack is there and aligned.
template <typename T, typename M>
__device__ void load_group(const T* p, int64_t first, int n, bool aligned, M (&v)[kGroup]) {
  if (n == kGroup && aligned) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p + first);
    DANLU_UNROLL
    for (int j = 0; j < kGroup; ++j) v[j] = load_as<M>(&pack.v[j]);
    return;
  }
  for (int j = 0; j < n; ++j) v[j] = load_as<M>(p + first + j);
}

template <typename T, typename M>
__device__ void store_group(T* p, int64_t first, int n, bool aligned, const M (&v)[kGroup]) {
  if (n == kGroup && aligned) {
    Pack<T> pack;
    DANLU_UNROLL
    for (int j = 0; j < kGroup; ++j) store_from(&pack.v[j], v[j]);
    *reinterpret_cast<Pack<T>*>(p + first) = pack;
    return;
  }
  for (int j = 0; j < n; ++j) store_from(p + first + j, v[j]);
}

// Calls fn(group, first element, elements in the group, lane) for every Philox block, with all 32 lanes of
// a warp in every call (the mask shuffles need them): lanes past the end get n = 0.
template <class Fn> __device__ void for_each_group(int64_t numel, Fn&& fn) {
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarp);
  for (int64_t tile = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp; tile * kWarp < groups; tile += warps) {
    const int64_t group = tile * kWarp + lane, first = group * kGroup;
    const int n = first >= numel ? 0 : numel - first < kGroup ? int(numel - first) : kGroup;
    fn(group, first, n, lane);
  }
}

template <typename T, bool kResidual> __global__ void __launch_bounds__(kThreads) forward_kernel(DropoutArgs a) {
  using M = math_t<T>;
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* bias = reinterpret_cast<const T*>(a.bias);
  const T* residual = reinterpret_cast<const T*>(a.residual);
  T* y = reinterpret_cast<T*>(a.y);
  const bool aligned = pack_aligned<T>(a.x | a.y | a.residual);
  const M divisor = M(a.divisor);
  for_each_group(a.numel, [&](int64_t group, int64_t first, int n, int lane) {
    uint32_t kept_bits = 0;
    if (n > 0) {
      const Philox4 r = philox4x32_10(uint64_t(group), a.offset, a.seed);
      M v[kGroup], res[kGroup];
      load_group(x, first, n, aligned, v);
      if constexpr (kResidual) load_group(residual, first, n, aligned, res);
      int64_t column = bias ? first % a.bias_size : 0;
      DANLU_UNROLL
      for (int j = 0; j < kGroup; ++j) {
        if (j >= n) break;
        if (bias) {
          v[j] = v[j] + load_as<M>(bias + column);
          column = column + 1 == a.bias_size ? 0 : column + 1;
        }
        const bool kept = is_kept(r.w[j], a.threshold);
        kept_bits |= uint32_t(kept) << j;
        v[j] = drop(v[j], kept, divisor);
        if constexpr (kResidual) v[j] = v[j] + res[j];
      }
      store_group(y, first, n, aligned, v);
    }
    // Lanes 8k..8k+7 hold the 32 elements of one mask word.
    uint32_t word = kept_bits << (kGroup * (lane % 8));
    DANLU_UNROLL
    for (int width = 1; width < 8; width *= 2) word |= __shfl_xor_sync(0xffffffffu, word, width);
    if (a.mask && n > 0 && lane % 8 == 0) reinterpret_cast<uint32_t*>(a.mask)[first / 32] = word;
  });
}

template <typename T> __global__ void __launch_bounds__(kThreads) backward_kernel(DropoutArgs a) {
  using M = math_t<T>;
  const T* dy = reinterpret_cast<const T*>(a.x);
  T* dx = reinterpret_cast<T*>(a.y);
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(a.mask);
  const bool aligned = pack_aligned<T>(a.x | a.y);
  const M divisor = M(a.divisor);
  for_each_group(a.numel, [&](int64_t, int64_t first, int n, int) {
    if (n == 0) return;
    const uint32_t kept_bits = mask[first / 32] >> (first % 32);
    M v[kGroup];
    load_group(dy, first, n, aligned, v);
    DANLU_UNROLL
    for (int j = 0; j < kGroup; ++j) v[j] = drop(v[j], (kept_bits >> j) & 1u, divisor);
    store_group(dx, first, n, aligned, v);
  });
}

unsigned blocks_for(int64_t numel) {
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  return unsigned(std::clamp<int64_t>((groups + kThreads - 1) / kThreads, 1, 65535 * 8));
}

template <class Launch>
void launch(const DropoutArgs& a, bool backward, int device, uintptr_t stream, const char* what, Launch&& fn) {
  check_dropout_args(a, backward);
  if (a.numel == 0) return;
  DeviceGuard guard(device);
  fn(reinterpret_cast<cudaStream_t>(stream));
  cuda_check(cudaGetLastError(), what);
}

}  // namespace

void dropout_forward_cuda(const DropoutArgs& a, int device, uintptr_t stream) {
  launch(a, false, device, stream, "launching the dropout forward kernel", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (a.residual) forward_kernel<T, true><<<blocks_for(a.numel), kThreads, 0, s>>>(a);
      else forward_kernel<T, false><<<blocks_for(a.numel), kThreads, 0, s>>>(a);
    });
  });
}

void dropout_backward_cuda(const DropoutArgs& a, int device, uintptr_t stream) {
  launch(a, true, device, stream, "launching the dropout backward kernel", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      backward_kernel<T><<<blocks_for(a.numel), kThreads, 0, s>>>(a);
    });
  });
}

}  // namespace danlu
