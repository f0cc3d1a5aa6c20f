#pragma once
// The per-element dropout math that the CPU loops and the CUDA kernels share (docs/design.md principle 2).
#include <cstdint>

#include "common/macros.h"

namespace danlu {

// Element i is kept with probability threshold / 2^32.
DANLU_HD bool is_kept(uint32_t philox_word, uint32_t threshold) { return philox_word < threshold; }

// Kept: v / divisor, one rounding (exactly x / (1 - p) for dropout). Dropped: v * 0, as torch does, so an
// inf or NaN in a dropped element still shows up as NaN instead of being hidden. Both are computed and one
// selected: a branch on the random `kept` would split every warp (nvcc branches around the division).
template <typename M> DANLU_HD M drop(M v, bool kept, M divisor) {
  const M scaled = v / divisor, zeroed = v * M(0);
  return kept ? scaled : zeroed;
}

}  // namespace danlu
