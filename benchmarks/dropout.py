"""Dropout benchmarks: ``danlu.functional.dropout`` and ``dropout_add`` against torch on the same input.

Cases (p = 0.1, the common training value; contiguous inputs):

  Dropout       danlu.functional.dropout(x, p)                 torch.nn.functional.dropout(x, p)
  dropout_add   danlu.functional.dropout_add(x, r, p, bias=b)  r + F.dropout(x + b, p)   (b: one value per column)

Passes:

  train     one timed statement = forward (training mode) on x, then backward of a fixed random grad dy;
            grads are set to None before each call.
  forward   the training-mode forward alone, under torch.no_grad() (danlu still writes its mask).

Dropout has a third implementation, ``danlu-regenerate``: the same kernels, but the forward saves nothing
and the backward draws the mask again from the seed instead of reading the 1-bit mask. It is the
alternative the issue asks to measure; danlu.functional keeps the 1-bit mask (see README).

Bytes-moved model, per element, in units of the dtype's itemsize, plus the 1-bit mask (1/8 byte per
element each time it is written or read):

  Dropout forward        read x, write y                      2     + mask written
  Dropout train          forward + read dy, write dx          4     + mask written and read
  dropout_add forward    read x, r, write y                   3     + mask written
  dropout_add train      forward + read dy, write dx          5     + mask written and read
                         (the grad of r is dy itself; the bias grad is a column sum, ignored)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import danlu.functional
from benchmarks.harness import Case, Impl, Mode
from danlu import _dropout

FAMILY = "dropout"
P = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("train", "forward")
COLUMNS = 1024  # dropout_add: x is [numel / COLUMNS, COLUMNS], its bias has COLUMNS values

SIZES = {"full": [1 << 22, 1 << 24], "quick": [1 << 24], "smoke": [1 << 12]}


@dataclass(frozen=True)
class Variant:
    label: str
    residual: bool
    impls: tuple[str, ...]


VARIANTS = [Variant("Dropout", False, ("danlu", "danlu-regenerate", "torch")),
            Variant("dropout_add", True, ("danlu", "torch"))]


def bytes_moved(variant: Variant, training: bool, numel: int, itemsize: int) -> int:
    streams = 2 + variant.residual + (2 if training else 0)
    mask_bytes = numel // 8 * (2 if training else 1)
    return streams * numel * itemsize + mask_bytes


def cases(device: torch.device, mode: Mode) -> list[Case]:
    grid = []
    for variant in VARIANTS:
        for pass_ in PASSES:
            for dtype_name, dtype in DTYPES.items():
                if mode.name == "quick" and dtype_name != "fp32":
                    continue
                for numel in SIZES[mode.name]:
                    grid.append(_case(variant, pass_, dtype_name, dtype, numel, device))
    return grid


def _case(variant: Variant, pass_: str, dtype_name: str, dtype: torch.dtype, numel: int,
          device: torch.device) -> Case:
    training = pass_ == "train"
    name = f"{variant.label}-{pass_}/{numel}/{dtype_name}"
    return Case(family=FAMILY, name=name, dtype=dtype, numel=numel, n_tensors=1 + variant.residual,
                bytes_moved=bytes_moved(variant, training, numel, dtype.itemsize),
                # x, y (+ r), torch's mask, and dy, dx: what one implementation holds
                footprint_bytes=(3 + variant.residual + 2 * training) * numel * dtype.itemsize,
                impls=[Impl(impl, _builder(variant, training, impl, numel, device, dtype))
                       for impl in variant.impls])


class RegenerateDropout(torch.autograd.Function):
    """Dropout that saves nothing: the backward draws the mask again from the seed."""

    @staticmethod
    def forward(ctx, x, keep_prob, seed):
        ctx.keep_prob, ctx.seed = keep_prob, seed
        return _dropout.draw(x, keep_prob, keep_prob, seed)

    @staticmethod
    def backward(ctx, dy):
        return _dropout.draw(dy.contiguous(), ctx.keep_prob, ctx.keep_prob, ctx.seed), None, None


def _forward(variant: Variant, impl: str):
    if variant.residual:
        if impl == "danlu":
            return lambda x, r, b: danlu.functional.dropout_add(x, r, P, bias=b)
        return lambda x, r, b: r + F.dropout(x + b, P)
    if impl == "danlu":
        return lambda x, r, b: danlu.functional.dropout(x, P)
    if impl == "danlu-regenerate":
        return lambda x, r, b: RegenerateDropout.apply(x, 1 - P, _dropout.draw_seed(None))
    return lambda x, r, b: F.dropout(x, P)


def _builder(variant: Variant, training: bool, impl: str, numel: int, device, dtype):
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (numel // COLUMNS, COLUMNS) if variant.residual else (numel,)
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        residual = torch.randn(shape, generator=gen, device=device, dtype=dtype) if variant.residual else None
        bias = torch.randn(COLUMNS, generator=gen, device=device, dtype=dtype) if variant.residual else None
        forward = _forward(variant, impl)

        if not training:
            def infer():
                with torch.no_grad():
                    return forward(x, residual, bias)

            infer()
            return infer

        leaves = [t.requires_grad_() for t in (x, residual, bias) if t is not None]
        dy = torch.randn(shape, generator=gen, device=device, dtype=dtype)

        def train_step():
            for t in leaves:
                t.grad = None
            forward(x, residual, bias).backward(dy)

        train_step()
        return train_step

    return build
