"""The optimizer tests' helpers: twin params with identical values and layouts, runs of many steps with
identical fresh grads, and the error measures the tolerances are stated in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import danlu.optim
from danlu.optim._base import FusedOptimizer
from helpers.devices import DANLU_THREADS

OPTIMIZERS = {
    "Adam": (danlu.optim.Adam, torch.optim.Adam),
    "AdamW": (danlu.optim.AdamW, torch.optim.AdamW),
    "SGD": (danlu.optim.SGD, torch.optim.SGD),
    "RMSprop": (danlu.optim.RMSprop, torch.optim.RMSprop),
    "Adagrad": (danlu.optim.Adagrad, torch.optim.Adagrad),
}
# Optimizers for which torch has a fused implementation on each device (the GradScaler reference).
TORCH_FUSED = {"cpu": {"Adam", "AdamW", "SGD", "Adagrad"}, "cuda": {"Adam", "AdamW", "SGD"}}

# Every option of every optimizer alone, then combinations. lr is large enough that every step
# visibly moves every element.
CONFIGS = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.95))),
    ("Adam", dict(lr=1e-2, eps=1e-3)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("Adam", dict(lr=1e-2, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adam", dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.3, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, betas=(0.7, 0.9), eps=1e-4, weight_decay=0.1, maximize=True)),
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.5, weight_decay=0.1, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.95, nesterov=True, weight_decay=0.05, maximize=True)),
    ("RMSprop", dict(lr=1e-2)),
    ("RMSprop", dict(lr=1e-2, alpha=0.9)),
    ("RMSprop", dict(lr=1e-2, eps=1e-3)),
    ("RMSprop", dict(lr=1e-2, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-2, momentum=0.9)),
    ("RMSprop", dict(lr=1e-2, centered=True)),
    ("RMSprop", dict(lr=1e-2, maximize=True)),
    ("RMSprop", dict(lr=1e-2, alpha=0.95, momentum=0.5, centered=True, weight_decay=0.05, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05)),
    ("Adagrad", dict(lr=0.1, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5)),
    ("Adagrad", dict(lr=0.1, eps=1e-3)),
    ("Adagrad", dict(lr=0.1, maximize=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1, eps=1e-6,
                     maximize=True)),
]

# One representative config per optimizer, with the options that add state switched on.
RICH_CONFIGS = [
    ("Adam", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=0.05)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1)),
]


def config_id(name, kwargs, show_lr=False):
    parts = [name] + [f"{k}={v}" for k, v in kwargs.items() if show_lr or k != "lr"]
    return "-".join(parts).replace(" ", "")


def config_params(configs, show_lr=False):
    return [pytest.param(name, kwargs, id=config_id(name, kwargs, show_lr)) for name, kwargs in configs]


def make_optimizer(impl, name, params, **kwargs):
    """impl "danlu" or "torch"; torch's runs with foreach=False unless kwargs say otherwise."""
    danlu_cls, torch_cls = OPTIMIZERS[name]
    if impl == "danlu":
        return danlu_cls(params, **kwargs)
    kwargs = dict(kwargs)
    if not kwargs.get("fused"):
        kwargs.setdefault("foreach", False)
    return torch_cls(params, **kwargs)


# ---------------------------------------------------------------------------------------------
# Params, grads and their layouts


@dataclass(frozen=True)
class Spec:
    """One param: its shape and layout, and the layout of its grads."""

    shape: tuple
    channels_last: bool = False
    offset: int = 0  # storage offset in elements: 1 or 3 make the data pointer not 16-byte aligned
    grad: str = "same"  # "same" layout as the param, or "transposed": same shape, different strides
    grad_offset: int = 0


# Sizes 0, 1, primes, not a multiple of any vector width, and one larger than one thread's share of a
# parallel step (the CPU kernel splits above 2 * 32768 elements), plus multi-dim and channels_last.
ODD_SPECS = [
    Spec((0,)), Spec((1,)), Spec((7,)), Spec((31,)), Spec((1021,)), Spec((3, 5)), Spec((13, 9)),
    Spec((2, 3, 5)), Spec((100003,)), Spec((2, 3, 4, 5), channels_last=True), Spec((4, 0, 3)),
]
SMALL_SPECS = [Spec((0,)), Spec((1,)), Spec((7,)), Spec((31,)), Spec((13, 9)), Spec((2, 3, 4, 5), channels_last=True)]


def empty_like_layout(shape, stride, offset, dtype, device):
    """A fresh tensor with exactly this shape, strides and storage offset."""
    numel = math.prod(shape)
    extent = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    storage = torch.empty(offset + max(extent, 1), dtype=dtype, device=device)
    return storage.as_strided(shape, stride, offset)


def clone_like(t, dtype=None, device=None):
    """A copy of t with its shape, strides and storage offset (so misalignment and layout survive)."""
    out = empty_like_layout(tuple(t.shape), t.stride(), t.storage_offset(), dtype or t.dtype, device or t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


def _layout(spec, shape, for_grad):
    """(strides, offset) of a tensor of `shape` laid out as `spec` says."""
    offset = spec.grad_offset if for_grad else spec.offset
    if for_grad and spec.grad == "transposed":
        # Contiguous in reversed dimension order: same shape as the param, other strides.
        stride, acc = [0] * len(shape), 1
        for d in range(len(shape)):
            stride[d] = acc
            acc *= max(shape[d], 1)
        return tuple(stride), offset
    if spec.channels_last:
        return torch.empty(shape, device="meta").to(memory_format=torch.channels_last).stride(), offset
    return torch.empty(shape, device="meta").stride(), offset


_POOL_SIZE = 1 << 20
_POOL = {}


def _pool(nonzero, low):
    """One session-wide block of random float64 values (normal, or normal pushed `low` away from zero):
    slices of it at random offsets are much cheaper than fresh randn calls on big tensors."""
    key = (nonzero, low)
    if key not in _POOL:
        v = torch.randn(2 * _POOL_SIZE, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
        _POOL[key] = torch.where(v < 0, v - low, v + low) if nonzero else v
    return _POOL[key]


def values(shape, gen, *, nonzero=False, low=0.0):
    """float64 random values on the CPU; nonzero ones are at least `low` away from zero."""
    numel = math.prod(shape)
    if numel > _POOL_SIZE:
        raise ValueError("tensor larger than the random pool")
    start = int(torch.randint(0, _POOL_SIZE, (), generator=gen))
    return _pool(nonzero, low)[start:start + numel].view(shape)


def make_params(specs, dtype, device="cpu", seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for spec in specs:
        stride, offset = _layout(spec, spec.shape, for_grad=False)
        p = empty_like_layout(spec.shape, stride, offset, dtype, device)
        v = values(spec.shape, gen) * scale
        p.copy_(torch.complex(v, values(spec.shape, gen)) if dtype.is_complex else v)
        params.append(torch.nn.Parameter(p))
    return params


def twin(params, dtype=None, device=None):
    """Independent params with the same values, layouts and storage offsets."""
    return [torch.nn.Parameter(clone_like(p.detach(), dtype, device)) for p in params]


class GradSource:
    """Fresh random, nonzero grads for a list of specs, one list per step, in a given dtype."""

    def __init__(self, specs, dtype, seed=1, low=None):
        # In fp16 a grad + weight_decay * param near zero squares to 0 and torch's own run divides by
        # zero: grads at least 1 away from zero keep that sum away from zero.
        if low is None:
            low = 1.0 if dtype in (torch.float16, torch.bfloat16) else 0.1
        self.specs, self.dtype, self.low = specs, dtype, low
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self):
        grads = []
        for spec in self.specs:
            stride, offset = _layout(spec, spec.shape, for_grad=True)
            g = empty_like_layout(spec.shape, stride, offset, self.dtype, "cpu")
            v = values(spec.shape, self.gen, nonzero=True, low=self.low)
            g.copy_(torch.complex(v, values(spec.shape, self.gen, nonzero=True, low=self.low))
                    if self.dtype.is_complex else v)
            grads.append(g)
        return grads


def set_grads(params, grads, skip=()):
    """Each param gets its own copy of the grad, in the param's dtype and device, layout kept."""
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if i in skip else clone_like(g, p.dtype, p.device)


def step(opt, *args, threads=DANLU_THREADS):
    """opt.step(*args); a danlu optimizer's with `threads` threads (None: as torch is set now)."""
    if threads is None or not isinstance(opt, FusedOptimizer):
        return opt.step(*args)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return opt.step(*args)
    finally:
        torch.set_num_threads(before)


def train(runs, grad_source, steps, skip=lambda step: (), threads=DANLU_THREADS):
    """runs: [(optimizer, params)]. Every run sees the same grads; skip(step) names params without a grad."""
    for i in range(steps):
        grads = grad_source()
        for opt, params in runs:
            set_grads(params, grads, skip(i))
            step(opt, threads=threads)


# ---------------------------------------------------------------------------------------------
# Comparisons


def tensors_of(opt, params):
    """{name: tensor}: the params and every tensor of their optimizer state, in state-dict naming."""
    out = {}
    for i, p in enumerate(params):
        out[f"param{i}"] = p.detach()
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"param{i}.{key}"] = value
    return out


def _real64(t):
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(device="cpu", dtype=torch.float64).reshape(-1)


def _kind(name):
    return name.split(".", 1)[1] if "." in name else "param"


def assert_same_state_keys(actual, expected):
    assert sorted(actual) == sorted(expected), "optimizer state keys differ from torch's"


def assert_steps_equal(actual, expected):
    for name in expected:
        if name.endswith(".step"):
            assert actual[name].dtype == expected[name].dtype == torch.float32, name
            assert actual[name].dim() == 0, name
            assert float(actual[name]) == float(expected[name]), name


def _rms_by_kind(expected):
    by_kind = {}
    for name, e in expected.items():
        if not name.endswith(".step"):
            by_kind.setdefault(_kind(name), []).append(_real64(e))
    return {k: (torch.cat(v).norm() / math.sqrt(max(sum(x.numel() for x in v), 1))).item()
            for k, v in by_kind.items()}


def _cancellation_floor(kind, numel, rms):
    """Centered RMSprop's grad_avg averages grads of alternating sign and can cancel to near zero; its
    rounding is then relative to the grads' size, which square_avg measures, not to its own small value
    (torch's CPU lerp contracts to FMA where ours does not, so their roundings differ there)."""
    return math.sqrt(numel * rms["square_avg"]) if kind == "grad_avg" else 0.0


def scaled_errors(actual, expected):
    """{name: ||a - e|| / max(||e||, sqrt(numel) * rms of its kind)}: the relative error of each tensor,
    measured against the typical magnitude of its kind where its own values happen to be near zero."""
    rms = _rms_by_kind(expected)
    errors = {}
    for name, e in expected.items():
        if name.endswith(".step") or e.numel() == 0:
            continue
        a, e = _real64(actual[name]), _real64(e)
        kind = _kind(name)
        denom = max(e.norm().item(), math.sqrt(e.numel()) * rms[kind], _cancellation_floor(kind, e.numel(), rms),
                    1e-300)
        errors[name] = (a - e).norm().item() / denom
    return errors


def kind_errors(actual, expected):
    """{kind: ||a - e|| / ||e||} over all tensors of a kind together (params, exp_avg, ...)."""
    diff, ref = {}, {}
    for name, e in expected.items():
        if name.endswith(".step"):
            continue
        k = _kind(name)
        diff.setdefault(k, []).append(_real64(actual[name]) - _real64(e))
        ref.setdefault(k, []).append(_real64(e))
    rms = _rms_by_kind(expected)
    return {k: torch.cat(diff[k]).norm().item()
            / max(torch.cat(ref[k]).norm().item(), _cancellation_floor(k, torch.cat(ref[k]).numel(), rms), 1e-300)
            for k in diff}


def assert_matches(actual, expected, rtol):
    """Same state keys and steps; every kind and every tensor within relative error rtol."""
    assert_same_state_keys(actual, expected)
    assert_steps_equal(actual, expected)
    for name, e in expected.items():
        assert actual[name].dtype == e.dtype, f"{name}: dtype {actual[name].dtype}, torch has {e.dtype}"
        assert actual[name].shape == e.shape, name
    worst = {k: v for k, v in kind_errors(actual, expected).items() if not v <= rtol}
    assert not worst, f"relative error above {rtol}: {worst}"
    worst = {k: v for k, v in scaled_errors(actual, expected).items() if not v <= rtol}
    assert not worst, f"relative error above {rtol}: {worst}"


def assert_optimizers_match(opt, params, ref_opt, ref_params, rtol):
    assert_matches(tensors_of(opt, params), tensors_of(ref_opt, ref_params), rtol)


def snapshot(opt, params):
    return {name: t.detach().clone() for name, t in tensors_of(opt, params).items()}


def assert_bitwise_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    differ = [n for n in expected if not (actual[n].dtype == expected[n].dtype and
                                          torch.equal(actual[n].cpu(), expected[n].cpu()))]
    assert not differ, f"not bitwise equal: {differ}"


FULL_PRECISION = [
    pytest.param(torch.float32, 2e-6, id="fp32"),
    pytest.param(torch.float64, 1e-12, id="fp64"),
]
# Low precision: ours must be no further from a float64 run than this many times torch's own error.
LOW_PRECISION = [
    pytest.param(torch.bfloat16, 2.0, id="bf16"),
    pytest.param(torch.float16, 2.0, id="fp16"),
]


