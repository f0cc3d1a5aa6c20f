"""BatchNorm over danlu's native kernels: batch_norm_act behind danlu.functional.batch_norm, BatchNorm*d and
BatchNormAct*d, and the native forward and backward that both its paths call: the autograd Function in eager
mode, the custom ops of danlu/_ops.py under torch.compile. The native side gets x viewed as
[rows, channels, inner]."""

from __future__ import annotations

import math

import torch

from danlu import _C
from danlu._native import DTYPE_CODES, check_cuda_built, check_dtype

# csrc/norm/batch_norm_math.h ActKind, with the default parameter of each.
ACTIVATIONS = {"identity": (0, 0.0), "relu": (1, 0.0), "leaky_relu": (2, 0.01), "elu": (3, 1.0),
               "silu": (4, 0.0), "sigmoid": (5, 0.0), "tanh": (6, 0.0)}


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


def _stat_dtype(x):
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


# The three native steps, on tensors as readable_inputs gives them. Eager calls use them directly; under
# torch.compile they run as the custom ops of danlu/_ops.py. Statistics (mean, invstd) are float32, float64
# for float64 x.


def native_stats(x):
    """(mean, M2): per channel, the mean of x and the sum of squared deviations from it."""
    rows, channels, inner, _ = layout_of(x)
    mean = x.new_empty(channels, dtype=_stat_dtype(x))
    m2 = torch.empty_like(mean)
    _Native(x, rows, channels, inner).run("stats", x=x, out_mean=mean, out_m2=m2)
    return mean, m2


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


def native_backward(dy, x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param, output_mask):
    """(dx, dresidual, dweight, dbias) of native_forward for the output grad dy, with None for those that
    output_mask (four bools) does not ask for. With batch_stats, dx includes the statistics' dependence on x.
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
        native.args.count = float(rows * inner)
        native.args.batch_stats = batch_stats
        native.run("backward_apply", x=x, residual=residual, dy=dy, dx=dx, dresidual=dres, mean=mean,
                   invstd=invstd, weight=w, bias=b, sum_dz=sum_dz if batch_stats else None,
                   sum_dz_xhat=sum_dz_xhat if batch_stats else None)
    return (dx if need_x else None, dres if need_res else None, _as(sum_dz_xhat, weight.dtype) if need_w else None,
            _as(sum_dz, bias.dtype) if need_b else None)


def save_for_backward(ctx, inputs):
    """Keeps what backward needs of native_forward's inputs: x, the residual that the caller holds anyway and
    per-channel tensors, never another full-size tensor."""
    x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param = inputs
    ctx.save_for_backward(x, residual, weight, bias, mean, invstd)
    ctx.settings = (batch_stats, activation, act_param)


def input_grads(ctx, dy, backward):
    """The grads of native_forward's nine inputs, from backward: native_backward, or the custom op over it,
    which gives empty tensors where native_backward gives None."""
    need_x, need_res, need_w, need_b = needs = ctx.needs_input_grad[:4]
    dx, dres, dw, db = backward(dy, *ctx.saved_tensors, *ctx.settings, needs)
    return (dx if need_x else None, dres if need_res else None, dw if need_w else None, db if need_b else None,
            None, None, None, None, None)


class BatchNormFunction(torch.autograd.Function):
    """native_forward and native_backward for eager autograd; the same inputs as native_forward. The
    statistics get no grad: with batch_stats the input grad already includes what flows through them."""

    @staticmethod
    def forward(ctx, *inputs):
        save_for_backward(ctx, inputs)
        return native_forward(*inputs)

    @staticmethod
    def backward(ctx, dy):
        return input_grads(ctx, dy, native_backward)


def readable_inputs(x, residual, who):
    """Checks the input and residual and returns them in a layout the native kernels read in place."""
    check_dtype(x, who)
    if residual is not None and (residual.shape != x.shape or residual.device != x.device
                                 or residual.dtype != x.dtype):
        raise ValueError(f"{who}: residual must match the input's shape, dtype and device; got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device} for input "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    check_cuda_built(x.device)
    if layout_of(x) is None:
        x = x.contiguous()
    if residual is not None and residual.stride() != x.stride():
        residual = residual.contiguous(memory_format=layout_of(x)[3])
    return x, residual


def batch_norm_act(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, activation="identity", act_param=None, residual=None):
    """act(batch_norm(x) + residual) with torch.nn.functional.batch_norm's semantics for the norm."""
    if x.dim() < 2:
        raise ValueError(f"danlu batch_norm: expected input with at least 2 dims (N, C, ...), got shape "
                         f"{tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"danlu batch_norm: unknown activation {activation!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"danlu batch_norm: {name} has shape {tuple(t.shape)}, expected ({channels},) for "
                             f"input with {channels} channels")
        if t.device != x.device:
            raise ValueError(f"danlu batch_norm: {name} is on {t.device} but the input is on {x.device}")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("danlu batch_norm: running_mean and running_var must be defined in evaluation mode "
                           "(training=False)")
    use_batch_stats = training
    if use_batch_stats:
        torch.nn.functional._verify_batch_size(x.size())
    x, residual = readable_inputs(x, residual, "danlu batch_norm")
    code, default_param = ACTIVATIONS[activation]
    if x.numel() == 0:  # nothing to normalise; torch's own semantics for the buffers and the output
        y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return _activate(y + residual if residual is not None else y, activation, act_param)
    # torch.compile cannot trace into native calls: it gets them as the custom ops of danlu/_ops.py. Eager
    # calls go around the dispatcher, which would add about 40 us to each forward on the CPU.
    compiling = torch.compiler.is_compiling()
    mean, invstd = _statistics(x, running_mean, running_var, use_batch_stats, 0.0 if momentum is None else momentum,
                               eps, compiling)
    inputs = (x, residual, weight, bias, mean, invstd, use_batch_stats, code,
              default_param if act_param is None else act_param)
    if compiling:
        return torch.ops.danlu.batch_norm_forward(*inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        return BatchNormFunction.apply(*inputs)
    return native_forward(*inputs)  # no graph to record: skips the Function's cost (~15 us a call)


def _statistics(x, running_mean, running_var, use_batch_stats, momentum, eps, compiling):
    """(mean, invstd) to normalise x with: the running ones, or this batch's, which the running ones take in."""
    stat = _stat_dtype(x)
    if not use_batch_stats:
        return _as(running_mean, stat), (_as(running_var, stat) + eps).rsqrt_()
    # Detached for the op: it has no autograd formula, since the backward of the normalisation includes what
    # flows through the statistics.
    mean, m2 = torch.ops.danlu.batch_norm_stats(x.detach()) if compiling else native_stats(x)
    count = x.numel() // x.shape[1]
    # lerp_ with a Python weight is one op; (1 - momentum) * r + momentum * s with Python scalars is four.
    if running_mean is not None:
        running_mean.lerp_(_as(mean, running_mean.dtype), momentum)
    if running_var is not None:  # one value per channel: 0 / 0 = NaN, torch's unbiased variance of it
        running_var.lerp_(_as(m2 / (count - 1), running_var.dtype), momentum)
    return mean, m2.div_(count).add_(eps).rsqrt_()  # in place: m2 is not needed any more


def _activate(y, activation, act_param):
    _, default_param = ACTIVATIONS[activation]
    param = default_param if act_param is None else act_param
    fns = {"identity": lambda t: t, "relu": torch.relu,
           "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, param),
           "elu": lambda t: torch.nn.functional.elu(t, param), "silu": torch.nn.functional.silu,
           "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    return fns[activation](y)
