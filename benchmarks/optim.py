"""Optimizer step benchmarks: ``danlu.optim.X`` against every torch implementation of the same step.

Each timed statement is one ``optimizer.step()``; grads are random, nonzero, and set once before
timing, and one untimed step has already made the optimizer state. Implementations of a case:

  danlu           danlu.optim.X (one fused native call per param group, device and dtype)
  torch-forloop   torch.optim.X(foreach=False, fused=False): one small kernel per op per tensor
  torch-foreach   torch.optim.X(foreach=True): one multi-tensor kernel per op
  torch-fused     torch.optim.X(fused=True), where torch has it for X on this device
                  (torch 2.13: Adam, AdamW, SGD, Adagrad on CPU and CUDA; never RMSprop)
  deepspeed       DeepSpeedCPUAdam (Adam: adamw_mode=False; AdamW: adamw_mode=True) and DeepSpeedCPUAdagrad,
                  CPU only, when deepspeed is installed, with torch's default hyper-parameters; its optimizer
                  state in the param dtype (fp32_optimizer_states=False for 16-bit params), as danlu and
                  torch keep it, so every implementation moves the same bytes

Bytes-moved model: per element, the bytes the minimal fused implementation reads plus writes, in
units of the dtype's itemsize (the scalar step counter and hyper-parameters are ignored):

  Adam, AdamW      read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq   7
                   amsgrad: + read and write of max_exp_avg_sq                               +2
  SGD, momentum    read param, grad, momentum_buffer; write param, momentum_buffer           5
                   (Nesterov or not: the same tensors)
  SGD, plain       read param, grad; write param                                             3
  RMSprop          read param, grad, square_avg; write param, square_avg                     5
                   momentum: + momentum_buffer; centered: + grad_avg                  +2 each
  Adagrad          read param, grad, sum; write param, sum                                   5

Weight decay reads the param that is read anyway, so it adds nothing. The same model applies to every
implementation of a case, since it measures the work, not the implementation: GB/s = model bytes /
median time, and fraction = GB/s / the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch

import danlu.optim
from benchmarks import peers, shapes
from benchmarks.harness import Case, Impl, Mode, Unavailable

FAMILY = "optim"


@dataclass(frozen=True)
class Optimizer:
    label: str  # as shown in the case name
    cls: str  # the class name in torch.optim and danlu.optim
    kwargs: dict = field(default_factory=dict)  # the same for every implementation


OPTIMIZERS = [
    Optimizer("Adam", "Adam"),
    Optimizer("AdamW", "AdamW"),
    Optimizer("SGD-nesterov", "SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    Optimizer("RMSprop", "RMSprop"),
    Optimizer("Adagrad", "Adagrad"),
]
QUICK_OPTIMIZERS = ("Adam", "SGD-nesterov", "RMSprop")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# 16-bit params: every optimizer on the full run's first two sets, Adam alone with --quick and --smoke.
BF16_OPTIMIZERS = {"full": [o.label for o in OPTIMIZERS], "quick": ["Adam"], "smoke": ["Adam"]}

# Constructor flags of each implementation, on top of the optimizer's own kwargs.
IMPLS = {
    "danlu": (danlu.optim, {}),
    "torch-forloop": (torch.optim, {"foreach": False, "fused": False}),
    "torch-foreach": (torch.optim, {"foreach": True}),
    "torch-fused": (torch.optim, {"fused": True}),
    "deepspeed": (None, {}),  # where DeepSpeed has the optimizer (peers.DEEPSPEED_OPTIMIZERS)
}


def streams_per_element(opt: Optimizer) -> int:
    """Tensors read plus tensors written per element by the minimal fused step (the module's table)."""
    kw = opt.kwargs
    if opt.cls in ("Adam", "AdamW"):
        return 7 + 2 * bool(kw.get("amsgrad", False))
    if opt.cls == "SGD":
        return 5 if kw.get("momentum", 0) else 3
    if opt.cls == "RMSprop":
        return 5 + 2 * bool(kw.get("momentum", 0)) + 2 * bool(kw.get("centered", False))
    if opt.cls == "Adagrad":
        return 5
    raise ValueError(f"no bytes-moved model for {opt.cls}")


def tensors_per_element(opt: Optimizer) -> int:
    """Full-size tensors one implementation holds: param, grad and the state (its memory footprint)."""
    return (streams_per_element(opt) + 1) // 2


def param_sets(device: torch.device, mode: Mode) -> dict[str, list[shapes.Shape]]:
    """The parameter lists each optimizer steps over, by name."""
    if mode.name == "smoke":
        return {"23-tiny": [(64, 33), (1000,), (17,)] + shapes.odd_sizes(20, 1, 1024)}
    cuda = device.type == "cuda"
    sets = {}
    if mode.name == "quick" and not cuda:
        sets["3-tensors-16M"] = [(4000, 2000), (2000, 2000), (4000, 1000)]
    else:
        sets["1-tensor-100M" if cuda else "1-tensor-48M"] = [((100 if cuda else 48) * 10**6,)]
    if mode.name == "full":
        sets["resnet50"] = shapes.resnet50()
        sets["gpt2-small"] = shapes.gpt2_small()
    sets["800-small"] = shapes.odd_sizes(800, 1024, 65536)
    if cuda:  # launch-bound on a GPU: this is where per-tensor kernels lose
        sets["1000x64K"] = [(65536,)] * 1000
    return sets


def cases(device: torch.device, mode: Mode) -> list[Case]:
    optimizers = [o for o in OPTIMIZERS if mode.name != "quick" or o.label in QUICK_OPTIMIZERS]
    sets = param_sets(device, mode)
    grid = [(opt, name, "fp32") for opt in optimizers for name in sets]
    grid += [(opt, name, "bf16") for opt in OPTIMIZERS if opt.label in BF16_OPTIMIZERS[mode.name]
             for name in list(sets)[:2]]
    grid = [(opt, name, dtype) for opt, name, dtype in grid if _impls(opt, name, device, mode)[1:]]
    return [optimizer_case(opt, name, sets[name], device, DTYPES[dtype], _impls(opt, name, device, mode))
            for opt, name, dtype in grid]


def _impls(opt: Optimizer, set_name: str, device: torch.device, mode: Mode) -> list[str]:
    """The implementations timed on a case. --quick leaves out torch's per-tensor ones on the CPU's 800 small
    tensors: on 2 busy cores one such step can take seconds (each tensor opens parallel regions that stall
    whenever a thread is preempted), more than the budget of a case; an optimizer with nothing else to
    compare with (RMSprop) then has no case there."""
    names = [name for name in IMPLS if name != "deepspeed" or opt.cls in peers.DEEPSPEED_OPTIMIZERS]
    if mode.name == "quick" and device.type == "cpu" and set_name == "800-small":
        names = [name for name in names if name not in ("torch-forloop", "torch-foreach")]
        has_fused = "fused" in inspect.signature(getattr(torch.optim, opt.cls)).parameters
        names = [name for name in names if name != "torch-fused" or has_fused]
    return names


def optimizer_case(opt: Optimizer, set_name: str, param_shapes: list[shapes.Shape], device: torch.device,
                   dtype: torch.dtype, impls: Optional[list[str]] = None) -> Case:
    numel = shapes.numel(param_shapes)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    impls = [impl for impl in impls or IMPLS if impl != "deepspeed" or opt.cls in peers.DEEPSPEED_OPTIMIZERS]
    return Case(family=FAMILY, name=f"{opt.label}/{set_name}/{dtype_name}", dtype=dtype, numel=numel,
                n_tensors=len(param_shapes), bytes_moved=streams_per_element(opt) * numel * dtype.itemsize,
                footprint_bytes=tensors_per_element(opt) * numel * dtype.itemsize,
                impls=[Impl(impl, _builder(opt, impl, param_shapes, device, dtype)) for impl in impls])


def _builder(opt: Optimizer, impl: str, param_shapes, device, dtype):
    if impl == "deepspeed":
        return _deepspeed_builder(opt, param_shapes, device, dtype)
    module, flags = IMPLS[impl]
    cls = getattr(module, opt.cls)
    accepted = inspect.signature(cls).parameters
    if flags.get("fused") and "fused" not in accepted:
        def unavailable():
            raise Unavailable(f"torch.optim.{opt.cls} has no fused implementation")
        return unavailable
    flags = {k: v for k, v in flags.items() if k in accepted}  # torch's RMSprop takes no `fused`

    def build():
        try:
            return _stepper(lambda params: cls(params, **opt.kwargs, **flags), param_shapes, device, dtype)
        except (RuntimeError, TypeError, ValueError) as why:
            if flags.get("fused"):  # torch checks fused support per device and dtype
                raise Unavailable(f"torch.optim.{opt.cls}(fused=True): {why}") from why
            raise

    return build


def _deepspeed_builder(opt: Optimizer, param_shapes, device, dtype):
    def build():
        cls = peers.deepspeed_optimizer(opt.cls, device)
        defaults = {name: p.default for name, p in inspect.signature(getattr(torch.optim, opt.cls)).parameters.items()}
        kwargs = {**{k: defaults[k] for k in ("lr", "eps", "weight_decay")}, **opt.kwargs}
        if opt.cls in ("Adam", "AdamW"):
            kwargs.update(betas=defaults["betas"], adamw_mode=opt.cls == "AdamW")
        kwargs["fp32_optimizer_states"] = dtype == torch.float32  # state in the param dtype, as torch's
        return _stepper(lambda params: cls(params, **kwargs), param_shapes, device, dtype)

    return build


def _stepper(make, param_shapes, device, dtype):
    params = _random_tensors(param_shapes, device, dtype, seed=0)
    for p, g in zip(params, _random_tensors(param_shapes, device, dtype, seed=1)):
        p.requires_grad_(True)
        p.grad = g
    optimizer = make(params)
    optimizer.step()  # makes the state, outside the timing
    return optimizer.step


def _random_tensors(param_shapes, device, dtype, seed):
    # The same values for every implementation of a case, so none gets easier numbers.
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in param_shapes]
