"""BatchNorm over danlu's native kernels: the one pipeline behind danlu.functional.batch_norm(_act), BatchNorm*d,
BatchNormAct*d and SyncBatchNorm.

check_args validates every argument before anything changes; run_batch_norm then takes the batch statistics
through a Statistics (this process's batch, or in SyncBatchNorm every rank of a process group), updates the
running statistics and normalises, with the autograd Function in eager mode or the custom ops of danlu/_ops.py
under torch.compile. The native side gets x viewed as [rows, channels, inner]."""

from __future__ import annotations

import math
import numbers

import torch

from danlu import _C
from danlu._native import DTYPE_CODES, check_cuda_built, check_dtype

# csrc/norm/batch_norm_math.h ActKind, with the default parameter of each.
ACTIVATIONS = {"identity": (0, 0.0), "relu": (1, 0.0), "leaky_relu": (2, 0.01), "elu": (3, 1.0),
               "silu": (4, 0.0), "sigmoid": (5, 0.0), "tanh": (6, 0.0)}

# The dtypes torch's CPU batch_norm accepts for weight, bias and running statistics, all one of them: the input's,
# or float32 next to a 16-bit input.
PARAM_DTYPES = {torch.float32: (torch.float32,), torch.float64: (torch.float64,),
                torch.float16: (torch.float16, torch.float32), torch.bfloat16: (torch.bfloat16, torch.float32)}


def layout_of(x: torch.Tensor):
    """(rows, channels, inner, memory_format) if the native kernels can read x as it is, else None."""
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    if x.is_contiguous():
        return n, c, spatial, torch.contiguous_format
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dims and x.is_contiguous(memory_format=fmt):
            return n * spatial, c, 1, fmt
    return None


def stat_dtype(x):
    """The dtype of the statistics and of the math: float32, float64 for a float64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(t, dtype):
    """t as a contiguous tensor of dtype: the native kernels read per-channel tensors as plain arrays, so a
    strided view (weight[::2]) must be copied. Skips the calls where they would return t anyway: each costs
    most of a microsecond."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


_CPU_OPS = {op: getattr(_C, f"batch_norm_{op}_cpu") for op in ("stats", "forward", "backward_reduce", "backward_apply")}


class _Native:
    """Calls one native op on the CPU or on CUDA with the args filled from tensors."""

    def __init__(self, x, rows, channels, inner, activation=0, act_param=0.0):
        self.device = x.device
        self.on_cpu = x.is_cpu
        a = self.args = _C.BatchNormArgs()
        a.dtype, a.rows, a.channels, a.inner = DTYPE_CODES[x.dtype], rows, channels, inner
        if activation:
            a.activation, a.act_param = activation, float(act_param)

    def run(self, op, **tensors):
        a = self.args
        for name, t in tensors.items():
            setattr(a, name, 0 if t is None else t.data_ptr())
        if self.on_cpu:
            _CPU_OPS[op](a, torch.get_num_threads())
            return
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if op in ("stats", "backward_reduce"):
            workspace = torch.empty(_C.batch_norm_cuda_workspace_bytes(a), dtype=torch.uint8, device=self.device)
            getattr(_C, f"batch_norm_{op}_cuda")(a, self.device.index, stream, workspace.data_ptr())
        else:
            getattr(_C, f"batch_norm_{op}_cuda")(a, self.device.index, stream)


# The native steps, on tensors as check_args gives them. Eager calls use them directly; under torch.compile
# they run as the custom ops of danlu/_ops.py. Statistics (mean, invstd) are in stat_dtype(x).


def native_stats(x, eps):
    """(mean, invstd, var) per channel: x's mean, 1 / sqrt(biased var + eps) and the unbiased var."""
    rows, channels, inner, _ = layout_of(x)
    mean = x.new_empty(channels, dtype=stat_dtype(x))
    invstd, var = torch.empty_like(mean), torch.empty_like(mean)
    native = _Native(x, rows, channels, inner)
    native.args.eps = eps
    native.run("stats", x=x, out_mean=mean, out_invstd=invstd, out_var=var)
    return mean, invstd, var


def native_moments(x):
    """[channels, 3] float64 on x's device: (count, mean, M2) of each channel of x, M2 the sum of squared
    deviations from the mean (a channel without elements: zeros). What a rank contributes to a group's statistics."""
    rows, channels, inner, _ = layout_of(x)
    moments = x.new_empty((channels, 3), dtype=torch.float64)
    _Native(x, rows, channels, inner).run("stats", x=x, moments=moments)
    return moments


def finalize_moments(x, moments, eps):
    """(mean, invstd, var) as native_stats gives them, from moments [ranks, channels, 3] (native_moments of every
    rank): merges them in the tree of csrc/norm/batch_norm_math.h, in place, so that moments[0] holds the
    merged moments afterwards (moments[0, 0, 0] the count)."""
    ranks, channels = moments.shape[0], x.shape[1]
    if (moments.dtype != torch.float64 or moments.shape[1:] != (channels, 3) or not moments.is_contiguous()
            or moments.device != x.device):
        raise ValueError(f"finalize_moments: expected contiguous float64 moments [ranks, {channels}, 3] on {x.device}, "
                         f"got {moments.dtype} {tuple(moments.shape)} on {moments.device}")
    mean = x.new_empty(channels, dtype=stat_dtype(x))
    invstd, var = torch.empty_like(mean), torch.empty_like(mean)
    a = _C.BatchNormArgs()
    a.dtype, a.channels, a.ranks, a.eps = DTYPE_CODES[x.dtype], channels, ranks, eps
    a.moments, a.out_mean, a.out_invstd, a.out_var = (t.data_ptr() for t in (moments, mean, invstd, var))
    if x.is_cpu:
        _C.batch_norm_finalize_cpu(a)
    else:
        _C.batch_norm_finalize_cuda(a, x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
    return mean, invstd, var


def native_forward(x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param):
    """y = act(batch_norm(x) + residual), in x's memory format. batch_stats (whether mean and invstd are
    this batch's) only matters to the backward."""
    rows, channels, inner, fmt = layout_of(x)
    y = torch.empty_like(x, memory_format=fmt)
    stat = mean.dtype
    _Native(x, rows, channels, inner, activation, act_param).run(
        "forward", x=x, residual=residual, y=y, mean=mean, invstd=invstd, weight=_as(weight, stat),
        bias=_as(bias, stat))
    return y


def native_backward(dy, x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param, output_mask,
                    statistics=None, count=None):
    """(dx, dresidual, dweight, dbias) of native_forward for the output grad dy, with None for those that
    output_mask (four bools) does not ask for. With batch_stats, dx includes the statistics' dependence on x:
    statistics (a Statistics; None: this process's batch) reduces the sums it needs over the batch that the
    statistics covered, of count elements per channel (a number, or a float64 tensor on x's device; None: x's).
    One reduction pass (skipped where no grad needs it) and one elementwise pass that recomputes the
    pre-activation from x and the statistics instead of reading a saved copy."""
    rows, channels, inner, fmt = layout_of(x)
    need_x, need_res, need_w, need_b = output_mask
    dy = dy.contiguous(memory_format=fmt)
    native = _Native(x, rows, channels, inner, activation, act_param)
    stat = mean.dtype
    w, b = _as(weight, stat), _as(bias, stat)
    sum_dz = x.new_empty(channels, dtype=stat)
    sum_dz_xhat = torch.empty_like(sum_dz)
    if need_w or need_b or (need_x and batch_stats):
        native.run("backward_reduce", x=x, residual=residual, dy=dy, mean=mean, invstd=invstd, weight=w,
                   bias=b, sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
    # The kernel writes dx, and dresidual whenever there is a residual: it recomputes z with it anyway.
    dx = dres = None
    if need_x or need_res:
        dx = torch.empty_like(x, memory_format=fmt)
        dres = torch.empty_like(x, memory_format=fmt) if residual is not None else None
        sums = (sum_dz, sum_dz_xhat) if batch_stats else (None, None)
        if batch_stats and need_x and statistics is not None:
            sums = statistics.grad_sums(sum_dz, sum_dz_xhat)
        if isinstance(count, torch.Tensor):
            native.args.count_ptr = count.data_ptr()
        else:
            native.args.count = float(rows * inner if count is None else count)
        native.args.batch_stats = batch_stats
        native.run("backward_apply", x=x, residual=residual, dy=dy, dx=dx, dresidual=dres, mean=mean,
                   invstd=invstd, weight=w, bias=b, sum_dz=sums[0], sum_dz_xhat=sums[1])
    return (dx if need_x else None, dres if need_res else None, _as(sum_dz_xhat, weight.dtype) if need_w else None,
            _as(sum_dz, bias.dtype) if need_b else None)


def save_for_backward(ctx, inputs):
    """Keeps what backward needs of native_forward's inputs: x, the residual that the caller holds anyway and
    per-channel tensors, never another full-size tensor."""
    x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param = inputs
    ctx.save_for_backward(x, residual, weight, bias, mean, invstd)
    ctx.settings = (batch_stats, activation, act_param)


def input_grads(ctx, dy, backward, *reduction):
    """The grads of native_forward's nine inputs, from backward: native_backward (with reduction: its statistics
    and count), or the custom op over it, which gives empty tensors where native_backward gives None."""
    need_x, need_res, need_w, need_b = needs = ctx.needs_input_grad[:4]
    dx, dres, dw, db = backward(dy, *ctx.saved_tensors, *ctx.settings, needs, *reduction)
    return (dx if need_x else None, dres if need_res else None, dw if need_w else None, db if need_b else None,
            None, None, None, None, None)


class BatchNormFunction(torch.autograd.Function):
    """native_forward and native_backward for eager autograd: native_forward's inputs, then the Statistics and
    the count that the batch statistics came from. The statistics get no grad: with batch_stats the input grad
    already includes what flows through them."""

    @staticmethod
    def forward(ctx, *inputs):
        *inputs, statistics, count = inputs
        save_for_backward(ctx, inputs)
        ctx.reduction = (statistics, count)
        return native_forward(*inputs)

    @staticmethod
    def backward(ctx, dy):
        return *input_grads(ctx, dy, native_backward, *ctx.reduction), None, None


# ---------------------------------------------------------------------------------------------
# The pipeline


class Statistics:
    """How the pipeline reduces batch statistics: over this process's batch. SyncBatchNorm's subclass reduces
    them over every rank of a process group; everything else is shared."""

    local = True  # statistics of this process's batch alone: torch's checks of its size apply

    def batch(self, x, eps, compiling):
        """(mean, invstd, var, count) of the batch: native_stats, and the elements per channel behind them (a
        number, or a float64 tensor on x's device)."""
        mean, invstd, var = torch.ops.danlu.batch_norm_stats(x.detach(), eps) if compiling else native_stats(x, eps)
        return mean, invstd, var, x.numel() // x.shape[1]

    def grad_sums(self, sum_dz, sum_dz_xhat):
        """The backward's per-channel sums over the batch the statistics covered, from this process's."""
        return sum_dz, sum_dz_xhat


LOCAL = Statistics()


def _float_argument(value, name, position):
    """value as torch's batch_norm takes a float argument (a real number or a 0-d real tensor), else its TypeError."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):  # under torch.compile
        return value
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0
                                           and not value.is_complex()):
        return float(value)
    raise TypeError(f"batch_norm(): argument '{name}' (position {position}) must be float, not {type(value).__name__}")


def check_args(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual,
               statistics=LOCAL, who="danlu batch_norm"):
    """Validates every argument of run_batch_norm as torch's batch_norm does (its exception types, and its
    messages where it has its own), before anything changes; returns (x, residual, momentum, eps) as run_batch_norm
    takes them, and in a layout the native kernels read in place."""
    if x.dim() < 2:
        raise ValueError(f"{who}: expected input with at least 2 dims (N, C, ...), got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}")
    if training and statistics.local:
        torch.nn.functional._verify_batch_size(x.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if type(momentum) is not float:
        momentum = _float_argument(momentum, "momentum", 7)
    if type(eps) is not float:
        eps = _float_argument(eps, "eps", 8)
    check_dtype(x, who)
    channels, allowed, first, device = x.shape[1], PARAM_DTYPES[x.dtype], None, x.device
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{who}: {name} has shape {tuple(t.shape)}, expected ({channels},) for input with "
                             f"{channels} channels")
        if t.device != device:
            raise ValueError(f"{who}: {name} is on {t.device} but the input is on {device}")
        if first is None:
            first = name, t.dtype
        if t.dtype != first[1] or t.dtype not in allowed:
            which = (f"{name} is {t.dtype}" if t.dtype == first[1]
                     else f"{first[0]} is {first[1]} but {name} is {t.dtype}")
            raise RuntimeError(f"{who}: mixed dtype: {which} for input {x.dtype}; weight, bias, running_mean and "
                               f"running_var must all be {' or all '.join(map(str, allowed))}")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(f"{who}: running_mean and running_var must be defined in evaluation mode "
                           "(training=False)")
    if residual is not None:
        if residual.shape != x.shape or residual.device != device or residual.dtype != x.dtype:
            raise ValueError(f"{who}: residual must match the input's shape, dtype and device; got "
                             f"{tuple(residual.shape)} {residual.dtype} on {residual.device} for input "
                             f"{tuple(x.shape)} {x.dtype} on {device}")
    if not x.is_cpu:
        check_cuda_built(device)
    if not x.is_contiguous() and layout_of(x) is None:
        x = x.contiguous()
    if residual is not None and residual.stride() != x.stride():
        residual = residual.contiguous(memory_format=layout_of(x)[3])
    return x, residual, momentum, eps


def run_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, act_param,
                   residual, statistics=LOCAL):
    """act(batch_norm(x) + residual) with torch.nn.functional.batch_norm's semantics for the norm, on arguments
    check_args has validated (and x, residual, momentum and eps as it returned them)."""
    code, default_param = ACTIVATIONS[activation]
    if x.numel() == 0 and statistics.local:  # nothing to normalise; torch's semantics for the buffers and output
        y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return _activate(y + residual if residual is not None else y, activation, act_param)
    # torch.compile cannot trace into native calls: it gets them as the custom ops of danlu/_ops.py. Eager
    # calls go around the dispatcher, which would add about 40 us to each forward on the CPU.
    compiling = torch.compiler.is_compiling() and statistics.local
    count = None
    if training:
        # Detached for the op: it has no autograd formula, since the backward of the normalisation includes
        # what flows through the statistics.
        mean, invstd, var, count = statistics.batch(x, eps, compiling)
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        stat = stat_dtype(x)
        mean, invstd = _as(running_mean, stat), (_as(running_var, stat) + eps).rsqrt_()
    param = default_param if act_param is None else act_param
    inputs = (x, residual, weight, bias, mean, invstd, training, code, param)
    if compiling:
        return torch.ops.danlu.batch_norm_forward(*inputs)
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                    or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return BatchNormFunction.apply(*inputs, statistics, count)
    return native_forward(*inputs)  # no graph to record: skips the Function's cost (~15 us a call)


def batch_norm_act(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, activation="identity", act_param=None, residual=None):
    """act(batch_norm(x) + residual) in one pass forward and one backward, with torch.nn.functional.batch_norm's
    semantics and errors for the norm. activation: "identity" (default), "relu", "leaky_relu" (act_param: the
    negative slope, default 0.01), "elu" (act_param: alpha, default 1.0), "silu", "sigmoid", "tanh". residual:
    None or a tensor of x's shape, dtype and device, added before the activation (ResNet's
    relu(bn(conv(x)) + shortcut)). The backward saves x and per-channel statistics only."""
    x, residual, momentum, eps = check_args(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                            activation, residual)
    return run_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                          act_param, residual)


def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """torch's update, running * (1 - momentum) + momentum * batch with the unbiased variance (not a lerp, which
    would turn an inf running mean that takes in another inf into NaN). A process group's count is a tensor; where
    it is 0 (no rank had an element) the running statistics stay as they are."""
    group = isinstance(count, torch.Tensor)
    for running, batch in ((running_mean, mean), (running_var, var)):
        if running is None:
            continue
        if group:
            updated = (running * (1 - momentum)).add_(_as(batch, running.dtype), alpha=momentum)
            running.copy_(torch.where(count > 0, updated, running))
        else:
            running.mul_(1 - momentum).add_(_as(batch, running.dtype), alpha=momentum)


def _activate(y, activation, act_param):
    _, default_param = ACTIVATIONS[activation]
    param = default_param if act_param is None else act_param
    fns = {"identity": lambda t: t, "relu": torch.relu,
           "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, param),
           "elu": lambda t: torch.nn.functional.elu(t, param), "silu": torch.nn.functional.silu,
           "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    return fns[activation](y)
