#pragma once
#include <algorithm>
#include <cstdint>

namespace danlu {

// Threads worth waking for `elements` of streaming work: below ~32K elements a thread, starting a
// parallel region costs more than it saves (torch's grain size is the same).
inline int threads_for(int64_t elements, int requested) {
  constexpr int64_t kMinElemsPerThread = int64_t(1) << 15;
  return int(std::clamp<int64_t>(elements / kMinElemsPerThread, 1, std::max(requested, 1)));
}

}  // namespace danlu
