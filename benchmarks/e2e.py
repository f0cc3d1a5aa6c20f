"""End-to-end training steps: the figure a user decides on.

One timed statement is one full training step of a model: ``zero_grad(set_to_none=True)``, forward,
cross-entropy loss, backward, ``optimizer.step()``, on fixed random inputs and labels. Implementations:

  danlu           the model written with danlu's modules (benchmarks/models.py) and danlu's optimizer
  torch-fused     the model with torch's modules and torch's fused optimizer (its fastest)
  torch-default   the same with torch's default optimizer (for-loop on the CPU, foreach on CUDA); full mode

Both models start from the same weights (same seed, same parameter order). Models (benchmarks/models.py):

  resnet18        ResNet-18 for 32x32 inputs (CIFAR variant, maps 32x32 down to 4x4), 11.2M params,
                  BatchNorm + ReLU after every conv, the residual add before a block's last ReLU
                  (danlu: BatchNormAct2d(x, residual) does BN, add and ReLU in one pass each way)
  transformer     pre-LayerNorm encoder blocks (dim 256, 4 heads, MLP 4x, GELU), dropout 0.1 on the
                  MLP hidden layer and before each residual add (danlu: Dropout and dropout_add)

After the timing each implementation's step is profiled (torch.profiler): the time of the modules whose
work danlu replaces (BatchNorm with its activation and residual add; dropout and dropout + add), forward
and backward, and of ``optimizer.step()``, as milliseconds per step and as a share of the step's op
time. On the torch model that share is what switching can gain at most; on the danlu model it is what
danlu's kernels take instead.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import danlu.optim
from benchmarks import models
from benchmarks.harness import Case, Impl, Mode

FAMILY = "e2e"
LABEL = "danlu-replaces:"  # record_function names around the modules danlu replaces
BACKWARD = "autograd::engine::evaluate_function: "


@dataclass(frozen=True)
class Model:
    label: str
    make: Callable[[bool], torch.nn.Module]  # danlu_modules -> model
    input_shape: tuple[int, ...]
    saved_per_input: int  # floats autograd holds per input value (measured peak, rounded up)
    classes: int = 10


@dataclass(frozen=True)
class Optimizer:
    label: str
    cls: str
    kwargs: dict


ADAMW = Optimizer("AdamW", "AdamW", {"lr": 1e-3, "weight_decay": 0.05})
SGD_NESTEROV = Optimizer("SGD-nesterov", "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4})


def model_grid(device: torch.device, mode: Mode) -> list[tuple[Model, Optimizer]]:
    """(model, optimizer) of every case. The CPU's quick run takes batch 8 and two transformer blocks of 4
    sequences (a ResNet-18 step at batch 64 takes seconds on 2 busy cores); the share of each op in the step
    hardly depends on the batch or the depth."""
    cuda = device.type == "cuda"
    if mode.name == "smoke":
        return [(Model("resnet18-w4/b2x8x8", lambda d: models.ResNet18(d, width=4), (2, 3, 8, 8), 600), ADAMW),
                (Model("transformer-d16x1/b2x8", lambda d: models.Transformer(d, dim=16, depth=1), (2, 8, 16), 30),
                 ADAMW)]
    quick = mode.name == "quick" and not cuda
    batch = 256 if cuda else 8 if quick else 64
    resnet = Model(f"resnet18/b{batch}x32x32", lambda d: models.ResNet18(d), (batch, 3, 32, 32), 600)
    depth, tokens = (2, 128) if quick else (4, 128) if not cuda else (4, 256)
    seqs = 4 if quick else 16 if not cuda else 64
    transformer = Model(f"transformer-d256x{depth}/b{seqs}x{tokens}",
                        lambda d: models.Transformer(d, dim=256, depth=depth), (seqs, tokens, 256), 30 * depth)
    grid = [(resnet, ADAMW), (transformer, ADAMW)]
    if mode.name == "full":
        grid.insert(1, (resnet, SGD_NESTEROV))
    return grid


def cases(device: torch.device, mode: Mode) -> list[Case]:
    impls = ["danlu", "torch-fused"] + (["torch-default"] if mode.name == "full" else [])
    steps = {"smoke": 1, "quick": 1, "full": 3}[mode.name]
    grid = []
    for model, opt in model_grid(device, mode):
        params = list(model.make(False).parameters())
        n_params = sum(p.numel() for p in params)
        grid.append(Case(family=FAMILY, name=f"{model.label}/{opt.label}", dtype=torch.float32, numel=n_params,
                         n_tensors=len(params), bytes_moved=None, footprint_bytes=_footprint(model, n_params),
                         impls=[Impl(impl, _builder(model, opt, impl, device, steps)) for impl in impls]))
    return grid


def _footprint(model: Model, n_params: int) -> int:
    # params, grads and two optimizer states, plus what autograd saves for the backward
    return 16 * n_params + 4 * model.saved_per_input * math.prod(model.input_shape)


def _builder(model: Model, opt: Optimizer, impl: str, device: torch.device, profile_steps: int):
    def build():
        danlu_modules = impl == "danlu"
        torch.manual_seed(0)  # the same weights for every implementation
        net = model.make(danlu_modules).to(device)
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(model.input_shape, generator=gen, device=device)
        y = torch.randint(0, model.classes, (model.input_shape[0],), generator=gen, device=device)
        if danlu_modules:
            optimizer = getattr(danlu.optim, opt.cls)(net.parameters(), **opt.kwargs)
        else:
            flags = {"fused": True} if impl == "torch-fused" else {}
            optimizer = getattr(torch.optim, opt.cls)(net.parameters(), **opt.kwargs, **flags)
        step = TrainingStep(net, optimizer, x, y, device, profile_steps)
        step()  # lazy state, allocator warm-up
        return step

    return build


class TrainingStep:
    """One training step as a statement to time, and its profile."""

    def __init__(self, model, optimizer, x, y, device: torch.device, profile_steps: int):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.device, self.profile_steps = device, profile_steps

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def profile(self) -> dict:
        """Milliseconds per step of the op time and of the work danlu replaces, by category, from
        ``profile_steps`` profiled steps."""
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with _labelled(self.model), profile(activities=activities) as prof:
            for _ in range(self.profile_steps):
                self()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        totals = replaced_time(prof.events(), self.device.type == "cuda")
        ms = {name: us / 1e3 / self.profile_steps for name, us in totals.items()}
        replaced = ms["batchnorm"] + ms["dropout"] + ms["optimizer"]
        return {"profile": {"steps": self.profile_steps, "clock": "device" if self.device.type == "cuda" else "cpu",
                            "op_ms": ms["total"], "batchnorm_ms": ms["batchnorm"], "dropout_ms": ms["dropout"],
                            "optimizer_ms": ms["optimizer"],
                            "replaced_share": replaced / ms["total"] if ms["total"] else None}}


@contextlib.contextmanager
def _labelled(model: torch.nn.Module):
    """Wraps every call of a module that danlu replaces in a record_function range named after its category,
    for the duration of the block (forward hooks: the models stay untouched while they are timed)."""
    handles, ranges = [], []
    for module in model.modules():
        for category, types in models.REPLACED.items():
            if isinstance(module, types):
                def enter(_module, _args, name=LABEL + category):
                    ranges.append(record_function(name))
                    ranges[-1].__enter__()

                def leave(_module, _args, _output):
                    ranges.pop().__exit__(None, None, None)

                handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
                break
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def replaced_time(events, device_clock: bool) -> dict[str, float]:
    """Microseconds of the profile's op time in total and in each category of replaced work.

    Forward: the outermost labelled ranges. Backward: the autograd nodes whose sequence number belongs to an
    op inside a labelled range (autograd gives a backward node the sequence number of the forward op that
    made it). Optimizer: the ``Optimizer.step#...`` ranges that torch.optim.Optimizer (and so danlu's
    optimizers) records. Total: every top-level event."""
    def clock(event):
        return event.device_time_total if device_clock else event.cpu_time_total

    def category(event):  # the category of the nearest labelled range around ``event`` (itself included)
        while event is not None:
            if event.name.startswith(LABEL):
                return event.name[len(LABEL):]
            event = event.cpu_parent
        return None

    totals = {"total": 0.0, "batchnorm": 0.0, "dropout": 0.0, "optimizer": 0.0}
    sequence_category = {}
    for event in events:
        if event.cpu_parent is None:
            totals["total"] += clock(event)
        label = category(event)
        if label is None:
            if event.name.startswith("Optimizer.step#") and not _inside(event, "Optimizer.step#"):
                totals["optimizer"] += clock(event)
            continue
        if event.name.startswith(LABEL) and category(event.cpu_parent) is None:
            totals[label] += clock(event)
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD):
            sequence_category.setdefault(event.sequence_nr, label)
    for event in events:
        if event.name.startswith(BACKWARD) and event.sequence_nr in sequence_category:
            totals[sequence_category[event.sequence_nr]] += clock(event)
    return totals


def _inside(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False
