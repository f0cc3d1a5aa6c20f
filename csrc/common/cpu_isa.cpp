#include "common/cpu_isa.h"

#include "common/check.h"

namespace danlu {
namespace {

CpuIsa best_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return CpuIsa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Generic;
}

CpuIsa& selected() {
  static CpuIsa isa = best_supported();
  return isa;
}

}  // namespace

CpuIsa cpu_isa() { return selected(); }

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Generic: break;
  }
  return "generic";
}

void set_cpu_isa(const std::string& name) {
  const CpuIsa best = best_supported();
  for (CpuIsa isa : {CpuIsa::Generic, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (cpu_isa_name(isa) != name) continue;
    DANLU_CHECK(int(isa) <= int(best),
                "this processor does not support the '" << name << "' kernels (best: '" << cpu_isa_name(best) << "')");
    selected() = isa;
    return;
  }
  DANLU_CHECK(false, "unknown CPU ISA '" << name << "' (expected generic, avx2 or avx512)");
}

}  // namespace danlu
