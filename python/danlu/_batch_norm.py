"""BatchNorm over danlu's native kernels: the autograd Function behind danlu.functional.batch_norm,
BatchNorm*d and BatchNormAct*d. The native side gets x viewed as [rows, channels, inner]."""

from __future__ import annotations

import math

import torch

from danlu import _C
from danlu._native import DTYPE_CODES, check_cuda_built

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


def _ptr(t):
    return t.data_ptr() if t is not None else 0


class _Native:
    """Calls one native op on the CPU or on CUDA with the args filled from tensors."""

    def __init__(self, x, rows, channels, inner, activation, act_param):
        self.device = x.device
        a = self.args = _C.BatchNormArgs()
        a.dtype, a.rows, a.channels, a.inner = DTYPE_CODES[x.dtype], rows, channels, inner
        a.activation, a.act_param = activation, float(act_param)

    def run(self, op, **tensors):
        a = self.args
        for name, t in tensors.items():
            setattr(a, name, _ptr(t))
        if self.device.type == "cpu":
            getattr(_C, f"batch_norm_{op}_cpu")(a, torch.get_num_threads())
            return
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if op in ("stats", "backward_reduce"):
            workspace = torch.empty(_C.batch_norm_cuda_workspace_bytes(a), dtype=torch.uint8, device=self.device)
            getattr(_C, f"batch_norm_{op}_cuda")(a, self.device.index, stream, workspace.data_ptr())
        else:
            getattr(_C, f"batch_norm_{op}_cuda")(a, self.device.index, stream)


class BatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) + residual), one pass forward, one reduction and one elementwise pass back.

    Saves x (and the residual the caller holds anyway) and per-channel statistics; the backward
    recomputes the pre-activation from them instead of keeping another full-size tensor."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps,
                activation, act_param):
        rows, channels, inner, fmt = layout_of(x)
        stat = _stat_dtype(x)
        native = _Native(x, rows, channels, inner, activation, act_param)
        w = weight.to(stat) if weight is not None else None
        b = bias.to(stat) if bias is not None else None
        count = rows * inner
        if use_batch_stats:  # running stats given here are to be updated (training)
            mean = torch.empty(channels, dtype=stat, device=x.device)
            m2 = torch.empty_like(mean)
            native.run("stats", x=x, out_mean=mean, out_m2=m2)
            invstd = 1 / torch.sqrt(m2 / count + eps)
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
            if running_var is not None:
                unbiased = m2 / (count - 1) if count > 1 else torch.full_like(m2, math.nan)
                running_var.mul_(1 - momentum).add_((unbiased * momentum).to(running_var.dtype))
        else:
            mean = running_mean.to(stat)
            invstd = 1 / torch.sqrt(running_var.to(stat) + eps)
        y = torch.empty_like(x, memory_format=fmt)
        native.run("forward", x=x, residual=residual, y=y, mean=mean, invstd=invstd, weight=w, bias=b)
        ctx.save_for_backward(x, residual, w, b, mean, invstd)
        ctx.layout = (rows, channels, inner, fmt)
        ctx.settings = (activation, act_param, use_batch_stats, count)
        ctx.param_dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, residual, w, b, mean, invstd = ctx.saved_tensors
        rows, channels, inner, fmt = ctx.layout
        activation, act_param, use_batch_stats, count = ctx.settings
        dy = dy.contiguous(memory_format=fmt)
        native = _Native(x, rows, channels, inner, activation, act_param)
        stat = mean.dtype
        sum_dz = torch.empty(channels, dtype=stat, device=x.device)
        sum_dz_xhat = torch.empty_like(sum_dz)
        need_x, need_res, need_w, need_b = (ctx.needs_input_grad[i] for i in range(4))
        if need_w or need_b or (need_x and use_batch_stats):
            native.run("backward_reduce", x=x, residual=residual, dy=dy, mean=mean, invstd=invstd, weight=w,
                       bias=b, sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat)
        # The kernel writes dx, and dresidual whenever there is a residual: it recomputes z with it anyway.
        dx = dres = None
        if need_x or need_res:
            dx = torch.empty_like(x, memory_format=fmt)
            dres = torch.empty_like(x, memory_format=fmt) if residual is not None else None
            native.args.count = float(count)
            native.args.batch_stats = use_batch_stats
            native.run("backward_apply", x=x, residual=residual, dy=dy, dx=dx, dresidual=dres, mean=mean,
                       invstd=invstd, weight=w, bias=b, sum_dz=sum_dz if use_batch_stats else None,
                       sum_dz_xhat=sum_dz_xhat if use_batch_stats else None)
        w_dtype, b_dtype = ctx.param_dtypes
        dw = sum_dz_xhat.to(w_dtype) if need_w else None
        db = sum_dz.to(b_dtype) if need_b else None
        return dx if need_x else None, dres if need_res else None, dw, db, None, None, None, None, None, None, None


def readable_inputs(x, residual, who):
    """Checks the input and residual and returns them in a layout the native kernels read in place."""
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{who}: input dtype {x.dtype} is not supported (float32, float64, float16, bfloat16)")
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
    momentum = 0.0 if momentum is None else momentum
    return BatchNormFunction.apply(x, residual, weight, bias, running_mean, running_var, use_batch_stats,
                                   momentum, eps, code,
                                   default_param if act_param is None else act_param)


def _activate(y, activation, act_param):
    code, default_param = ACTIVATIONS[activation]
    param = default_param if act_param is None else act_param
    fns = {"identity": lambda t: t, "relu": torch.relu,
           "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, param),
           "elu": lambda t: torch.nn.functional.elu(t, param), "silu": torch.nn.functional.silu,
           "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    return fns[activation](y)
