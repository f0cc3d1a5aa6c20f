#pragma once
// The tensor table of one fused call: every tensor of a (param group, device, dtype) bucket.
// Python builds it (python/danlu/optim/_table.py), on the host for the CPU and in device memory for CUDA,
// and writes into it the pointers it reads from the live tensors before every step that finds them moved
// (docs/design.md principles 3 and 8). The tensors are laid end to end in a virtual
// index space; each tensor's length there is padded to the vector width so that a vector-aligned
// virtual index is also vector-aligned inside its tensor.
#include <cstdint>

#include "common/macros.h"

namespace danlu {

// Rows of the table, an int64 array of shape [kNumRows, n] (exported to Python as danlu._C.table_rows).
enum TableRow : int {
  kParamRow = 0,
  kGradRow = 1,
  kStateRow = 2,  // kStateRow + 0..kMaxStates-1: optimizer state tensors, 0 where unused
  kStepRow = 5,   // float32 0-d step tensor, 0 for optimizers without one
  kNumelRow = 6,
  kOffsetRow = 7,  // start in the virtual index space
  kFlagsRow = 8,   // per-tensor flags, e.g. kFirstStep
  kNumRows = 9,
};
constexpr int kMaxStates = 3;
enum TensorFlag : int64_t { kFirstStep = 1 };
// CUDA: block b of a step owns virtual elements [b, b + 1) * kCudaElemsPerBlock (a multiple of every vector
// width), and starts at the tensor that Python's table names for it (exported as danlu._C.table_block_elems).
constexpr int64_t kCudaElemsPerBlock = 8192;

struct TensorTable {
  int64_t* rows;  // [kNumRows, n]; the step kernels clear kFirstStep flags once they have run
  int64_t n;            // number of tensors
  int64_t total;        // length of the virtual index space

  DANLU_HD int64_t at(int row, int64_t t) const { return rows[row * n + t]; }
  DANLU_HD int64_t& at(int row, int64_t t) { return rows[row * n + t]; }
  template <typename T> DANLU_HD T* ptr(int row, int64_t t) const {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(at(row, t)));
  }
  // The last tensor whose padded range starts at or before virtual index v (empty tensors are skipped).
  DANLU_HD int64_t find(int64_t v) const {
    int64_t lo = 0, hi = n;  // answer in [lo, hi)
    while (hi - lo > 1) {
      int64_t mid = (lo + hi) / 2;
      if (at(kOffsetRow, mid) <= v) lo = mid;
      else hi = mid;
    }
    return lo;
  }
  // Calls fn(t, lo, hi) for each tensor t that has elements [lo, hi) inside virtual range [begin, end).
  template <class Fn> DANLU_HD void for_each_segment(int64_t begin, int64_t end, Fn&& fn) const {
    for (int64_t t = find(begin); t < n && at(kOffsetRow, t) < end; ++t) {
      int64_t off = at(kOffsetRow, t);
      int64_t lo = (begin > off ? begin : off) - off;
      int64_t hi = end - off < at(kNumelRow, t) ? end - off : at(kNumelRow, t);
      if (lo < hi) fn(t, lo, hi);
    }
  }
};

}  // namespace danlu
