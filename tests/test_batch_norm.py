"""danlu's BatchNorm (danlu.nn.BatchNorm*d, BatchNormAct*d, danlu.functional.batch_norm) against torch's own
BatchNorm over several training steps with fresh inputs, then eval mode: outputs, input/residual/weight/bias
grads, running statistics and num_batches_tracked, in every layout and dtype."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import danlu
import danlu.functional
import danlu.nn
from danlu import _C
from helpers.batch_norm import (
    ACTIVATION_CASES,
    ALL_PRECISIONS,
    CHANNELS_LAST,
    CHANNELS_LAST_3D,
    CONTIGUOUS,
    FP32_TOL,
    STEPS,
    TORCH_ACTIVATIONS,
    assert_close_rms,
    assert_results_match,
    bn_pair,
    dims_of,
    forward_backward,
    fresh_input,
    precision_kwargs,
    randomize_affine,
    rms_error,
    torch_act_reference,
    train_and_compare,
)
from helpers.devices import DANLU_THREADS, DEVICES, num_threads, supported_isas

# ---------------------------------------------------------------------------------------------
# The modules against torch's, every constructor option


def test_torch_batchnorm_has_bias_option():
    """torch 2.13's BatchNorm takes bias=False (weight only): danlu's modules inherit the constructor."""
    assert "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters
    assert inspect.signature(danlu.nn.BatchNorm2d.__init__) == inspect.signature(torch.nn.BatchNorm2d.__init__)


MODULE_SHAPES = [
    pytest.param((6, 5), id="1d-NC"),
    pytest.param((4, 5, 7), id="1d-NCL"),
    pytest.param((3, 5, 6, 7), id="2d"),
    pytest.param((2, 5, 3, 4, 5), id="3d"),
]
CONSTRUCTOR_OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"momentum": 0.3}, id="momentum=0.3"),
    pytest.param({"momentum": None}, id="momentum=None"),
    pytest.param({"eps": 1e-2}, id="eps=1e-2"),
    pytest.param({"affine": False}, id="affine=False"),
    pytest.param({"bias": False}, id="bias=False"),
    pytest.param({"track_running_stats": False}, id="track_running_stats=False"),
    pytest.param({"affine": False, "track_running_stats": False, "momentum": None}, id="plain"),
    pytest.param({"dtype": torch.float64, "momentum": None, "eps": 1e-3}, id="dtype=float64"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", CONSTRUCTOR_OPTIONS)
@pytest.mark.parametrize("shape", MODULE_SHAPES)
def test_module_matches_torch(shape, options, device):
    ours, ref = bn_pair(dims_of(shape), shape[1], device=device, **options)
    assert ours.weight is None or ours.weight.device.type == device
    dtype = options.get("dtype", torch.float32)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else FP32_TOL
    train_and_compare(ours, ref, shape, dtype=dtype, device=device, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, param_dtype, atol, rtol", ALL_PRECISIONS)
@pytest.mark.parametrize("memory_format", [pytest.param(CONTIGUOUS, id="nchw"),
                                           pytest.param(CHANNELS_LAST, id="channels_last")])
def test_dtypes_match_torch(memory_format, dtype, param_dtype, atol, rtol, device):
    """Inputs in every dtype; low precision both with float32 params (the autocast case) and with the
    module itself in the low dtype."""
    ours, ref = bn_pair(2, 6, device=device, dtype=param_dtype or dtype, momentum=0.3)
    train_and_compare(ours, ref, (5, 6, 7, 9), dtype=dtype, device=device, atol=atol, rtol=rtol,
                      memory_format=memory_format, **precision_kwargs(ref, dtype, param_dtype, device=device))


def test_is_a_torch_batchnorm_and_state_dict_keys_match():
    for dims in (1, 2, 3):
        ours = getattr(danlu.nn, f"BatchNorm{dims}d")(4)
        act = getattr(danlu.nn, f"BatchNormAct{dims}d")(4)
        for m in (ours, act):
            assert isinstance(m, getattr(torch.nn, f"BatchNorm{dims}d"))
            assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    for options in ({}, {"affine": False}, {"bias": False}, {"track_running_stats": False}):
        ours, ref = danlu.nn.BatchNorm2d(4, **options), torch.nn.BatchNorm2d(4, **options)
        assert list(ours.state_dict()) == list(ref.state_dict()), options
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert "num_batches_tracked" in danlu.nn.BatchNorm2d(4).state_dict()


@pytest.mark.parametrize("direction", ["torch_to_danlu", "danlu_to_torch"])
def test_checkpoints_load_both_ways(direction):
    ours, ref = bn_pair(2, 5, momentum=None)
    source, target = (ref, ours) if direction == "torch_to_danlu" else (ours, ref)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        source(fresh_input((4, 5, 3, 3), gen).float())
    fresh = type(target)(5, momentum=None)
    result = fresh.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, t in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    assert int(fresh.num_batches_tracked) == 3
    x = fresh_input((4, 5, 3, 3), gen).float()
    source.eval(), fresh.eval()
    assert_close_rms(fresh(x), source(x), **FP32_TOL)


def test_sum_loss_expanded_output_grad():
    """y.sum().backward() hands the backward an expanded (stride 0) dy."""
    ours, ref = bn_pair(2, 4, activation="silu")
    ref_fn = torch_act_reference(ref, "silu", {})
    x = fresh_input((3, 4, 5, 6), torch.Generator().manual_seed(1)).float()
    grads = []
    for fn, m in ((ours, ours), (ref_fn, ref)):
        leaf = x.clone().requires_grad_()
        fn(leaf).sum().backward()
        grads.append([leaf.grad, m.weight.grad, m.bias.grad])
    for a, e in zip(*grads):
        assert_close_rms(a, e, **FP32_TOL)


# ---------------------------------------------------------------------------------------------
# Shapes and layouts


SHAPES = [
    pytest.param((1, 3, 4, 5), CONTIGUOUS, id="N=1-spatial"),
    pytest.param((1, 3, 4, 5), CHANNELS_LAST, id="N=1-spatial-channels_last"),
    pytest.param((7, 13, 5, 3), CONTIGUOUS, id="primes"),
    pytest.param((7, 13, 5, 3), CHANNELS_LAST, id="primes-channels_last"),
    pytest.param((9, 5), CONTIGUOUS, id="1d-NC"),
    pytest.param((2, 3), CONTIGUOUS, id="1d-NC-two-rows"),
    pytest.param((3, 5, 11), CONTIGUOUS, id="1d-NCL"),
    pytest.param((2, 5, 1), CONTIGUOUS, id="1d-L=1"),
    pytest.param((3, 17, 33), CONTIGUOUS, id="1d-inner-not-multiple-of-lanes"),
    pytest.param((2, 3, 3, 5, 7), CONTIGUOUS, id="3d"),
    pytest.param((2, 3, 3, 5, 7), CHANNELS_LAST_3D, id="3d-channels_last_3d"),
    pytest.param((3, 5, 1, 1), CONTIGUOUS, id="2d-1x1"),
    pytest.param((8, 16, 64, 64), CONTIGUOUS, id="large"),
    pytest.param((8, 16, 64, 64), CHANNELS_LAST, id="large-channels_last"),
    pytest.param((2, 3, 131, 131), CONTIGUOUS, id="large-plane-several-blocks"),
    pytest.param((4096, 32), CONTIGUOUS, id="rows-many-blocks"),
    pytest.param((4099, 3), CONTIGUOUS, id="rows-odd-narrow"),
    pytest.param((300, 1031), CONTIGUOUS, id="rows-wide"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, memory_format", SHAPES)
def test_shapes_match_torch(shape, memory_format, device, poisoned_empty_like):
    """poisoned_empty_like: an output or grad element the kernels never write stays NaN and shows."""
    ours, ref = bn_pair(dims_of(shape), shape[1], device=device, momentum=0.2)
    steps = 2 if math.prod(shape) > 100_000 else STEPS
    train_and_compare(ours, ref, shape, device=device, memory_format=memory_format, steps=steps, eval_steps=1,
                      **FP32_TOL)


NON_CONTIGUOUS_VIEWS = [
    pytest.param((8, 5, 7), lambda t: t.transpose(0, 2), id="1d-transposed"),
    pytest.param((6, 4, 9, 10), lambda t: t[:, ::2, 1:8, ::3], id="2d-sliced"),
    pytest.param((6, 5, 7, 4), lambda t: t.permute(0, 3, 1, 2), id="2d-permuted-not-channels_last"),
    pytest.param((5, 6, 7), lambda t: t.transpose(1, 2)[1:], id="1d-transposed-sliced"),
    pytest.param((4, 3, 5, 6, 2), lambda t: t.transpose(2, 4), id="3d-transposed"),
    pytest.param((9, 11), lambda t: t.t(), id="1d-NC-transposed"),
]


@pytest.mark.parametrize("base_shape, view", NON_CONTIGUOUS_VIEWS)
def test_non_contiguous_inputs_match_torch(base_shape, view):
    shape = view(torch.empty(base_shape, device="meta")).shape
    ours, ref = bn_pair(dims_of(shape), shape[1])
    train_and_compare(ours, ref, base_shape, view=view, **FP32_TOL)


@pytest.mark.parametrize("dtype, param_dtype, atol, rtol", ALL_PRECISIONS)
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("shape, memory_format", [
    pytest.param((3, 5, 7, 9), CONTIGUOUS, id="nchw"),
    pytest.param((3, 5, 7, 9), CHANNELS_LAST, id="channels_last"),
    pytest.param((37, 5), CONTIGUOUS, id="rows"),
])
def test_misaligned_storage_matches_torch(shape, memory_format, offset, dtype, param_dtype, atol, rtol):
    """Input, residual and output grad start 1 or 3 elements into their storage (not vector-aligned)."""
    ours, ref = bn_pair(dims_of(shape), shape[1], activation="silu", dtype=param_dtype or dtype)
    referee = precision_kwargs(ref, dtype, param_dtype, "silu")
    gen = torch.Generator().manual_seed(offset)
    strides = torch.empty(shape, device="meta").contiguous(memory_format=memory_format).stride()

    def misaligned(values, dtype):
        storage = torch.full((offset + values.numel(),), float("nan"), dtype=dtype)
        return storage.as_strided(shape, strides, offset).copy_(values)

    x64 = fresh_input(shape, gen).to(dtype).double()
    res64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    dy64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    runs = [(ours, ours, dtype), (torch_act_reference(ref, "silu", {}), ref, dtype)]
    if referee:
        runs.append((referee["exact_fn"], referee["exact"], torch.float64))
    results = []
    for fn, module, run_dtype in runs:
        x, res = misaligned(x64, run_dtype).requires_grad_(), misaligned(res64, run_dtype).requires_grad_()
        assert x.storage_offset() == offset and x.data_ptr() % 16 != 0
        y = fn(x, res)
        y.backward(misaligned(dy64, run_dtype))
        results.append({"output": y.detach(), "input.grad": x.grad, "residual.grad": res.grad,
                        "weight.grad": module.weight.grad, "bias.grad": module.bias.grad,
                        "running_mean": module.running_mean, "running_var": module.running_var})
    assert_results_match(results[0], results[1], atol, rtol, "misaligned", results[2] if referee else None)


@pytest.mark.parametrize("memory_format, shape", [
    pytest.param(CHANNELS_LAST, (3, 4, 5, 6), id="channels_last"),
    pytest.param(CHANNELS_LAST_3D, (3, 4, 2, 5, 3), id="channels_last_3d"),
    pytest.param(CONTIGUOUS, (3, 4, 5, 6), id="contiguous"),
])
def test_output_and_grads_keep_input_memory_format(memory_format, shape):
    ours, ref = bn_pair(dims_of(shape), shape[1], activation="relu")
    ref_fn = torch_act_reference(ref, "relu", {})
    gen = torch.Generator().manual_seed(2)
    for training in (True, False):
        ours.train(training), ref.train(training)
        x64, res64 = fresh_input(shape, gen), torch.randn(shape, generator=gen, dtype=torch.float64)
        dy64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        kw = dict(dtype=torch.float32, device="cpu", memory_format=memory_format)
        got = forward_backward(ours, ours, x64, dy64, res64, **kw)
        want = forward_backward(ref_fn, ref, x64, dy64, res64, **kw)
        for name in ("output", "input.grad", "residual.grad"):
            assert got[name].is_contiguous(memory_format=memory_format), name
            assert got[name].stride() == want[name].stride(), name


def test_residual_in_another_layout_than_input():
    ours, ref = bn_pair(2, 4, activation="tanh")
    ref_fn = torch_act_reference(ref, "tanh", {})
    gen = torch.Generator().manual_seed(8)
    x = fresh_input((3, 4, 5, 6), gen).float().contiguous(memory_format=CHANNELS_LAST)
    res = torch.randn((3, 4, 5, 6), generator=gen)  # NCHW while x is channels_last
    dy = torch.randn((3, 4, 5, 6), generator=gen)
    results = []
    for fn in (ours, ref_fn):
        xl, rl = x.clone().requires_grad_(), res.clone().requires_grad_()
        fn(xl, rl).backward(dy)
        results.append((xl.grad, rl.grad))
    for a, e in zip(*results):
        assert_close_rms(a, e, **FP32_TOL)


@pytest.mark.parametrize("dims, shape, fmt", [
    pytest.param(1, (0, 3), CONTIGUOUS, id="1d-NC"),
    pytest.param(1, (0, 3, 4), CONTIGUOUS, id="1d-NCL"),
    pytest.param(2, (0, 3, 4, 5), CONTIGUOUS, id="2d"),
    pytest.param(2, (0, 3, 4, 5), CHANNELS_LAST, id="2d-channels_last"),
    pytest.param(3, (0, 3, 2, 2, 2), CONTIGUOUS, id="3d"),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_zero_batch_like_torch(dims, shape, fmt, momentum):
    ours, ref = bn_pair(dims, 3, momentum=momentum)
    with torch.no_grad():  # running statistics other than their initial values, and some history
        ref.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        ref.running_var.copy_(torch.tensor([0.3, 1.5, 4.0]))
        ref.num_batches_tracked.fill_(3)
    ours.load_state_dict(ref.state_dict())
    for training in (True, False):
        ours.train(training), ref.train(training)
        x = torch.empty(shape).contiguous(memory_format=fmt)
        got = forward_backward(ours, ours, x.double(), torch.empty(shape, dtype=torch.float64), dtype=torch.float32,
                               device="cpu", memory_format=fmt)
        want = forward_backward(ref, ref, x.double(), torch.empty(shape, dtype=torch.float64), dtype=torch.float32,
                                device="cpu", memory_format=fmt)
        assert got["output"].shape == shape
        for name in want:
            a, e = got[name], want[name]
            assert (a is None) == (e is None), name
            if e is not None:
                assert a.shape == e.shape and a.dtype == e.dtype, name
                assert torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(e, 7.0)), f"{name}: {a} vs torch {e}"


def assert_same_value_error(ours, ref, x):
    """Both modules raise ValueError on x, with the same message."""
    with pytest.raises(ValueError) as expected:
        ref(x)
    with pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("dims, shape", [
    pytest.param(1, (1, 3), id="1d-NC"),
    pytest.param(1, (1, 3, 1), id="1d-NCL"),
    pytest.param(2, (1, 3, 1, 1), id="2d"),
    pytest.param(3, (1, 3, 1, 1, 1), id="3d"),
])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_one_value_per_channel_in_training_raises_like_torch(dims, shape, activation):
    ours, ref = bn_pair(dims, 3, activation=activation)
    x = torch.randn(shape)
    assert_same_value_error(ours, ref, x)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    # In eval mode with running statistics a single value per channel is fine.
    ours.eval(), ref.eval()
    assert_close_rms(ours(x), torch_act_reference(ref, activation or "identity", {})(x), **FP32_TOL)


# ---------------------------------------------------------------------------------------------
# Large mean: the statistics must not come from a sum of squares


LARGE_MEAN_CASES = [
    pytest.param((8, 4, 32, 32), CONTIGUOUS, id="nchw"),
    pytest.param((8, 4, 32, 32), CHANNELS_LAST, id="channels_last"),
    pytest.param((4096, 8), CONTIGUOUS, id="rows"),
    pytest.param((2, 3, 131, 131), CONTIGUOUS, id="nchw-several-blocks"),
]


@pytest.mark.parametrize("shape, memory_format", LARGE_MEAN_CASES)
def test_large_mean_statistics_stay_accurate(shape, memory_format):
    """x = 1e4 + noise (std 1) in float32. E[x^2] - E[x]^2 in float32 would lose every digit of the
    variance (1e8 * 6e-8 is about the variance itself); the running var must be within 1e-3 of float64."""
    gen = torch.Generator().manual_seed(9)
    x32 = (1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x64 = x32.double()  # the float32 values exactly: the reference sees what we see
    ours = getattr(danlu.nn, f"BatchNorm{dims_of(shape)}d")(shape[1], momentum=1.0)  # running_var = batch var
    leaf = x32.contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    with num_threads(DANLU_THREADS):
        y = ours(leaf)
        y.backward(dy.float())

    reduce_dims = [d for d in range(len(shape)) if d != 1]
    mean = x64.mean(reduce_dims)
    unbiased = x64.var(reduce_dims, unbiased=True)
    ref_x = x64.clone().requires_grad_()
    ref_y = (ref_x - ref_x.mean(reduce_dims, keepdim=True)) / torch.sqrt(
        ref_x.var(reduce_dims, unbiased=False, keepdim=True) + ours.eps)
    ref_y.backward(dy)

    var_rel = ((ours.running_var.double() - unbiased).abs() / unbiased).max().item()
    assert var_rel < 1e-3, f"running_var relative error {var_rel:.3g}"
    mean_rel = ((ours.running_mean.double() - mean).abs() / mean.abs()).max().item()
    assert mean_rel < 2e-6, f"running_mean relative error {mean_rel:.3g}"  # 0.02 of 1e4
    # float32 cannot hold a mean of 1e4 closer than half an ulp (5e-4): the output can be no better, and
    # torch's own channels-last kernel is about ten times worse than that: ours within 2e-3 or torch's error.
    torch_bn = getattr(torch.nn, f"BatchNorm{dims_of(shape)}d")(shape[1], momentum=1.0)
    torch_err, _ = rms_error(torch_bn(x32.contiguous(memory_format=memory_format)), ref_y)
    err, scale = rms_error(y, ref_y)
    assert err <= max(2e-3, 1.5 * torch_err), f"output rms error {err:.3g} against float64, torch's {torch_err:.3g}"
    err, scale = rms_error(leaf.grad, ref_x.grad)
    assert err <= 2e-3 * scale, f"input grad rms error {err:.3g} (rms {scale:.3g}) against float64"


# ---------------------------------------------------------------------------------------------
# BatchNormAct: act(bn(x) + residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", [pytest.param(CONTIGUOUS, id="nchw"),
                                           pytest.param(CHANNELS_LAST, id="channels_last")])
@pytest.mark.parametrize("residual", [pytest.param(False, id="no_residual"), pytest.param(True, id="residual")])
@pytest.mark.parametrize("activation, act_kwargs", ACTIVATION_CASES)
def test_batchnorm_act_2d_matches_torch(activation, act_kwargs, residual, memory_format, device, poisoned_empty_like):
    ours, ref = bn_pair(2, 6, activation=activation, act_kwargs=act_kwargs, device=device)
    train_and_compare(ours, ref, (4, 6, 5, 7), device=device, memory_format=memory_format, residual=residual,
                      ref_fn=torch_act_reference(ref, activation, act_kwargs), steps=3, **FP32_TOL)


@pytest.mark.parametrize("shape, memory_format", [
    pytest.param((9, 6), CONTIGUOUS, id="1d-NC"),
    pytest.param((3, 6, 11), CONTIGUOUS, id="1d-NCL"),
    pytest.param((2, 6, 3, 4, 5), CONTIGUOUS, id="3d"),
    pytest.param((2, 6, 3, 4, 5), CHANNELS_LAST_3D, id="3d-channels_last_3d"),
    pytest.param((600, 40), CONTIGUOUS, id="1d-rows-several-blocks"),
    pytest.param((2, 5, 131, 131), CONTIGUOUS, id="2d-plane-several-blocks"),
])
@pytest.mark.parametrize("activation, act_kwargs", [
    pytest.param("leaky_relu", {"negative_slope": 0.2}, id="leaky_relu-0.2"),
    pytest.param("elu", {"alpha": 0.7}, id="elu-0.7"),
    pytest.param("silu", {}, id="silu"),
])
def test_batchnorm_act_1d_3d_matches_torch(activation, act_kwargs, shape, memory_format):
    ours, ref = bn_pair(dims_of(shape), shape[1], activation=activation, act_kwargs=act_kwargs, momentum=None)
    train_and_compare(ours, ref, shape, memory_format=memory_format, residual=True,
                      ref_fn=torch_act_reference(ref, activation, act_kwargs), steps=2, eval_steps=1, **FP32_TOL)


@pytest.mark.parametrize("dtype, param_dtype, atol, rtol", ALL_PRECISIONS)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_batchnorm_act_dtypes_match_torch(activation, dtype, param_dtype, atol, rtol):
    ours, ref = bn_pair(2, 6, activation=activation, dtype=param_dtype or dtype)
    train_and_compare(ours, ref, (4, 6, 5, 7), dtype=dtype, atol=atol, rtol=rtol, residual=True,
                      ref_fn=torch_act_reference(ref, activation, {}), steps=3,
                      **precision_kwargs(ref, dtype, param_dtype, activation))


def whole_range(dtype):
    """z of every magnitude from the smallest subnormal to the largest finite, both signs; a dense grid over
    where the activations bend and exp under- and overflows; ±0, ±inf and NaN."""
    info = torch.finfo(dtype)
    magnitudes = torch.logspace(math.log10(info.smallest_normal * info.eps), math.log10(info.max), 20001,
                                dtype=torch.float64)
    edge = 120 if dtype == torch.float32 else 800
    grid = torch.linspace(-edge, edge, 240001, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    return torch.cat([magnitudes, -magnitudes, grid, special]).to(dtype)


def ulp(values, dtype):
    """The spacing of `dtype` at |values|, in float64 (a subnormal's spacing near zero)."""
    a = values.abs().to(dtype)
    spacing = torch.nextafter(a, torch.tensor(math.inf, dtype=dtype)).double() - a.double()
    return spacing.clamp(min=torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps)


# Where a gradient formula subtracts nearly equal terms (s (1 - s), 1 - tanh^2, s (1 + z (1 - s)) with
# s = sigmoid(z)), rounding leaves an error of a few eps times the size of those terms, in torch's float
# kernels as in ours: the bound on the grad adds 4 eps times this size to its 4 ulp.
GRAD_TERMS = {
    "relu": torch.zeros_like,
    "leaky_relu": torch.zeros_like,
    "elu": torch.zeros_like,
    "silu": lambda z: torch.sigmoid(z) * (1 + z.abs()),
    "sigmoid": torch.sigmoid,
    "tanh": torch.ones_like,
}


def act_and_grad(fn, z, param):
    """fn(z, param) and its derivative at every z (autograd with dy = 1)."""
    z = z.clone().requires_grad_()
    y = fn(z, param)
    y.backward(torch.ones_like(y))
    return y.detach(), z.grad


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("activation, act_kwargs", [
    pytest.param("relu", {}, id="relu"),
    pytest.param("leaky_relu", {"negative_slope": 0.2}, id="leaky_relu-0.2"),
    pytest.param("elu", {"alpha": 0.7}, id="elu-0.7"),
    pytest.param("silu", {}, id="silu"),
    pytest.param("sigmoid", {}, id="sigmoid"),
    pytest.param("tanh", {}, id="tanh"),
])
def test_activation_accuracy_over_the_whole_range(activation, act_kwargs, dtype, restore_cpu_isa):
    """act(z) within 4 ulp of torch's act in float64 for every z, and act'(z) within 4 ulp plus 4 eps times
    GRAD_TERMS; or else exactly torch's value in `dtype` (torch's own float32 silu and sigmoid are 0 below
    z = -88.7, where the float64 ones are not); inf and NaN exactly where torch has them; the same bits on
    every CPU ISA. An eval BatchNormAct with x = 0 and default statistics and affine computes
    act(0 + residual) = act(z), and the residual's grad is act'(z) for dy = 1."""
    z = whole_range(dtype)
    ours = []
    for isa in supported_isas():
        _C.set_cpu_isa(isa)
        bn = danlu.nn.BatchNormAct1d(1, activation=activation, **act_kwargs).to(dtype).eval()
        y, grad = act_and_grad(lambda r, _, bn=bn: bn(torch.zeros_like(r), r), z.view(-1, 1), None)
        ours.append((y.view(-1), grad.view(-1)))
    for other in ours[1:]:
        assert all(torch.equal(a.view(torch.int8), b.view(torch.int8)) for a, b in zip(other, ours[0]))

    fn, param_name, default = TORCH_ACTIVATIONS[activation]
    param = act_kwargs.get(param_name, default)
    eps, terms = torch.finfo(dtype).eps, GRAD_TERMS[activation](z.double())
    comparisons = zip(("act", "grad"), ours[0], act_and_grad(fn, z.double(), param), act_and_grad(fn, z, param),
                      (0 * terms, terms))
    for name, got, wide, same_dtype, bound_terms in comparisons:
        special = ~torch.isfinite(wide.to(dtype)) | ~torch.isfinite(same_dtype)
        assert torch.equal(got[special].nan_to_num(0.5), same_dtype[special].nan_to_num(0.5)), \
            f"{name}: at z = {z[special].tolist()}, {got[special].tolist()}; torch {same_dtype[special].tolist()}"
        error = (got.double() - wide).abs()
        bad = ~special & ~(error <= 4 * ulp(wide, dtype) + 4 * eps * bound_terms) & (got != same_dtype)
        assert not bad.any(), (f"{name}: {int(bad.sum())} values out of bounds, e.g. at z = {z[bad][:4].tolist()}: "
                               f"{got[bad][:4].tolist()}, torch in float64 {wide[bad][:4].tolist()}")


@pytest.mark.parametrize("options", [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}])
def test_batchnorm_act_state_dict_is_batchnorm2d(options):
    act = danlu.nn.BatchNormAct2d(5, activation="elu", alpha=0.5, **options)
    plain = torch.nn.BatchNorm2d(5, **options)
    assert list(act.state_dict()) == list(plain.state_dict())
    randomize_affine(plain, 3)
    if plain.track_running_stats:
        plain(fresh_input((4, 5, 3, 3), torch.Generator().manual_seed(1)).float())
    act.load_state_dict(plain.state_dict(), strict=True)
    for name, t in plain.state_dict().items():
        assert torch.equal(act.state_dict()[name], t), name
    back = torch.nn.BatchNorm2d(5, **options)
    back.load_state_dict(act.state_dict(), strict=True)


def test_batchnorm_act_takes_every_batchnorm_constructor_argument():
    """A drop-in for BatchNorm2d followed by an activation: torch's constructor arguments (bias=False
    included, torch >= 2.x keyword) are accepted with the same meaning."""
    for name in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters:
        if name != "self":
            assert name in inspect.signature(danlu.nn.BatchNormAct2d.__init__).parameters, name
    ours, ref = bn_pair(2, 4, activation="relu", bias=False)
    assert ours.bias is None and ours.weight is not None
    train_and_compare(ours, ref, (3, 4, 5, 5), ref_fn=torch_act_reference(ref, "relu", {}), steps=2, **FP32_TOL)


def test_batchnorm_act_defaults_and_repr():
    assert danlu.nn.BatchNormAct2d(3).activation == "relu"
    assert "leaky_relu" in repr(danlu.nn.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2))
    assert "0.2" in repr(danlu.nn.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2))


def test_unknown_activation_raises_value_error():
    with pytest.raises(ValueError, match="gelu"):
        danlu.nn.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="gelu"):
        danlu.functional.batch_norm_act(torch.randn(4, 3), None, None, training=True, activation="gelu")


# ---------------------------------------------------------------------------------------------
# danlu.functional.batch_norm against torch.nn.functional.batch_norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_only", "bias_only", "none"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 6)])
def test_functional_matches_torch(shape, affine, training, device):
    gen = torch.Generator().manual_seed(6)
    x64, dy64 = fresh_input(shape, gen), torch.randn(shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    weight = (1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)).float().to(device)
    bias = (0.5 * torch.randn(c, generator=gen, dtype=torch.float64)).float().to(device)
    running_mean = torch.randn(c, generator=gen).to(device)
    running_var = (0.5 + torch.rand(c, generator=gen)).to(device)
    results = []
    for fn in (danlu.functional.batch_norm, F.batch_norm):
        w = weight.clone().requires_grad_() if affine in ("weight_and_bias", "weight_only") else None
        b = bias.clone().requires_grad_() if affine in ("weight_and_bias", "bias_only") else None
        rm, rv = running_mean.clone(), running_var.clone()
        x = x64.float().to(device).requires_grad_()
        y = fn(x, rm, rv, w, b, training, 0.3, 1e-3)
        y.backward(dy64.float().to(device))
        results.append([y, x.grad, w.grad if w is not None else None, b.grad if b is not None else None, rm, rv])
    for name, a, e in zip(["output", "input.grad", "weight.grad", "bias.grad", "running_mean", "running_var"],
                          *results):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close_rms(a, e, **FP32_TOL, name=name)


@pytest.mark.parametrize("positional", [True, False])
def test_functional_training_without_running_stats_matches_torch(positional):
    gen = torch.Generator().manual_seed(7)
    x = fresh_input((5, 3, 4), gen).float()
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    if positional:
        got, want = danlu.functional.batch_norm(x, None, None, w, b, True), F.batch_norm(x, None, None, w, b, True)
    else:
        got = danlu.functional.batch_norm(x, None, None, weight=w, bias=b, training=True, momentum=0.5, eps=0.1)
        want = F.batch_norm(x, None, None, weight=w, bias=b, training=True, momentum=0.5, eps=0.1)
    assert_close_rms(got, want, **FP32_TOL)


def test_functional_eval_without_running_stats_raises_like_torch():
    """torch refuses training=False without running statistics (nothing to normalise with); so must we."""
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError) as expected:
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(type(expected.value)):
        danlu.functional.batch_norm(x, None, None, training=False)


def test_functional_signature_is_torchs():
    ours = inspect.signature(danlu.functional.batch_norm).parameters
    theirs = inspect.signature(F.batch_norm).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"track_running_stats": False}])
def test_wrong_channel_count_raises_with_the_shapes(options, training):
    ours, ref = bn_pair(2, 3, **options)
    ours.train(training), ref.train(training)
    x = torch.randn(2, 4, 5, 5)
    try:
        ref(x)
        torch_raises = False
    except RuntimeError:
        torch_raises = True
    if not torch_raises:  # no per-channel tensor to disagree with (affine=False, no running stats)
        assert_close_rms(ours(x), ref(x), **FP32_TOL)
        return
    with pytest.raises((RuntimeError, ValueError)) as got:
        ours(x)
    message = str(got.value)
    assert re.search(r"\b3\b", message) and re.search(r"\b4\b", message), message


@pytest.mark.parametrize("cls_dims, shape", [
    pytest.param(2, (2, 3, 5), id="BatchNorm2d-3d-input"),
    pytest.param(2, (2, 3, 4, 5, 6), id="BatchNorm2d-5d-input"),
    pytest.param(1, (2, 3, 4, 5), id="BatchNorm1d-4d-input"),
    pytest.param(1, (3,), id="BatchNorm1d-1d-input"),
    pytest.param(3, (2, 3, 4, 5), id="BatchNorm3d-4d-input"),
])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_wrong_dims_raise_value_error_like_torch(cls_dims, shape, activation):
    ours, ref = bn_pair(cls_dims, 3, activation=activation)
    assert_same_value_error(ours, ref, torch.randn(shape))


@pytest.mark.parametrize("bad_residual", [
    pytest.param(lambda x: torch.randn(2, 3, 5, 4), id="other-shape"),
    pytest.param(lambda x: torch.randn(2, 3, 5), id="fewer-dims"),
    pytest.param(lambda x: torch.randn(1, 3, 5, 5), id="broadcastable-shape"),
    pytest.param(lambda x: x.double(), id="other-dtype"),
])
def test_bad_residual_raises_value_error(bad_residual):
    bn = danlu.nn.BatchNormAct2d(3, activation="relu")
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="residual"):
        bn(x, bad_residual(x))
    assert int(bn.num_batches_tracked) <= 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_raises_a_clear_error(dtype):
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    with pytest.raises((TypeError, RuntimeError)) as got:
        danlu.nn.BatchNorm2d(3)(x)
    assert re.search(str(dtype).replace("torch.", "") + "|Long|Int|Byte|Bool", str(got.value)), str(got.value)


# ---------------------------------------------------------------------------------------------
# What the backward keeps


def saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("memory_format", [pytest.param(CONTIGUOUS, id="nchw"),
                                           pytest.param(CHANNELS_LAST, id="channels_last")])
@pytest.mark.parametrize("activation", ["relu", "silu", "identity"])
def test_saved_for_backward_is_input_and_per_channel_only(activation, memory_format):
    """Saved: x, per-channel tensors, and (if at all) the caller's very residual; never the output, a
    mask or a copy of anything full-size."""
    channels = 8
    bn = danlu.nn.BatchNormAct2d(channels, activation=activation)
    x = torch.randn(4, channels, 6, 7).contiguous(memory_format=memory_format).requires_grad_()
    res = torch.randn(4, channels, 6, 7).contiguous(memory_format=memory_format).requires_grad_()
    y, saved = saved_during(lambda: bn(x, res))
    full = [t for t in saved if t.numel() > channels]
    small = [t for t in saved if t.numel() <= channels]
    res_saved = [t for t in full if t.data_ptr() == res.data_ptr()]
    others = [t for t in full if t.data_ptr() != res.data_ptr()]
    assert all(t.shape == res.shape and t.stride() == res.stride() for t in res_saved)
    assert [t.data_ptr() for t in others] == [x.data_ptr()], \
        f"full-size saved tensors other than the residual: {[tuple(t.shape) for t in others]}"
    x_bytes = x.numel() * x.element_size()
    saved_bytes = sum(t.numel() * t.element_size() for t in others + small)
    assert saved_bytes <= x_bytes + 6 * channels * 8, f"{saved_bytes} bytes saved besides the residual"
    y.backward(torch.randn_like(y))  # and the backward works from what was saved
    assert x.grad is not None and res.grad is not None


def test_saved_for_backward_plain_batchnorm():
    bn = danlu.nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 6, 7, requires_grad=True)
    y, saved = saved_during(lambda: bn(x))
    full = [t for t in saved if t.numel() > 8]
    assert [t.data_ptr() for t in full] == [x.data_ptr()]
    assert sum(t.numel() * t.element_size() for t in saved) <= x.numel() * 4 + 6 * 8 * 8


# ---------------------------------------------------------------------------------------------
# Determinism: runs, thread counts, CPU ISA variants


DETERMINISM_CASES = [
    pytest.param((4, 8, 37, 41), CONTIGUOUS, id="nchw"),
    pytest.param((8, 16, 64, 64), CHANNELS_LAST, id="channels_last-many-blocks"),
    pytest.param((4096, 32), CONTIGUOUS, id="rows-many-blocks"),
    pytest.param((2, 3, 131, 131), CONTIGUOUS, id="nchw-several-blocks"),
]


def danlu_run(shape, memory_format, dtype=torch.float32, activation="silu", seed=0, steps=2):
    """Outputs, grads and buffers of a BatchNormAct with residual over `steps` training steps and one eval
    step, as torch's thread count and danlu's ISA are set now."""
    torch.manual_seed(seed)
    bn = getattr(danlu.nn, f"BatchNormAct{dims_of(shape)}d")(
        shape[1], activation=activation, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    randomize_affine(bn, seed)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for i in range(steps + 1):
        bn.train(i < steps)
        x64, dy64 = fresh_input(shape, gen), torch.randn(shape, generator=gen, dtype=torch.float64)
        res64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        results.append(forward_backward(bn, bn, x64, dy64, res64, dtype=dtype, device="cpu",
                                        memory_format=memory_format))
    return results


def assert_runs_bitwise_equal(a, b, what):
    for step, (ra, rb) in enumerate(zip(a, b)):
        assert sorted(ra) == sorted(rb)
        differ = [n for n in ra if not (ra[n].dtype == rb[n].dtype and torch.equal(ra[n], rb[n]))]
        assert not differ, f"{what}, step {step}: not bitwise equal: {differ}"


@pytest.mark.parametrize("shape, memory_format", DETERMINISM_CASES)
def test_same_input_gives_bitwise_same_results(shape, memory_format):
    with num_threads(DANLU_THREADS):
        assert_runs_bitwise_equal(danlu_run(shape, memory_format), danlu_run(shape, memory_format), "second run")


@pytest.mark.parametrize("shape, memory_format", DETERMINISM_CASES)
def test_thread_count_does_not_change_results(shape, memory_format, restore_num_threads):
    torch.set_num_threads(1)
    one = danlu_run(shape, memory_format)
    torch.set_num_threads(2)
    two = danlu_run(shape, memory_format)
    assert_runs_bitwise_equal(two, one, "2 threads vs 1")


ISA_CASES = [
    pytest.param((5, 7, 9, 13), CONTIGUOUS, id="nchw"),
    pytest.param((5, 7, 9, 13), CHANNELS_LAST, id="channels_last"),
    pytest.param((1100, 19), CONTIGUOUS, id="rows"),
    pytest.param((2, 3, 131, 131), CONTIGUOUS, id="nchw-several-blocks"),
]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d).replace("torch.", "")) for d in
                                   (torch.float32, torch.float64, torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("activation", ["identity", "elu", "silu", "tanh"])
@pytest.mark.parametrize("shape, memory_format", ISA_CASES)
def test_cpu_isa_variants_bitwise_equal(shape, memory_format, activation, dtype, restore_cpu_isa):
    results = {}
    for isa in supported_isas():
        _C.set_cpu_isa(isa)
        results[isa] = danlu_run(shape, memory_format, dtype=dtype, activation=activation, steps=1)
    first = next(iter(results))
    for isa, result in results.items():
        assert_runs_bitwise_equal(result, results[first], f"{isa} vs {first}")


# ---------------------------------------------------------------------------------------------
# Property test: random shapes and hyper-parameters


@settings(max_examples=25, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    n=st.integers(1, 6), c=st.integers(1, 9), spatial=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    channels_last=st.booleans(), momentum=st.one_of(st.none(), st.floats(0.01, 1.0)),
    eps=st.floats(1e-6, 1e-1), affine=st.booleans(), track=st.booleans(),
    activation=st.one_of(st.none(), st.sampled_from(sorted(TORCH_ACTIVATIONS))), residual=st.booleans(),
)
def test_random_shapes_and_options_match_torch(dims, n, c, spatial, channels_last, momentum, eps, affine, track,
                                               activation, residual):
    spatial = {1: spatial[:1], 2: (spatial + [3, 2])[:2], 3: (spatial + [3, 2, 2])[:3]}[dims]
    shape = (n, c, *spatial)
    if n * math.prod(spatial) == 1:
        n, shape = 2, (2, c, *spatial)
    fmt = {4: CHANNELS_LAST, 5: CHANNELS_LAST_3D}.get(len(shape), CONTIGUOUS) if channels_last else CONTIGUOUS
    ours, ref = bn_pair(dims, c, activation=activation, momentum=momentum, eps=eps, affine=affine,
                        track_running_stats=track)
    ref_fn = torch_act_reference(ref, activation, {}) if activation else ref
    train_and_compare(ours, ref, shape, memory_format=fmt, residual=residual and activation is not None,
                      ref_fn=ref_fn, steps=2, eval_steps=1, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("training", [True, False])
def test_strided_per_channel_tensors_are_read_as_views(training):
    """weight, bias and running statistics that are strided views are read through their strides."""
    c = 6
    x = torch.randn(4, c, 5, 5)
    storage = {name: torch.randn(2 * c) for name in ("weight", "bias", "mean")}
    storage["var"] = torch.rand(2 * c) + 0.5
    views = {name: t[::2] for name, t in storage.items()}
    ref = {name: t.clone() for name, t in views.items()}
    y = danlu.functional.batch_norm(x, views["mean"], views["var"], views["weight"], views["bias"], training)
    expected = F.batch_norm(x, ref["mean"], ref["var"], ref["weight"], ref["bias"], training)
    torch.testing.assert_close(y, expected, **FP32_TOL)
    torch.testing.assert_close(views["mean"], ref["mean"], **FP32_TOL)
    torch.testing.assert_close(views["var"], ref["var"], **FP32_TOL)


@pytest.mark.parametrize("shape, memory_format", [
    pytest.param((40, 130, 2), CONTIGUOUS, id="short-runs-blocks-start-mid-channel"),
    pytest.param((200, 3, 8, 8), CHANNELS_LAST, id="narrow-rows-many-blocks"),
    pytest.param((3, 5, 4099), CONTIGUOUS, id="runs-longer-than-a-block"),
])
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_elementwise_passes_split_into_blocks_of_runs(shape, memory_format, activation):
    """The CPU elementwise passes hand threads blocks of whole runs (a channel's inner elements, or a
    channels-last row); shapes whose blocks start in the middle of the channel order still match torch."""
    gen = torch.Generator().manual_seed(21)
    ours = danlu.nn.BatchNormAct1d(shape[1], activation=activation) if len(shape) == 3 else \
        danlu.nn.BatchNormAct2d(shape[1], activation=activation)
    ref = torch.nn.BatchNorm1d(shape[1]) if len(shape) == 3 else torch.nn.BatchNorm2d(shape[1])
    randomize_affine(ours, seed=3)
    ref.load_state_dict(ours.state_dict())
    act = TORCH_ACTIVATIONS[activation][0]
    x64, dy64 = fresh_input(shape, gen), torch.randn(shape, generator=gen, dtype=torch.float64)
    got = forward_backward(ours, ours, x64, dy64, dtype=torch.float32, device="cpu", memory_format=memory_format)
    want = forward_backward(lambda x: act(ref(x), None), ref, x64, dy64, dtype=torch.float32, device="cpu",
                            memory_format=memory_format)
    for name in want:
        assert_close_rms(got[name], want[name], name=name, **FP32_TOL)


@pytest.mark.parametrize("training", [True, False])
def test_forward_without_grad_matches_the_autograd_path(training):
    """Without autograd (no_grad) the module calls the native forward directly: the same output and stats."""
    x = torch.randn(4, 6, 5, 5)
    ours, twin_module = danlu.nn.BatchNormAct2d(6, activation="silu"), danlu.nn.BatchNormAct2d(6, activation="silu")
    randomize_affine(ours, seed=4)
    twin_module.load_state_dict(ours.state_dict())
    ours.train(training), twin_module.train(training)
    with torch.no_grad():
        y = ours(x)
    expected = twin_module(x.clone().requires_grad_())
    assert y.grad_fn is None and torch.equal(y, expected.detach())
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, dict(twin_module.named_buffers())[name]), name
