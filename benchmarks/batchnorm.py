"""BatchNorm benchmarks: ``danlu.nn.BatchNorm2d`` and ``BatchNormAct2d`` against torch's BatchNorm2d
(followed by torch's own add and relu where the case has them) on the same input.

Each case is one variant, one pass, one input shape, layout and dtype. Variants:

  BN             danlu.nn.BatchNorm2d(C)                        torch.nn.BatchNorm2d(C)
  BN+ReLU        danlu.nn.BatchNormAct2d(C, activation="relu")  torch.relu(bn(x))
  BN+add+ReLU    the same module, forward(x, residual)          torch.relu(bn(x) + residual)

and, for BN+ReLU where timm is importable, ``timm``: timm.layers.BatchNormAct2d(C) (torch's batch_norm,
then its ReLU module, in place).

Passes:

  train   one timed statement = forward of the module (training mode) on x, then backward of a fixed
          random grad dy; x (and the residual) require grad, so the input grads are computed along with
          the weight and bias grads. Grads are set to None before each call, so none is accumulated.
  eval    module.eval() and torch.no_grad(): one forward with the running statistics.

The module is float32 in every case; a bfloat16 case feeds it a bfloat16 input (and residual and dy),
as autocast does, and gets a bfloat16 output. Inputs, dy, weight, bias and running statistics have the
same values for every implementation of a case.

Bytes-moved model: per element of x, the full-size tensors the minimal implementation reads plus
writes, in units of the input dtype's itemsize (per-channel statistics, weight and bias are ignored):

  train forward    read x (statistics); read x, write y                                    3
  train backward   read x, dy (reductions); read x, dy, write dx (elementwise)             5
                   => train forward + backward                                             8
  eval forward     read x, write y                                                         2
  residual         + read residual in the forward; train: + write its grad            +1 / +2

The ReLU adds nothing: it is applied to y as it is written, and its backward recomputes the
pre-activation from x and the statistics. The same model applies to every implementation of a case:
GB/s = model bytes / median time, and fraction = GB/s / the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import danlu.nn
from benchmarks import peers, shapes
from benchmarks.harness import Case, Impl, Mode

FAMILY = "batchnorm"


@dataclass(frozen=True)
class Variant:
    label: str  # as shown in the case name
    relu: bool = False
    residual: bool = False  # relu(bn(x) + residual); only with relu


VARIANTS = [Variant("BN"), Variant("BN+ReLU", relu=True), Variant("BN+add+ReLU", relu=True, residual=True)]
PASSES = ("train", "eval")
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("danlu", "torch", "timm")  # timm: BN+ReLU only

# Inputs of BatchNorm layers of ResNet-50 at batch 32: one per stage, and the 2048-channel output.
RESNET50_SHAPES: list[shapes.Shape] = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7),
                                       (32, 2048, 7, 7)]
QUICK_SHAPES: list[shapes.Shape] = [(16, 64, 56, 56), (32, 256, 14, 14)]
SMOKE_SHAPES: list[shapes.Shape] = [(4, 16, 7, 7)]


def streams_per_element(variant: Variant, training: bool) -> int:
    """Full-size tensors read plus written per element by the minimal implementation (the module's table)."""
    if training:
        return 8 + 2 * variant.residual
    return 2 + variant.residual


def tensors_per_element(variant: Variant, training: bool) -> int:
    """Full-size tensors one implementation holds: x, y (+ residual), and dy, dx (+ the residual's grad)."""
    return (2 + variant.residual) * (2 if training else 1)


def impls(variant: Variant) -> list[str]:
    return [impl for impl in IMPLS if impl != "timm" or (variant.relu and not variant.residual)]


def case_grid(mode: Mode) -> list[tuple[Variant, str, str, shapes.Shape, str]]:
    """(variant, pass, dtype name, shape, layout) of every case in ``mode``, in table order."""
    input_shapes = {"full": RESNET50_SHAPES, "quick": QUICK_SHAPES, "smoke": SMOKE_SHAPES}[mode.name]
    grid = []
    for variant in VARIANTS:
        for pass_ in PASSES:
            for dtype_name in DTYPES:
                if mode.name == "quick" and dtype_name != "fp32" and variant.label != "BN":
                    continue  # --quick: bfloat16 only for the plain BatchNorm
                grid += [(variant, pass_, dtype_name, shape, layout)
                         for shape in input_shapes for layout in LAYOUTS]
    return grid


def cases(device: torch.device, mode: Mode) -> list[Case]:
    return [batch_norm_case(*point, device) for point in case_grid(mode)]


def batch_norm_case(variant: Variant, pass_: str, dtype_name: str, shape: shapes.Shape, layout: str,
                    device: torch.device) -> Case:
    dtype, training = DTYPES[dtype_name], pass_ == "train"
    numel = math.prod(shape)
    name = f"{variant.label}-{pass_}/{'x'.join(map(str, shape))}/{layout}/{dtype_name}"
    return Case(family=FAMILY, name=name, dtype=dtype, numel=numel, n_tensors=1 + variant.residual,
                bytes_moved=streams_per_element(variant, training) * numel * dtype.itemsize,
                footprint_bytes=tensors_per_element(variant, training) * numel * dtype.itemsize,
                impls=[Impl(impl, _builder(variant, training, impl, shape, LAYOUTS[layout], device, dtype))
                       for impl in impls(variant)])


def _builder(variant: Variant, training: bool, impl: str, shape, memory_format, device, dtype):
    def build():
        channels = shape[1]
        if impl == "danlu":
            norm = (danlu.nn.BatchNormAct2d(channels, activation="relu", device=device) if variant.relu
                    else danlu.nn.BatchNorm2d(channels, device=device))
        elif impl == "timm":
            norm = peers.timm_batch_norm_act()(channels, device=device)
        else:
            norm = torch.nn.BatchNorm2d(channels, device=device)
        _set_state(norm, seed=2)
        forward = _forward(variant, impl, norm)
        x = _random(shape, device, dtype, memory_format, seed=0)
        residual = _random(shape, device, dtype, memory_format, seed=1) if variant.residual else None

        if not training:
            norm.eval()

            def infer():
                with torch.no_grad():
                    return forward(x, residual)

            infer()
            return infer

        inputs = [t for t in (x, residual) if t is not None]
        for t in inputs:
            t.requires_grad_(True)
        leaves = inputs + list(norm.parameters())
        dy = _random(shape, device, dtype, memory_format, seed=3)  # the layout of y

        def train_step():
            for t in leaves:  # fresh grads each call: nothing is accumulated into an old one
                t.grad = None
            forward(x, residual).backward(dy)

        train_step()  # allocator warm-up and lazy init, outside the timing
        return train_step

    return build


def _forward(variant: Variant, impl: str, norm):
    if impl in ("danlu", "timm"):  # BatchNormAct2d does the add and the relu in its own pass
        return (lambda x, r: norm(x, r)) if variant.residual else (lambda x, r: norm(x))
    if variant.residual:
        return lambda x, r: torch.relu(norm(x) + r)
    if variant.relu:
        return lambda x, r: torch.relu(norm(x))
    return lambda x, r: norm(x)


def _set_state(norm, seed):
    # Non-trivial weight, bias and running statistics, the same for every implementation of a case.
    gen = torch.Generator(device=norm.weight.device).manual_seed(seed)
    c, dev = norm.num_features, norm.weight.device
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c, generator=gen, device=dev) + 0.5)
        norm.bias.copy_(torch.randn(c, generator=gen, device=dev) * 0.1)
        norm.running_mean.copy_(torch.randn(c, generator=gen, device=dev) * 0.1)
        norm.running_var.copy_(torch.rand(c, generator=gen, device=dev) + 0.5)


def _random(shape, device, dtype, memory_format, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).contiguous(memory_format=memory_format)
