"""danlu's BatchNorm and dropout as torch.library custom ops: what torch.compile sees of them (docs/design.md
principle 6).

batch_norm_act and the dropout functions call these only while torch.compile traces; eager calls go straight
to the autograd Functions, which run the same native functions without the dispatcher's cost. Dropout's
Philox key is a 0-d int64 tensor argument, so a compiled graph does not specialise on its value. The ops are
functional: the running statistics are updated by batch_norm_act with torch's own ops, which torch.compile
traces (torch.library takes no autograd formula for an op that mutates its inputs). The fake
implementations give outputs of the shapes, dtypes and memory formats the real ones give."""

from typing import Optional

import torch
from torch import Tensor

from danlu._batch_norm import (
    input_grads,
    layout_of,
    native_backward,
    native_forward,
    native_stats,
    save_for_backward,
    stat_dtype,
)
from danlu._dropout import apply_mask, mask_words
from danlu._dropout import input_grads as dropout_input_grads
from danlu._dropout import native_forward as dropout_native_forward
from danlu._native import is_dense, same_layout


def _checked_layout(op, x, residual=None):
    """layout_of(x), where the native kernels can read x and residual in place. batch_norm_act makes them so
    before it calls an op; a direct call with others gets this error instead of a misread."""
    layout = layout_of(x)
    if layout is None or (residual is not None and not same_layout(residual, x)):
        raise ValueError(f"danlu::{op}: x must be contiguous, channels_last or channels_last_3d and residual laid "
                         f"out as x; got x strides {x.stride()}, residual strides "
                         f"{None if residual is None else residual.stride()}")
    return layout


@torch.library.custom_op("danlu::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var) per channel; see native_stats. No autograd formula: call it on a detached x."""
    _checked_layout("batch_norm_stats", x)
    return native_stats(x, eps)


@batch_norm_stats.register_fake
def _stats_fake(x, eps):
    _checked_layout("batch_norm_stats", x)
    mean = x.new_empty(x.shape[1], dtype=stat_dtype(x))
    return mean, torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("danlu::batch_norm_forward", mutates_args=())
def batch_norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                       mean: Tensor, invstd: Tensor, batch_stats: bool, activation: int, act_param: float) -> Tensor:
    """y = act(batch_norm(x) + residual); see native_forward."""
    _checked_layout("batch_norm_forward", x, residual)
    return native_forward(x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param)


@batch_norm_forward.register_fake
def _forward_fake(x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param):
    return torch.empty_like(x, memory_format=_checked_layout("batch_norm_forward", x, residual)[3])


@torch.library.custom_op("danlu::batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                        bias: Optional[Tensor], mean: Tensor, invstd: Tensor, batch_stats: bool, activation: int,
                        act_param: float, output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias) of batch_norm_forward; see native_backward. An op returns no None: a
    grad that output_mask does not ask for comes back as an empty tensor."""
    _checked_layout("batch_norm_backward", x, residual)
    grads = native_backward(dy, x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param,
                            output_mask)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@batch_norm_backward.register_fake
def _backward_fake(dy, x, residual, weight, bias, mean, invstd, batch_stats, activation, act_param, output_mask):
    fmt = _checked_layout("batch_norm_backward", x, residual)[3]
    need_x, need_res, need_w, need_b = output_mask
    return (torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty(0),
            torch.empty_like(x, memory_format=fmt) if need_res and residual is not None else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            bias.new_empty(bias.shape) if need_b else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    save_for_backward(ctx, inputs)


def _backward(ctx, dy):
    return input_grads(ctx, dy, batch_norm_backward)


batch_norm_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("danlu::dropout", mutates_args=())
def dropout(x: Tensor, residual: Optional[Tensor], bias: Optional[Tensor], keep_prob: float, divisor: float,
            seed: Tensor) -> tuple[Tensor, Tensor]:
    """(residual + drop(x + bias), 1-bit mask); see danlu._dropout.native_forward."""
    return dropout_native_forward(x, residual, bias, keep_prob, divisor, int(seed))


@dropout.register_fake
def _dropout_fake(x, residual, bias, keep_prob, divisor, seed):
    y = torch.empty_like(x) if is_dense(x) else x.new_empty(x.shape)  # dense x keeps its strides
    return y, x.new_empty(mask_words(x.numel()), dtype=torch.int32)


@torch.library.custom_op("danlu::dropout_backward", mutates_args=())
def dropout_backward(dy: Tensor, mask: Tensor, divisor: float) -> Tensor:
    """dy dropped with the kept elements read from mask; dy in the forward output's layout."""
    return apply_mask(dy, mask, divisor)


@dropout_backward.register_fake
def _dropout_backward_fake(dy, mask, divisor):
    return torch.empty_like(dy)


def _dropout_setup_context(ctx, inputs, output):
    y, mask = output
    ctx.save_for_backward(mask)
    ctx.divisor, ctx.strides = inputs[4], y.stride()


def _dropout_grads(ctx, dy, dmask):
    (mask,) = ctx.saved_tensors
    grads = dropout_input_grads(dy, mask, ctx.strides, ctx.divisor, ctx.needs_input_grad[:3],
                                torch.ops.danlu.dropout_backward)
    return *grads, None, None, None


dropout.register_autograd(_dropout_grads, setup_context=_dropout_setup_context)
