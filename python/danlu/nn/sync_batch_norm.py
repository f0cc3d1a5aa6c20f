"""SyncBatchNorm: BatchNorm whose training statistics cover the batch of every rank of a process group. It is
danlu's one BatchNorm pipeline (danlu/_batch_norm.py) with GroupStatistics as the hook that reduces statistics."""

from __future__ import annotations

import torch
import torch.distributed as dist

from danlu._batch_norm import ACTIVATIONS, LOCAL, Statistics, finalize_moments, native_moments
from danlu.nn.batch_norm import _DanluBatchNorm


class GroupStatistics(Statistics):
    """Training statistics over every rank of a process group, the hook of danlu's one BatchNorm pipeline.

    Forward: each rank's native moments (count, mean, M2 per channel, float64); one all_gather brings every
    rank's to every rank, and each merges them in the tree of csrc/norm/batch_norm_math.h, the one that merges
    the blocks of a rank's own reduction, so every rank holds the same bits (and a rank that holds the whole
    batch gets what BatchNorm gets on it). Backward: one all_reduce of the per-channel sums. Works on the CPU
    (gloo) and on CUDA (NCCL); no host synchronisation in either direction."""

    local = False

    def __init__(self, group):
        self.group = group

    def batch(self, x, eps, compiling):
        moments = native_moments(x)
        gathered = _all_gather_rows(moments.view(-1), self.group).view(-1, *moments.shape)
        mean, invstd, var = finalize_moments(x, gathered, eps)
        return mean, invstd, var, gathered[0, 0, 0]  # the group's count, as a float64 tensor on x's device

    def grad_sums(self, sum_dz, sum_dz_xhat):
        # As torch's SyncBatchNorm, only the input grad needs the group's sums: weight and bias grads stay this
        # rank's own, which DDP then averages like any other parameter's.
        packed = torch.cat([sum_dz, sum_dz_xhat])
        dist.all_reduce(packed, dist.ReduceOp.SUM, group=self.group)
        return packed[:sum_dz.numel()], packed[sum_dz.numel():]


def _all_gather_rows(packed, group):
    """[world, len(packed)]: row r is rank r's packed tensor."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "nccl":
        gathered = packed.new_empty(world, packed.numel())
        _all_gather_single()(gathered, packed, group=group)
        return gathered
    # The list form works with every backend and torch version (older gloo lacks the single-tensor one).
    rows = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(rows, packed, group=group)
    return torch.stack(rows)


def _all_gather_single():
    # torch 2.13 renamed all_gather_into_tensor; the old name still works there but warns.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SyncBatchNorm(_DanluBatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm's constructor, state_dict and decisions on danlu's kernels, on the CPU (gloo)
    as well as CUDA (NCCL). Outside training, without an initialised process group, or in a group of one it
    is danlu's BatchNorm. Like BatchNormAct*d it can apply an activation, with an optional residual added
    before it: ``forward(x, residual=None) = act(bn(x) + residual)``.

    It derives from torch's _BatchNorm, not from torch.nn.SyncBatchNorm: DistributedDataParallel refuses
    any torch.nn.SyncBatchNorm instance in a CPU module, and training on CPUs under DDP is what this class
    adds over torch's. So isinstance(m, torch.nn.SyncBatchNorm) is False (isinstance of _BatchNorm holds)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True, activation="identity",
                 negative_slope=0.01, alpha=1.0):
        # Older torch (danlu supports 2.4 on) has no bias argument: name it only when it changes something.
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.process_group = process_group
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.act_param = {"leaky_relu": negative_slope, "elu": alpha}.get(activation)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def extra_repr(self):
        if self.activation == "identity":
            return super().extra_repr()
        param = f", act_param={self.act_param}" if self.act_param is not None else ""
        return f"{super().extra_repr()}, activation={self.activation}{param}"

    def _statistics(self):
        """The group's statistics, where torch's SyncBatchNorm synchronises: in training, with an initialised
        process group of more than one rank; else this process's batch alone, as BatchNorm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return LOCAL
        group = self.process_group if self.process_group else dist.group.WORLD
        return GroupStatistics(group) if dist.get_world_size(group) > 1 else LOCAL

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every BatchNorm*d in `module` (torch's, danlu's, BatchNormAct*d with its activation) with a
        danlu SyncBatchNorm that shares its parameters and buffers, as torch's convert_sync_batchnorm does."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            has_bias = module.bias is not None or not module.affine  # not affine: no bias either way
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=has_bias,
                            activation=getattr(module, "activation", "identity"))
            converted.act_param = getattr(module, "act_param", None)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
