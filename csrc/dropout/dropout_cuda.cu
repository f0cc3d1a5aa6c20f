// CUDA dropout. Every lane moves kVecs 16-byte vectors of each stream per tile of its warp: vector k
// of lane l holds the W = 16 / sizeof(T) elements from tile + (k * 32 + l) * W, so each of the kVecs
// loads is one coalesced 512-byte warp access, and all of them are issued before the Philox rounds, which
// hide their latency. The W kept bits of 32 / W neighbouring lanes make one mask word, gathered with
// shuffles. The Philox keying and the mask format are those of dropout.h and common/philox.h: the same
// bits as the CPU kernels.
//
// Bytes in flight per SM (kVecs * 16 = 64 bytes per lane and input stream, times the threads that
// __launch_bounds__ keeps resident; ptxas -v for sm_90 shows 55-96 registers, no stack, no spills):
//   forward_kernel<T, false>  x:              >= 768 threads, >= 48 KB (fp32: 1024 threads, 64 KB)
//   forward_kernel<T, true>   x and residual: >= 512 threads, >= 64 KB (fp32: 768 threads, 96 KB)
//   backward_kernel<T>        dy (+ mask):    >= 768 threads, >= 48 KB (all but fp64: 64 KB)
// against the ~32-64 KB an H100/H200 SM needs in flight to reach 90% of HBM bandwidth.
// The tile cut by the end of the tensor, and tensors whose pointers are not 16-byte aligned, go one
// vector at a time, element by element where needed. Every loop has a fixed trip count and a guard, so
// the vectors stay in registers (a `for (j < n)` or a `break` would put them in local memory).
#include <algorithm>
#include <cstdint>

#include "common/cuda_runtime.h"
#include "common/dtype.h"
#include "common/philox.h"
#include "common/vec16.h"
#include "dropout/dropout.h"
#include "dropout/dropout_math.h"

namespace danlu {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM that __launch_bounds__ asks for: registers per thread at most 65536 / (256 * blocks)
// (80 for 3 blocks). Two input streams fill the same bytes in flight with fewer threads.
constexpr int min_blocks(int input_streams) { return input_streams == 1 ? 3 : 2; }
constexpr int kWarp = 32;
constexpr int kVecs = 4;       // 16-byte vectors per lane and stream in one tile
constexpr int kGroup = 4;      // elements per Philox block

template <typename T> struct Tile {
  static constexpr int kWidth = Vec16<T>::kWidth;                      // elements per vector
  static constexpr int64_t kElems = int64_t(kVecs) * kWarp * kWidth;  // elements per warp tile
  static constexpr int kLanesPerWord = kDropoutMaskBits / kWidth;
};

// p[0, n) as one vector, with one 16-byte load when `vector` (p aligned, n = W). Elements stay in T until
// they are used: converted to the math type on load, 16-bit vectors would take twice the registers.
template <typename T> __device__ Vec16<T> load_vector(const T* p, int n, bool vector) {
  if (vector) return *reinterpret_cast<const Vec16<T>*>(p);
  Vec16<T> out{};
  DANLU_UNROLL
  for (int j = 0; j < Vec16<T>::kWidth; ++j)
    if (j < n) out.v[j] = p[j];
  return out;
}

template <typename T> __device__ void store_vector(T* p, const Vec16<T>& values, int n, bool vector) {
  if (vector) {
    *reinterpret_cast<Vec16<T>*>(p) = values;
    return;
  }
  DANLU_UNROLL
  for (int j = 0; j < Vec16<T>::kWidth; ++j)
    if (j < n) p[j] = values.v[j];
}

// Elements of the vector at `first` that exist: W, fewer at the end of the tensor, 0 past it.
template <typename T> __device__ int elements_at(int64_t first, int64_t numel) {
  const int64_t left = numel - first;
  return left <= 0 ? 0 : left < Tile<T>::kWidth ? int(left) : Tile<T>::kWidth;
}

// words[j] = the Philox word of element first + j, for the W elements of one vector (first a multiple of W).
// A vector of 8 spans two Philox blocks, one of 4 is one block, one of 2 is half a block.
template <int W> __device__ void philox_words(int64_t first, const DropoutArgs& a, uint32_t (&words)[W]) {
  if constexpr (W >= kGroup) {
    DANLU_UNROLL
    for (int g = 0; g < W / kGroup; ++g) {
      const Philox4 r = philox4x32_10(uint64_t(first / kGroup + g), a.offset, a.seed);
      DANLU_UNROLL
      for (int j = 0; j < kGroup; ++j) words[g * kGroup + j] = r.w[j];
    }
  } else {
    const Philox4 r = philox4x32_10(uint64_t(first / kGroup), a.offset, a.seed);
    const bool upper_half = first % kGroup != 0;
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) words[j] = upper_half ? r.w[kGroup - W + j] : r.w[j];
  }
}

// The vector's kept bits placed at its position in its mask word, ORed over the 32 / W lanes of the word;
// the first of those lanes writes it. Every lane of the warp must call this.
template <typename T> __device__ void store_mask_word(uint32_t* mask, int64_t first, int64_t numel, uint32_t bits) {
  constexpr int kLanes = Tile<T>::kLanesPerWord;
  const int lane = threadIdx.x % kWarp;
  uint32_t word = bits << (lane % kLanes * Tile<T>::kWidth);
  DANLU_UNROLL
  for (int width = 1; width < kLanes; width *= 2) word |= __shfl_xor_sync(0xffffffffu, word, width);
  if (lane % kLanes == 0 && first < numel) mask[first / kDropoutMaskBits] = word;
}

// Columns of the bias, bias[i % bias_size] for element i, followed from vector to vector and tile to tile
// by additions (a 64-bit % per element would cost more than the Philox rounds). 32 bits, as
// check_dropout_args keeps bias_size below 2^31: the sum of two columns does not wrap.
struct BiasColumns {
  uint32_t size, vector_step, tile_step;
  uint32_t vector;  // column of the first element of the lane's next vector

  // first: the lane's first element; its vectors are vector_elems apart within a tile (kVecs of them), and
  // its tiles tile_elems apart.
  __device__ BiasColumns(int64_t bias_size, int64_t first, int64_t vector_elems, int64_t tile_elems)
      : size(uint32_t(bias_size)), vector_step(uint32_t(vector_elems % bias_size)),
        tile_step(uint32_t((tile_elems - kVecs * vector_elems) % bias_size)), vector(uint32_t(first % bias_size)) {}
  __device__ uint32_t advance(uint32_t column, uint32_t step) const {
    return column + step >= size ? column + step - size : column + step;
  }
  __device__ void next_vector() { vector = advance(vector, vector_step); }
  __device__ void next_tile() { vector = advance(vector, tile_step); }
};

// The lane's first element in its warp's first tile, and the distance between a warp's tiles.
template <typename T> __device__ int64_t first_lane_element() {
  return (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp * Tile<T>::kElems +
         threadIdx.x % kWarp * Tile<T>::kWidth;
}
template <typename T> __device__ int64_t grid_stride() {
  return int64_t(gridDim.x) * (kThreads / kWarp) * Tile<T>::kElems;
}

// y = residual + drop(x + bias) and the mask, for the vectors of one lane.
template <typename T, bool kResidual> struct Forward {
  using M = math_t<T>;
  static constexpr int W = Tile<T>::kWidth;
  const DropoutArgs& a;
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* bias = reinterpret_cast<const T*>(a.bias);
  const T* residual = reinterpret_cast<const T*>(a.residual);
  T* y = reinterpret_cast<T*>(a.y);
  uint32_t* mask = reinterpret_cast<uint32_t*>(a.mask);
  M divisor = M(a.divisor);
  BiasColumns columns{a.bias ? a.bias_size : 1, first_lane_element<T>(), kWarp * W, grid_stride<T>()};

  // kCount vectors from `first`, 32 W elements apart: all loads issued, then the Philox words drawn and
  // the results stored. kChecked: a vector may be cut by the end of the tensor, or the pointers misaligned.
  template <int kCount, bool kChecked> __device__ void vectors(int64_t first, bool aligned) {
    Vec16<T> v[kCount], res[kCount];
    int n[kCount];
    DANLU_UNROLL
    for (int k = 0; k < kCount; ++k) {
      const int64_t at = first + int64_t(k) * kWarp * W;
      n[k] = kChecked ? elements_at<T>(at, a.numel) : W;
      v[k] = load_vector(x + at, n[k], !kChecked || (aligned && n[k] == W));
      if constexpr (kResidual) res[k] = load_vector(residual + at, n[k], !kChecked || (aligned && n[k] == W));
    }
    DANLU_UNROLL
    for (int k = 0; k < kCount; ++k) {
      const int64_t at = first + int64_t(k) * kWarp * W;
      M values[W];
      DANLU_UNROLL
      for (int j = 0; j < W; ++j) values[j] = load_as<M>(&v[k].v[j]);
      if (bias) add_bias(values, n[k]);
      columns.next_vector();
      uint32_t words[W];
      philox_words<W>(at, a, words);
      uint32_t kept_bits = 0;
      DANLU_UNROLL
      for (int j = 0; j < W; ++j) {
        if (j >= n[k]) continue;
        const bool kept = is_kept(words[j], a.threshold);
        kept_bits |= uint32_t(kept) << j;
        M value = drop(values[j], kept, divisor);
        if constexpr (kResidual) value = value + load_as<M>(&res[k].v[j]);
        store_from(&v[k].v[j], value);
      }
      store_vector(y + at, v[k], n[k], !kChecked || (aligned && n[k] == W));
      if (mask) store_mask_word<T>(mask, at, a.numel, kept_bits);
    }
  }

  // values[j] += bias[column of element j] for the n elements of the lane's next vector.
  __device__ void add_bias(M (&values)[W], int n) const {
    uint32_t column = columns.vector;
    DANLU_UNROLL
    for (int j = 0; j < W; ++j) {
      if (j >= n) continue;
      values[j] = values[j] + load_as<M>(bias + column);
      column = columns.advance(column, 1);
    }
  }
  __device__ void next_tile() { columns.next_tile(); }
};

// dx = drop(dy) with the kept elements read from the mask, for the vectors of one lane.
template <typename T> struct Backward {
  using M = math_t<T>;
  static constexpr int W = Tile<T>::kWidth;
  const DropoutArgs& a;
  const T* dy = reinterpret_cast<const T*>(a.x);
  T* dx = reinterpret_cast<T*>(a.y);
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(a.mask);
  M divisor = M(a.divisor);

  template <int kCount, bool kChecked> __device__ void vectors(int64_t first, bool aligned) {
    Vec16<T> v[kCount];
    uint32_t words[kCount];
    int n[kCount];
    DANLU_UNROLL
    for (int k = 0; k < kCount; ++k) {
      const int64_t at = first + int64_t(k) * kWarp * W;
      n[k] = kChecked ? elements_at<T>(at, a.numel) : W;
      v[k] = load_vector(dy + at, n[k], !kChecked || (aligned && n[k] == W));
      words[k] = n[k] > 0 ? mask[at / kDropoutMaskBits] : 0u;
    }
    DANLU_UNROLL
    for (int k = 0; k < kCount; ++k) {
      const int64_t at = first + int64_t(k) * kWarp * W;
      const uint32_t kept_bits = words[k] >> (at % kDropoutMaskBits);
      DANLU_UNROLL
      for (int j = 0; j < W; ++j)
        if (j < n[k]) store_from(&v[k].v[j], drop(load_as<M>(&v[k].v[j]), (kept_bits >> j) & 1u, divisor));
      store_vector(dx + at, v[k], n[k], !kChecked || (aligned && n[k] == W));
    }
  }
  __device__ void next_tile() {}
};

// Runs `pass` over every tile of the lane's warp: whole aligned tiles as kVecs vectors at once, the tile
// cut by the end of the tensor and misaligned tensors one checked vector at a time. The loop bound and the
// choice are the same for all 32 lanes of a warp, so every lane takes part in every mask shuffle.
template <typename T, class Pass> __device__ void run_tiles(Pass& pass, int64_t numel, bool aligned) {
  constexpr int W = Tile<T>::kWidth;
  const int64_t lane_offset = threadIdx.x % kWarp * W;
  for (int64_t first = first_lane_element<T>(); first - lane_offset < numel; first += grid_stride<T>()) {
    if (aligned && first - lane_offset + Tile<T>::kElems <= numel) {
      pass.template vectors<kVecs, false>(first, true);
    } else {
      DANLU_UNROLL
      for (int k = 0; k < kVecs; ++k) pass.template vectors<1, true>(first + int64_t(k) * kWarp * W, aligned);
    }
    pass.next_tile();
  }
}

template <typename T, bool kResidual>
__global__ void __launch_bounds__(kThreads, min_blocks(kResidual ? 2 : 1)) forward_kernel(DropoutArgs a) {
  // x, residual, y: [numel]; bias: [bias_size]; mask: [(numel + 31) / 32]
  Forward<T, kResidual> pass{a};
  run_tiles<T>(pass, a.numel, aligned16(pass.x, pass.y, pass.residual));
}

template <typename T> __global__ void __launch_bounds__(kThreads, min_blocks(1)) backward_kernel(DropoutArgs a) {
  // dy (a.x), dx (a.y): [numel]; mask: [(numel + 31) / 32]
  Backward<T> pass{a};
  run_tiles<T>(pass, a.numel, aligned16(pass.dy, pass.dx));
}

template <typename T> unsigned blocks_for(int64_t numel) {
  const int64_t per_block = Tile<T>::kElems * (kThreads / kWarp);
  return unsigned(std::clamp<int64_t>((numel + per_block - 1) / per_block, 1, 65535 * 8));
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
      if (a.residual) forward_kernel<T, true><<<blocks_for<T>(a.numel), kThreads, 0, s>>>(a);
      else forward_kernel<T, false><<<blocks_for<T>(a.numel), kThreads, 0, s>>>(a);
    });
  });
}

void dropout_backward_cuda(const DropoutArgs& a, int device, uintptr_t stream) {
  launch(a, true, device, stream, "launching the dropout backward kernel", [&](cudaStream_t s) {
    dispatch_dtype(a.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      backward_kernel<T><<<blocks_for<T>(a.numel), kThreads, 0, s>>>(a);
    });
  });
}

}  // namespace danlu
