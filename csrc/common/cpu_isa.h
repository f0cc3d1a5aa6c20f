#pragma once
#include <string>

namespace danlu {

// The CPU kernels exist once per ISA; cpu_isa() picks the best the processor supports, once.
enum class CpuIsa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

CpuIsa cpu_isa();
std::string cpu_isa_name(CpuIsa isa);
// For tests and benchmarks: force a variant; throws if the processor lacks it.
void set_cpu_isa(const std::string& name);

// Calls the variant of a kernel entry point compiled for the processor's ISA.
template <class Generic, class Avx2, class Avx512, class... Args>
void call_for_cpu_isa(Generic generic_fn, Avx2 avx2_fn, Avx512 avx512_fn, Args&&... args) {
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return avx512_fn(args...);
    case CpuIsa::Avx2: return avx2_fn(args...);
    case CpuIsa::Generic: return generic_fn(args...);
  }
}

}  // namespace danlu
