#pragma once
// Marks the small inline functions that the CPU loops and the CUDA kernels share (docs/design.md principle 2).
#if defined(__CUDACC__)
#define DANLU_HD __host__ __device__ __forceinline__
#else
#define DANLU_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC__)
#define DANLU_UNROLL _Pragma("unroll")
#else
#define DANLU_UNROLL _Pragma("GCC unroll 8")
#endif
