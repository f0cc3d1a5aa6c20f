"""Dropout over danlu's native kernels (csrc/dropout): masks drawn from Philox4x32-10 keyed by
(seed, offset, element index), so one seed gives one mask on the CPU and on every GPU, and the backward
reads a 1-bit mask (numel / 8 bytes) instead of a byte or a float per element.

Elements are indexed in memory order: a dense tensor (contiguous, channels_last, transposed) is read in
place; any other is processed as a contiguous copy (and, for inplace, copied back)."""

from __future__ import annotations

import numbers
import warnings

import torch

from danlu import _C
from danlu._native import (
    DTYPE_CODES,
    check_cuda_built,
    check_dtype,
    has_strides,
    is_dense,
)

# ---------------------------------------------------------------------------------------------
# Argument checks: torch's exceptions (or clear ones that name the argument), all made before a Philox key is
# drawn or anything is written, so a call that raises leaves its tensors and the generator as they were.


def probability(p, who="dropout") -> float:
    """p as torch's dropout functions take it: a real number, or a 0-d tensor that does not require grad (read
    with .item(), on any device); it must lie in [0, 1]. A 0-d tensor, like a number, is one Python value for
    the whole call."""
    if isinstance(p, torch.Tensor):
        if p.numel() != 1:  # (torch: "Boolean value of Tensor with more than one value is ambiguous")
            raise RuntimeError(f"{who}: p must be a number or a 0-d tensor, got a tensor of shape {tuple(p.shape)}")
        if p.dim() != 0 or p.requires_grad or p.is_complex():
            raise TypeError(f"{who}: p must be a float or a 0-d real tensor that does not require grad (as in torch), "
                            f"got a tensor of shape {tuple(p.shape)}, dtype {p.dtype}, requires_grad={p.requires_grad}")
        p = p.item()
    elif isinstance(p, numbers.Real):
        p = float(p)
    elif not isinstance(p, (torch.SymFloat, torch.SymInt)):  # (torch.compile's symbolic numbers pass as they are)
        raise TypeError(f"{who}: p must be a float or a 0-d tensor, got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who} probability has to be between 0 and 1, but got {p}")
    return p


def check_arguments(x, training, generator, who):
    """The checks torch makes whatever the mode: x is a tensor, training a bool; and danlu's generator argument
    is a torch.Generator (any device: the Philox key is read back to the host) or None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: input must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(training, bool):
        raise TypeError(f"{who}: training must be a bool, got {type(training).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{who}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_droppable(x, who, **others):
    """x is a dense tensor of a dtype the kernels take, on a device danlu was built for; every other tensor is
    a dense tensor on x's device with x's dtype. Made only where a mask is drawn: in eval mode, with p = 0 or
    on no elements, dropout returns any tensor as it is, as torch does."""
    check_dtype(x, who)
    if x.layout != torch.strided:
        raise TypeError(f"{who}: input must be a dense (strided) tensor, got layout {x.layout}")
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{who}: {name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device} but the input is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{who}: {name} has dtype {t.dtype} but the input has {x.dtype}")
    check_cuda_built(x.device)


def check_inplace(x, who):
    """The checks torch makes before an in-place op writes into x."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{who}: inplace update to an inference tensor outside InferenceMode is not allowed "
                           "(as in torch); clone it first")
    if torch.is_grad_enabled() and x.requires_grad:
        base = x._base
        if base is not None and base.is_leaf and base.requires_grad:
            raise RuntimeError(f"{who}: a view of a leaf Variable that requires grad is being used in an in-place "
                               "operation.")
        if x.is_leaf:
            raise RuntimeError(f"{who}: a leaf Variable that requires grad is being used in an in-place operation.")
    if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
        raise RuntimeError(f"{who}: unsupported operation: more than one element of the written-to tensor refers "
                           "to a single memory location (an expanded tensor). Please clone() the tensor before "
                           "performing the operation.")


def seed_tensor(generator: torch.Generator | None) -> torch.Tensor:
    """A fresh 63-bit Philox key, as a 0-d int64 tensor, from `generator`, or from torch's default CPU generator
    whatever the tensor's device: after torch.manual_seed(s) the CPU and CUDA runs draw the same keys and
    masks. (Under torch.compile the key stays a tensor, so the graph does not specialise on its value.)"""
    if generator is None:  # (torch.compile traces randint on the default generator, not a generator object)
        return torch.randint(2**63 - 1, (), dtype=torch.int64)
    return torch.randint(2**63 - 1, (), dtype=torch.int64, generator=generator, device=generator.device)


def draw_seed(generator: torch.Generator | None) -> int:
    """seed_tensor's key as an int. A CUDA generator works too, at the price of a device-to-host copy."""
    return int(seed_tensor(generator))


def keep_threshold(keep_prob: float) -> int:
    """Elements whose Philox word is below this are kept: P(keep) = threshold / 2^32."""
    return min(round(keep_prob * 2.0**32), 2**32 - 1)


def _native_args(x, keep_prob, divisor, seed, offset=0):
    a = _C.DropoutArgs()
    a.dtype, a.numel = DTYPE_CODES[x.dtype], x.numel()
    a.seed, a.offset = seed, offset
    a.threshold, a.divisor = keep_threshold(keep_prob), divisor
    return a


def _run(op, device, args):
    if device.type == "cpu":
        getattr(_C, f"dropout_{op}_cpu")(args, torch.get_num_threads())
    else:
        getattr(_C, f"dropout_{op}_cuda")(args, device.index, torch.cuda.current_stream(device).cuda_stream)


def mask_words(numel: int) -> int:
    return (numel + _C.DROPOUT_MASK_BITS - 1) // _C.DROPOUT_MASK_BITS


def draw(x, keep_prob, divisor, seed, offset=0, *, out=None, residual=None, bias=None, mask=None):
    """out = residual + drop(x + bias) in x's memory order; fills `mask` (int32 words) when given.
    x, out and residual share one dense layout; bias has x.shape[-1] elements and x is contiguous."""
    out = torch.empty_like(x) if out is None else out
    a = _native_args(x, keep_prob, divisor, seed, offset)
    a.x, a.y = x.data_ptr(), out.data_ptr()
    if residual is not None:
        a.residual = residual.data_ptr()
    if bias is not None:
        a.bias, a.bias_size = bias.data_ptr(), bias.numel()
    if mask is not None:
        a.mask = mask.data_ptr()
    _run("forward", x.device, a)
    return out


def apply_mask(grad, mask, divisor):
    """drop(grad) with the kept elements read from `mask` and kept ones divided by divisor."""
    out = torch.empty_like(grad)
    a = _native_args(grad, divisor, divisor, 0)  # (the threshold is not used: the mask says what is kept)
    a.x, a.y, a.mask = grad.data_ptr(), out.data_ptr(), mask.data_ptr()
    _run("backward", grad.device, a)
    return out


def in_layout_of(t, strides):
    """t (same shape) in the dense layout of `strides`, copied only if its own strides differ."""
    if has_strides(t, strides):
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


# The native forward and backward that both paths call: DropoutFunction in eager mode, the custom ops of
# danlu/_ops.py under torch.compile.


def native_forward(x, residual, bias, keep_prob, divisor, seed, inplace=False, want_mask=True):
    """(y, mask): y = residual + drop(x + bias) in x's dense layout (a contiguous copy's for other x), and the
    1-bit mask (None unless want_mask). With inplace, y is x itself (written back if x is not dense). bias:
    x.shape[-1] values, x contiguous (dropout_add makes it so)."""
    dense = x if is_dense(x) else x.contiguous()
    if residual is not None:
        residual = in_layout_of(residual, dense.stride())
    mask = torch.empty(mask_words(x.numel()), dtype=torch.int32, device=x.device) if want_mask else None
    y = draw(dense, keep_prob, divisor, seed, out=dense if inplace else None, residual=residual, bias=bias,
             mask=mask)
    if inplace and y is not x:  # x was not dense: the kernel wrote a contiguous copy
        y = x.copy_(y)
    return y, mask


def input_grads(dy, mask, strides, divisor, needs, backward):
    """Grads of (x, residual, bias) of native_forward for the output grad dy. backward: apply_mask, or the
    custom op over it. The residual's grad is dy itself; the bias's, a column sum of x's."""
    need_x, need_residual, need_bias = needs
    dx = backward(in_layout_of(dy, strides), mask, divisor) if need_x or need_bias else None
    dbias = dx.reshape(-1, dx.shape[-1]).sum(0) if need_bias else None
    return dx if need_x else None, dy if need_residual else None, dbias


class DropoutFunction(torch.autograd.Function):
    """native_forward for eager autograd (including inplace). Saves only the 1-bit mask."""

    @staticmethod
    def forward(ctx, x, residual, bias, keep_prob, seed, inplace):
        y, mask = native_forward(x, residual, bias, keep_prob, keep_prob, seed, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(mask)
        ctx.divisor, ctx.strides = keep_prob, y.stride()
        return y

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        grads = input_grads(dy, mask, ctx.strides, ctx.divisor, ctx.needs_input_grad[:3], apply_mask)
        return *grads, None, None, None


def _dropout(x, residual, bias, keep_prob, generator, inplace=False):
    """residual + drop(x + bias) with autograd: DropoutFunction, or the custom op while torch.compile traces
    (which cannot trace into native calls; eager calls stay off the dispatcher, a few microseconds each)."""
    if not torch.compiler.is_compiling():
        if inplace:  # (traced, x.copy_ below makes torch's own checks)
            check_inplace(x, "danlu dropout")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, bias)):
            return DropoutFunction.apply(x, residual, bias, keep_prob, draw_seed(generator), inplace)
        # No backward will run: no autograd node and no mask.
        return native_forward(x, residual, bias, keep_prob, keep_prob, draw_seed(generator), inplace, False)[0]
    y = torch.ops.danlu.dropout(x, residual, bias, keep_prob, keep_prob, seed_tensor(generator))[0]
    return x.copy_(y) if inplace else y


def dropout(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout on counter-based masks: kept elements are exactly input / (1 - p).

    The mask of element i (in memory order) is Philox4x32-10 word i % 4 of counter (i / 4) under a 63-bit key
    drawn from `generator`, or from torch's default CPU generator whatever the input's device: the same seed gives
    the same mask on the CPU (every ISA and thread count) and on every GPU. The backward keeps a 1-bit mask.
    `p` may be a 0-d tensor; `generator` is danlu's addition to torch's signature."""
    p = probability(p)
    check_arguments(input, training, generator, "danlu dropout")
    if p == 0 or not training or input.numel() == 0:
        return input
    check_droppable(input, "danlu dropout")
    return _dropout(input, None, None, 1.0 - p, generator, inplace)


def _broadcasts_to(shape, target):
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def dropout_add(x, residual, p=0.5, training=True, bias=None, generator=None):
    """residual + dropout(x + bias, p) in one pass forward and one backward (torch: three ops each way): the
    pre-norm transformer block's "add the dropped-out sublayer output to the residual stream". residual has x's
    shape; bias broadcasts against x (a bias along the last dimension of a contiguous x is added in the kernel).
    Masks as danlu.functional.dropout's."""
    who = "danlu dropout_add"
    p = probability(p, who)
    check_arguments(x, training, generator, who)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{who}: residual must be a torch.Tensor, got {type(residual).__name__}")
    check_droppable(x, who, residual=residual, bias=bias)
    if residual.shape != x.shape:
        raise ValueError(f"{who}: residual has shape {tuple(residual.shape)}, expected the input's {tuple(x.shape)}")
    if bias is not None and not _broadcasts_to(bias.shape, x.shape):
        raise ValueError(f"{who}: bias of shape {tuple(bias.shape)} does not broadcast to the input's {tuple(x.shape)}")
    if p == 0 or not training or x.numel() == 0:
        return residual + (x if bias is None else x + bias)
    # The kernel adds bias[i % H] to element i of a contiguous x: a bias of H = x.shape[-1] values along the last
    # dimension (a (7, 1) bias on a (7, 7) input has 7 values too, one per row). Any other is added by torch first.
    per_column = bias is not None and x.dim() > 0 and bias.dim() > 0 and bias.shape[-1] == bias.numel() == x.shape[-1]
    if bias is not None and not (per_column and x.is_contiguous() and bias.numel() <= _C.DROPOUT_MAX_BIAS_SIZE):
        x, bias = x + bias, None
    if bias is not None:
        bias = bias.reshape(-1).contiguous()
    return _dropout(x, residual, bias, 1.0 - p, generator)


def scaled_bernoulli(shape, keep_prob, divisor, like, generator=None):
    """A tensor of `shape` in like's dtype and device: 1 / divisor with probability keep_prob, else 0.
    The small masks of channel and sample dropout, applied with one broadcasting multiply."""
    ones = torch.ones(shape, dtype=like.dtype, device=like.device)
    if torch.compiler.is_compiling():
        return torch.ops.danlu.dropout(ones, None, None, keep_prob, divisor, seed_tensor(generator))[0]
    return draw(ones, keep_prob, divisor, draw_seed(generator), out=ones)


def feature_dropout(input, p, training, inplace, generator=None, who="danlu feature dropout"):
    """Whole channels dropped: the mask has one value per (sample, channel), like torch's feature_dropout."""
    if p == 0 or not training or input.numel() == 0:
        return input
    check_droppable(input, who)
    if input.dim() < 2:
        raise RuntimeError(f"{who}: requires at least 2 dimensions in the input")
    if inplace and not torch.compiler.is_compiling():
        check_inplace(input, who)
    keep_prob = 1.0 - p
    divisor = keep_prob if keep_prob > 0 else 1.0  # p = 1 keeps nothing: nothing is divided
    mask = scaled_bernoulli(input.shape[:2] + (1,) * (input.dim() - 2), keep_prob, divisor, input, generator)
    return input.mul_(mask) if inplace else input * mask


def drop_path(x, p=0.0, training=False, scale_by_keep=True, generator=None):
    """Stochastic depth with timm's semantics: whole samples (the first dimension) dropped with probability p,
    kept ones scaled by 1 / (1 - p) when scale_by_keep; the identity outside training. One Philox draw per sample
    (danlu.functional.dropout's keying), applied with one broadcasting multiply."""
    who = "danlu drop_path"
    p = probability(p, "drop_path")
    check_arguments(x, training, generator, who)
    if p == 0 or not training or x.numel() == 0:
        return x
    check_droppable(x, who)
    if x.dim() == 0:
        raise RuntimeError(f"{who}: input must have a batch dimension to drop samples of, got a 0-d tensor")
    keep_prob = 1.0 - p
    divisor = keep_prob if scale_by_keep and keep_prob > 0 else 1.0
    return x * scaled_bernoulli((x.shape[0],) + (1,) * (x.dim() - 1), keep_prob, divisor, x, generator)



def _warn_channel_dims(name, dims, spatial):
    warnings.warn(f"{name}: received a {dims}-D input; {name} exists for inputs with {spatial} spatial "
                  f"dimension(s), a channel dimension and an optional batch dimension, as in torch "
                  f"(whose {name} deprecates other inputs). Use dropout for elementwise masks.", stacklevel=3)


def dropout1d(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout1d: whole channels of (N, C, L) or (C, L) inputs dropped."""
    p = probability(p)
    check_arguments(input, training, generator, "danlu dropout1d")
    if input.dim() not in (2, 3):
        raise RuntimeError(f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input "
                           "(channel-wise dropout of inputs with 1 spatial dimension and an optional batch "
                           "dimension)")
    return _feature_dropout_batched(input, input.dim() == 3, p, training, inplace, generator, "danlu dropout1d")


def dropout2d(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout2d, including its treatment of 3-D inputs as (N, C, L)."""
    p = probability(p)
    check_arguments(input, training, generator, "danlu dropout2d")
    if input.dim() not in (3, 4):
        _warn_channel_dims("dropout2d", input.dim(), 2)
    if input.dim() == 3:
        warnings.warn("dropout2d: received a 3-D input; as torch does, it is read as (N, C, L) and channel-wise "
                      "1D dropout is applied. Use dropout1d for that.", stacklevel=2)
    return _feature_dropout_batched(input, True, p, training, inplace, generator, "danlu dropout2d")


def dropout3d(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout3d: whole channels of (N, C, D, H, W) or (C, D, H, W) inputs dropped."""
    p = probability(p)
    check_arguments(input, training, generator, "danlu dropout3d")
    if input.dim() not in (4, 5):
        _warn_channel_dims("dropout3d", input.dim(), 3)
    return _feature_dropout_batched(input, input.dim() == 5, p, training, inplace, generator, "danlu dropout3d")


def _feature_dropout_batched(input, batched, p, training, inplace, generator, who):
    if batched or p == 0 or not training:  # (the identity cases return the input itself, not a view)
        return feature_dropout(input, p, training, inplace, generator, who)
    out = feature_dropout(input.unsqueeze(0), p, training, inplace, generator, who)
    return input if inplace else out.squeeze(0)
