"""The BatchNorm tests' helpers: twin modules, fresh inputs per channel, one forward and backward, and the
comparisons with torch's results."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import danlu.nn
from helpers.devices import DANLU_THREADS, num_threads

STEPS = 5  # training steps, each with a fresh input and a fresh output grad, before eval

# (dtype of the input, dtype of the module's params and buffers or None for float32, atol, rtol).
# atol and rtol are in the root-mean-square sense: rms(ours - torch) <= atol + rtol * rms(torch).
FULL_PRECISION = [
    pytest.param(torch.float32, None, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.float64, None, 1e-12, 1e-10, id="fp64"),
]
LOW_PRECISION = [
    pytest.param(torch.bfloat16, torch.float32, 1e-3, 1e-2, id="bf16-input-fp32-params"),
    pytest.param(torch.float16, torch.float32, 1e-4, 2e-3, id="fp16-input-fp32-params"),
    pytest.param(torch.bfloat16, torch.bfloat16, 1e-3, 1e-2, id="bf16-input-bf16-params"),
    pytest.param(torch.float16, torch.float16, 1e-4, 2e-3, id="fp16-input-fp16-params"),
]
ALL_PRECISIONS = FULL_PRECISION + LOW_PRECISION
FP32_TOL = dict(atol=1e-6, rtol=1e-5)

CONTIGUOUS, CHANNELS_LAST, CHANNELS_LAST_3D = torch.contiguous_format, torch.channels_last, torch.channels_last_3d

# Activation name -> (torch function of (z, param), param name of BatchNormAct, its default).
TORCH_ACTIVATIONS = {
    "identity": (lambda z, p: z, None, None),
    "relu": (lambda z, p: F.relu(z), None, None),
    "leaky_relu": (lambda z, p: F.leaky_relu(z, p), "negative_slope", 0.01),
    "elu": (lambda z, p: F.elu(z, p), "alpha", 1.0),
    "silu": (lambda z, p: F.silu(z), None, None),
    "sigmoid": (lambda z, p: torch.sigmoid(z), None, None),
    "tanh": (lambda z, p: torch.tanh(z), None, None),
}
ACTIVATION_CASES = [
    pytest.param("identity", {}, id="identity"),
    pytest.param("relu", {}, id="relu"),
    pytest.param("leaky_relu", {}, id="leaky_relu"),
    pytest.param("leaky_relu", {"negative_slope": 0.2}, id="leaky_relu-0.2"),
    pytest.param("elu", {}, id="elu"),
    pytest.param("elu", {"alpha": 0.7}, id="elu-0.7"),
    pytest.param("silu", {}, id="silu"),
    pytest.param("sigmoid", {}, id="sigmoid"),
    pytest.param("tanh", {}, id="tanh"),
]


# ---------------------------------------------------------------------------------------------
# Helpers: twin modules, fresh inputs, one forward/backward, comparisons


def dims_of(shape):
    """The N of BatchNorm{N}d that takes an input of this shape."""
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


def randomize_affine(bn, seed):
    """Weights around 1 and biases around 0, different per channel, so a swapped or ignored one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(1 + 0.5 * torch.randn(bn.weight.shape, generator=gen, dtype=torch.float64))
        if bn.bias is not None:
            bn.bias.copy_(0.5 * torch.randn(bn.bias.shape, generator=gen, dtype=torch.float64))


def bn_pair(dims, num_features, *, seed=0, activation=None, act_kwargs=None, **kwargs):
    """(danlu module, torch module) with the same constructor arguments, params and buffers.
    activation: a BatchNormAct{dims}d of danlu (the torch twin is then the plain BatchNorm{dims}d)."""
    ref = getattr(torch.nn, f"BatchNorm{dims}d")(num_features, **kwargs)
    randomize_affine(ref, seed)
    if activation is None:
        ours = getattr(danlu.nn, f"BatchNorm{dims}d")(num_features, **kwargs)
    else:
        ours = getattr(danlu.nn, f"BatchNormAct{dims}d")(num_features, activation=activation, **(act_kwargs or {}),
                                                          **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def torch_act_reference(ref, activation, act_kwargs):
    """act(ref(x) + residual) with torch's functions: the reference of BatchNormAct."""
    fn, param_name, default = TORCH_ACTIVATIONS[activation]
    param = (act_kwargs or {}).get(param_name, default)

    def forward(x, residual=None):
        z = ref(x)
        return fn(z if residual is None else z + residual, param)

    return forward


def fresh_input(shape, gen):
    """float64 values with a different mean and spread per channel (never zero-mean, never all equal)."""
    channels = shape[1]
    offset = 2 * torch.randn(channels, generator=gen, dtype=torch.float64)
    scale = 0.5 + 1.5 * torch.rand(channels, generator=gen, dtype=torch.float64)
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x * scale.view(per_channel) + offset.view(per_channel)


def forward_backward(fn, module, x64, dy64, res64=None, *, dtype, device, memory_format=CONTIGUOUS, view=None,
                     threads=None):
    """Runs fn(x[, residual]) and its backward with dy; returns {name: tensor} of everything to compare.
    x is a leaf in `memory_format`, then `view` of it (a non-contiguous view) is what fn gets."""
    for p in module.parameters():
        p.grad = None
    leaf = x64.to(device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    x = view(leaf) if view is not None else leaf
    residual = None
    if res64 is not None:
        residual = res64.to(device=device, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
    with num_threads(threads) if threads else contextlib.nullcontext():
        y = fn(x) if residual is None else fn(x, residual)
        y.backward(dy64.to(device=device, dtype=y.dtype))
    out = {"output": y.detach(), "input.grad": leaf.grad}
    if residual is not None:
        out["residual.grad"] = residual.grad
    for name, p in module.named_parameters():
        out[f"{name}.grad"] = p.grad
    for name, b in module.named_buffers():
        out[name] = b.detach().clone()
    return out


def rms_error(actual, expected):
    """(rms(actual - expected), rms(expected)) in float64 on the CPU."""
    a = actual.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    e = expected.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    n = max(e.numel(), 1)
    return ((a - e).norm() / math.sqrt(n)).item(), (e.norm() / math.sqrt(n)).item()


def assert_close_rms(actual, expected, atol, rtol, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, torch {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, torch {expected.dtype}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN where torch has none (or the reverse)"
    finite = ~torch.isnan(e)
    err, ref = rms_error(a[finite], e[finite])
    assert err <= atol + rtol * ref, f"{name}: rms error {err:.3g} > {atol} + {rtol} * rms {ref:.3g}"


def assert_results_match(ours, ref, atol, rtol, what="", exact=None):
    """Same names, dtypes, shapes; num_batches_tracked exactly; the output and input grad in torch's memory
    layout; every other tensor within tolerance of torch's. With `exact` (a float64 run on the same inputs,
    for low precision), a tensor may instead be no further from float64 than twice torch's own distance:
    torch's bf16/fp16 kernels round intermediates that ours keep in float32."""
    assert sorted(ours) == sorted(ref), f"{what}: compared {sorted(ours)}, torch has {sorted(ref)}"
    for name, e in ref.items():
        a = ours[name]
        if e is None or a is None:
            assert a is None and e is None, f"{what} {name}: ours {a is None and 'None'}, torch {e is None and 'None'}"
            continue
        if name.endswith("num_batches_tracked"):
            assert a.dtype == e.dtype and torch.equal(a.cpu(), e.cpu()), f"{what} {name}: {a} vs torch {e}"
            continue
        if name in ("output", "input.grad") and e.numel() > 0:
            assert a.stride() == e.stride(), f"{what} {name}: strides {a.stride()}, torch {e.stride()}"
        if exact is None:
            assert_close_rms(a, e, atol, rtol, f"{what} {name}")
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}: {a.dtype} {tuple(a.shape)}, " \
                                                          f"torch {e.dtype} {tuple(e.shape)}"
        ours_err, scale = rms_error(a, exact[name])
        torch_err, _ = rms_error(e, exact[name])
        assert math.isfinite(torch_err), f"{what} {name}: torch's own run is not finite"
        assert ours_err <= max(2 * torch_err, atol + rtol * scale), \
            f"{what} {name}: rms distance from float64 {ours_err:.3g}, torch's {torch_err:.3g} (rms {scale:.3g})"


def train_and_compare(ours, ref, shape, *, dtype=torch.float32, device="cpu", atol=1e-6, rtol=1e-5,
                      memory_format=CONTIGUOUS, view=None, residual=False, ref_fn=None, steps=STEPS, seed=0,
                      eval_steps=2, exact=None, exact_fn=None):
    """`steps` training steps then `eval_steps` eval steps, each with fresh x, dy (and residual);
    everything compared with torch after every step. exact: a float64 twin of ref (exact_fn its forward)
    that referees low-precision runs; inputs are then rounded to `dtype` first, so all runs see the same."""
    gen = torch.Generator().manual_seed(seed)
    ref_fn = ref_fn or ref
    out_shape = view(torch.empty(shape, device="meta")).shape if view is not None else shape
    for i in range(steps + eval_steps):
        training = i < steps
        for m in (ours, ref, exact):
            if m is not None:
                m.train(training)
        x64, dy64 = fresh_input(shape, gen), torch.randn(out_shape, generator=gen, dtype=torch.float64)
        res64 = torch.randn(out_shape, generator=gen, dtype=torch.float64) if residual else None
        if exact is not None:
            x64, dy64 = x64.to(dtype).double(), dy64.to(dtype).double()
            res64 = res64.to(dtype).double() if res64 is not None else None
        kw = dict(device=device, memory_format=memory_format, view=view)
        got = forward_backward(ours, ours, x64, dy64, res64, dtype=dtype, threads=DANLU_THREADS, **kw)
        want = forward_backward(ref_fn, ref, x64, dy64, res64, dtype=dtype, **kw)
        best = None
        if exact is not None:
            best = forward_backward(exact_fn or exact, exact, x64, dy64, res64, dtype=torch.float64, **kw)
        assert_results_match(got, want, atol, rtol, f"{'train' if training else 'eval'} step {i}", best)


def float64_twin(ref, device="cpu"):
    """A float64 copy of a torch BatchNorm: the referee of low-precision runs."""
    exact = type(ref)(ref.num_features, ref.eps, ref.momentum, ref.affine, ref.track_running_stats,
                      device=device, dtype=torch.float64, bias=ref.bias is not None or not ref.affine)
    exact.load_state_dict(ref.state_dict())
    return exact


def precision_kwargs(ref, dtype, param_dtype, activation=None, device="cpu"):
    """train_and_compare's referee arguments: none in full precision, a float64 twin in low precision."""
    if dtype in (torch.float32, torch.float64) and param_dtype in (None, dtype):
        return {}
    exact = float64_twin(ref, device)
    exact_fn = torch_act_reference(exact, activation, {}) if activation else None
    return dict(exact=exact, exact_fn=exact_fn)
