#pragma once
#include <string>

namespace danlu {

// The CPU kernels exist once per ISA; cpu_isa() picks the best the processor supports, once.
enum class CpuIsa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

CpuIsa cpu_isa();
std::string cpu_isa_name(CpuIsa isa);
// For tests and benchmarks: force a variant; throws if the processor lacks it.
void set_cpu_isa(const std::string& name);

}  // namespace danlu
