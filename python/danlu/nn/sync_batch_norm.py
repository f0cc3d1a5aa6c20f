"""SyncBatchNorm: BatchNorm whose training statistics cover the batch of every rank of a process group.

Forward: each rank's native "stats" gives (count, mean, M2) per channel; one all_gather brings every
rank's triple to every rank, and each merges them itself in the same fixed order, so all ranks hold
bitwise identical statistics. Backward: each rank's native "backward_reduce" gives per-channel sums of
dz and dz * xhat; one all_reduce adds them up. Works on the CPU (gloo) and on CUDA (NCCL); no host
synchronisation in either direction."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from danlu._batch_norm import ACTIVATIONS, _Native, _stat_dtype, batch_norm_act, layout_of, readable_inputs


class SyncBatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) + residual) with statistics over the whole process group."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, momentum, eps, activation, act_param,
                group):
        rows, channels, inner, fmt = layout_of(x)
        stat = _stat_dtype(x)
        native = _Native(x, rows, channels, inner, activation, act_param)
        local = _local_moments(native, x, channels, rows * inner)
        count, mean, m2 = _merge_moments(_all_gather_rows(local, group), channels)
        _update_running_stats(running_mean, running_var, count, mean, m2, momentum)
        invstd = torch.rsqrt(m2 / count + eps).to(stat)
        mean = mean.to(stat)
        w = weight.to(stat) if weight is not None else None
        b = bias.to(stat) if bias is not None else None
        y = torch.empty_like(x, memory_format=fmt)
        if x.numel() > 0:
            native.run("forward", x=x, residual=residual, y=y, mean=mean, invstd=invstd, weight=w, bias=b)
        ctx.save_for_backward(x, residual, w, b, mean, invstd, count)
        ctx.layout = (rows, channels, inner, fmt)
        ctx.activation = (activation, act_param)
        ctx.group = group
        ctx.param_dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, residual, w, b, mean, invstd, count = ctx.saved_tensors
        rows, channels, inner, fmt = ctx.layout
        need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        dy = dy.contiguous(memory_format=fmt)
        native = _Native(x, rows, channels, inner, *ctx.activation)
        tensors = dict(x=x, residual=residual, dy=dy, mean=mean, invstd=invstd, weight=w, bias=b)
        # Zeros are this rank's sums when it holds no elements; it still joins the all_reduce.
        sum_dz = torch.zeros(channels, dtype=mean.dtype, device=x.device)
        sum_dz_xhat = torch.zeros_like(sum_dz)
        if x.numel() > 0 and (need_x or need_w or need_b):
            native.run("backward_reduce", sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat, **tensors)
        # As torch's SyncBatchNorm, only the input grad needs the group: weight and bias grads stay this
        # rank's own sums, which DDP then averages like any other parameter's.
        mean_dz, mean_dz_xhat = _group_means(sum_dz, sum_dz_xhat, count, ctx.group) if need_x else (None, None)
        # The kernel writes dx, and dresidual whenever there is a residual (see csrc/norm/batch_norm.h).
        dx = torch.empty_like(x, memory_format=fmt) if need_x or need_res else None
        dres = torch.empty_like(x, memory_format=fmt) if need_res or (need_x and residual is not None) else None
        if (need_x or need_res) and x.numel() > 0:
            native.args.count = 1.0  # the sums come already divided by the group's count
            native.args.batch_stats = True
            native.run("backward_apply", dx=dx, dresidual=dres, sum_dz=mean_dz, sum_dz_xhat=mean_dz_xhat, **tensors)
        w_dtype, b_dtype = ctx.param_dtypes
        dw = sum_dz_xhat.to(w_dtype) if need_w else None
        db = sum_dz.to(b_dtype) if need_b else None
        return dx if need_x else None, dres if need_res else None, dw, db, None, None, None, None, None, None, None


def _local_moments(native, x, channels, count):
    """[count, mean (C), M2 (C)] of this rank's x in float64: counts stay exact, the merge loses nothing."""
    packed = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=x.device)
    if x.numel() > 0:
        mean = torch.empty(channels, dtype=_stat_dtype(x), device=x.device)
        m2 = torch.empty_like(mean)
        native.run("stats", x=x, out_mean=mean, out_m2=m2)
        packed[0] = count
        packed[1:1 + channels] = mean
        packed[1 + channels:] = m2
    return packed


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


def _merge_moments(rows, channels):
    """(count [1], mean [C], M2 [C]) of all ranks together from their rows of [count, mean, M2].

    Chan et al.'s pairwise merge as a tree over rank order: log2(world) steps of elementwise ops, the
    same on every rank (so the same bits), and never a difference of two large sums of squares. Ranks
    with no elements have count 0 and drop out exactly."""
    count, mean, m2 = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
    while count.shape[0] > 1:
        if count.shape[0] % 2:
            count, mean, m2 = (torch.cat([t, torch.zeros_like(t[:1])]) for t in (count, mean, m2))
        total = count[0::2] + count[1::2]
        delta = mean[1::2] - mean[0::2]
        share = count[1::2] / total.clamp_min(1)
        mean = mean[0::2] + delta * share
        m2 = m2[0::2] + m2[1::2] + delta * delta * count[0::2] * share
        count = total
    return count[0], mean[0], m2[0]


def _update_running_stats(running_mean, running_var, count, mean, m2, momentum):
    seen = count > 0  # a group with no elements at all leaves them as they were, as torch's BatchNorm does
    if running_mean is not None:
        updated = running_mean * (1 - momentum) + (mean * momentum).to(running_mean.dtype)
        running_mean.copy_(torch.where(seen, updated, running_mean))
    if running_var is not None:
        unbiased = torch.where(count > 1, m2 / (count - 1), math.nan)
        updated = running_var * (1 - momentum) + (unbiased * momentum).to(running_var.dtype)
        running_var.copy_(torch.where(seen, updated, running_var))


def _group_means(sum_dz, sum_dz_xhat, count, group):
    """The group's means of dz and dz * xhat from this rank's sums: one all_reduce of both."""
    packed = torch.cat([sum_dz, sum_dz_xhat])
    dist.all_reduce(packed, dist.ReduceOp.SUM, group=group)
    means = (packed / count).to(sum_dz.dtype)
    return means[:sum_dz.numel()], means[sum_dz.numel():]


def sync_batch_norm_act(x, running_mean, running_var, weight, bias, momentum, eps, activation, act_param, residual,
                        group):
    """act(batch_norm(x) + residual) in training, with statistics over every rank of `group`."""
    x, residual = readable_inputs(x, residual, "danlu SyncBatchNorm")
    code, default_param = ACTIVATIONS[activation]
    return SyncBatchNormFunction.apply(x, residual, weight, bias, running_mean, running_var, momentum, eps, code,
                                       default_param if act_param is None else act_param, group)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
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

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def extra_repr(self):
        if self.activation == "identity":
            return super().extra_repr()
        param = f", act_param={self.act_param}" if self.act_param is not None else ""
        return f"{super().extra_repr()}, activation={self.activation}{param}"

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = self._average_factor()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        group = self._sync_group()
        if group is None:
            return batch_norm_act(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                                  self.eps, self.activation, self.act_param, residual)
        return sync_batch_norm_act(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                                   self.activation, self.act_param, residual, group)

    def _average_factor(self):
        """Counts this batch and returns the running-stats momentum, torch's cumulative average for None."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def _sync_group(self):
        """The process group to reduce statistics over, or None where torch's SyncBatchNorm does not sync."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

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
