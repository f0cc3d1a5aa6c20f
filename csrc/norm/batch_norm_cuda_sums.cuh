#pragma once
// What the two compile units of the backward's reduction share: batch_norm_cuda_backward_reduce.cu (the entry point
// and the NCHW kernels) and batch_norm_cuda_backward_reduce_rows.cu (the channels-last kernels), which compile in
// parallel.
#include "norm/batch_norm_cuda.cuh"

namespace danlu {
namespace bn_cuda {

// A lane loads its elements in groups, each group's loads issued before its math: 8 loads per tensor in flight per
// thread (x, dy and the residual: 32-48 B for 16-bit inputs, 64-96 B for float32), 1 for float64 (16-24 B), fewer
// registers than all kLaneSteps at once. The sums still take the elements in lane order.
template <typename M> constexpr int kGroup = sizeof(M) == 8 ? 1 : 8;

// The per-channel constants the sums need.
template <typename M> struct GradConstants {
  ChannelAffine<M> affine;
  M invstd;
  __device__ GradConstants(const BatchNormArgs& a, int64_t c)
      : affine(channel_affine(ptr<const M>(a.mean), ptr<const M>(a.invstd), ptr<const M>(a.weight),
                              ptr<const M>(a.bias), c)),
        invstd(ptr<const M>(a.invstd)[c]) {}
};

// Adds element k's dz and dz * xhat to a lane's sums, or +0 past the lane's elements.
template <bool kResidual, typename M, ActKind kAct>
__device__ void add_element(const Activation<M, kAct>& act, const GradConstants<M>& g, bool valid, M x, M residual,
                            M dy, M& dz_sum, M& dz_xhat_sum) {
  const M dz = element_dz<kResidual>(act, g.affine, x, residual, dy);
  dz_sum = dz_sum + (valid ? dz : M(0));
  dz_xhat_sum = dz_xhat_sum + (valid ? dz * normalized(x, g.affine.mean, g.invstd) : M(0));
}

// Calls fn(activation, residual) with both as compile-time constants, for the kernel instantiation a call needs.
template <class Fn> void dispatch_sums_kernel(const BatchNormArgs& a, Fn&& fn) {
  dispatch_activation(a.activation, [&](auto act) {
    if (a.residual) fn(act, std::true_type{});
    else fn(act, std::false_type{});
  });
}

// The first kernel of a channels-last reduction (batch_norm_cuda_backward_reduce_rows.cu).
template <typename T>
void launch_rows_sums(const BatchNormArgs& a, cudaStream_t s, const ReducePlan& plan, unsigned grid, GradSums* out);

}  // namespace bn_cuda
}  // namespace danlu
