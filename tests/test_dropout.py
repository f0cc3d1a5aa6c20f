"""danlu's dropout family against a NumPy Philox4x32-10 reference of the same keying (seed, offset, element
index), against its own definitions (kept = x / (1 - p), dropped = x * 0) and against torch's semantics:
statistics of the masks, gradients, saved memory, layouts, dtypes, the channel and sample variants,
DropConnect, dropout_add, and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import danlu.functional as DF
import danlu.nn as dnn
from danlu import _C, _dropout
from helpers.devices import DEVICES, supported_isas

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
ODD_SIZES = [1, 3, 4, 31, 32, 33, 63, 64, 65, 127, 1000, 4099, 70001]

# ---------------------------------------------------------------------------------------------
# The reference: Philox4x32-10 in NumPy, element i = word i % 4 of counter (i // 4, offset), key = seed.

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """counter: four uint64 arrays of 32-bit words; key: two ints. Returns the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _MASK32, (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return c0, c1, c2, c3


def reference_words(numel, seed, offset=0):
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    words = philox4x32_10((groups & _MASK32, groups >> np.uint64(32), np.full_like(groups, offset & 0xFFFFFFFF),
                           np.full_like(groups, offset >> 32)), (seed & 0xFFFFFFFF, seed >> 32))
    return np.stack(words, axis=1).reshape(-1)[:numel]


def reference_keep(numel, seed, p, offset=0):
    """Kept elements: Philox word below round((1 - p) * 2^32), capped at 2^32 - 1."""
    threshold = min(round((1.0 - p) * 2.0**32), 2**32 - 1)
    return torch.from_numpy(reference_words(numel, seed, offset) < threshold)


def seed_of(generator_seed):
    """The Philox key a call draws from a generator seeded with generator_seed (or from the default generator
    after torch.manual_seed(generator_seed)): its first int64."""
    g = torch.Generator().manual_seed(generator_seed)
    return int(torch.randint(2**63 - 1, (), dtype=torch.int64, generator=g))


def expected_dropout(x, keep, p):
    """kept: x / (1 - p), one rounding in the math type; dropped: x * 0. keep is in x's logical order."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xm = x.to(math_dtype)
    return torch.where(keep.to(x.device), xm / (1.0 - p), xm * 0).to(x.dtype)


def memory_order_keep(x, keep_flat):
    """keep_flat indexes x's elements in memory order; returns it in x's logical shape."""
    positions = torch.empty_strided(x.shape, x.stride(), dtype=torch.int64)
    positions.as_strided((x.numel(),), (1,)).copy_(torch.arange(x.numel()))  # dense x only
    return keep_flat[positions]


def unpack_mask(mask_words, numel):
    bits = (mask_words.to(torch.int64).cpu().unsqueeze(1) >> torch.arange(32)) & 1
    return bits.reshape(-1)[:numel].bool()


# ---------------------------------------------------------------------------------------------
# The generator itself


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32_10(tuple(np.array([c], dtype=np.uint64) for c in counter), key)
    assert tuple(int(w[0]) for w in out) == expected


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("numel", [0] + ODD_SIZES)
@pytest.mark.parametrize("seed, offset", [(0, 0), (12345, 0), (2**63 - 25, 7), (0xDEADBEEF12345678, 2**40 + 3)])
def test_native_masks_equal_the_reference(isa, numel, seed, offset, restore_cpu_isa):
    """Mask bits and values of the native kernel are the reference's, bit for bit, for every ISA."""
    _C.set_cpu_isa(isa)
    p = 0.37
    x = torch.randn(numel, dtype=torch.float32)
    mask = torch.full((_dropout.mask_words(numel),), -1, dtype=torch.int32)  # poisoned: every bit must be set
    y = torch.full_like(x, math.nan)
    _dropout.draw(x, 1 - p, 1 - p, seed, offset, out=y, mask=mask)
    keep = reference_keep(numel, seed, p, offset)
    assert torch.equal(unpack_mask(mask, numel), keep)
    assert torch.equal(y, expected_dropout(x, keep, p))
    if numel % 32:  # bits past the last element are zero
        assert (int(mask[-1]) & 0xFFFFFFFF) >> (numel % 32) == 0


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_masks_do_not_depend_on_threads(num_threads, restore_num_threads):
    x = torch.randn(300007)
    torch.set_num_threads(num_threads)
    y = DF.dropout(x, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(y, expected_dropout(x, reference_keep(x.numel(), seed_of(8), 0.5), 0.5))


# ---------------------------------------------------------------------------------------------
# Statistics of the masks


def binomial_bounds(n, q, sigmas=6.0):
    spread = sigmas * math.sqrt(n * q * (1 - q))
    return n * q - spread, n * q + spread


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_kept_fraction_within_binomial_bounds(p):
    n = (1 << 20) + 13
    y = DF.dropout(torch.rand(n) + 0.5, p, generator=torch.Generator().manual_seed(1))
    lo, hi = binomial_bounds(n, 1 - p)
    assert lo <= int((y != 0).sum()) <= hi


@pytest.mark.parametrize("period", [32, 64, 128])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_no_bias_by_position(period, p):
    """Every residue class mod the period keeps its share: a packing or lane bug would skew some."""
    n = period * 16384
    kept = DF.dropout(torch.ones(n), p, generator=torch.Generator().manual_seed(2)) != 0
    per_class = kept.view(-1, period).sum(0)
    lo, hi = binomial_bounds(n // period, 1 - p, sigmas=5.5)
    assert bool(((per_class >= lo) & (per_class <= hi)).all()), per_class


def test_consecutive_calls_draw_independent_masks():
    n, p = 1 << 20, 0.5
    torch.manual_seed(3)
    a = DF.dropout(torch.ones(n), p) != 0
    b = DF.dropout(torch.ones(n), p) != 0
    both = int((a & b).sum())
    lo, hi = binomial_bounds(n, (1 - p) ** 2)
    assert lo <= both <= hi
    assert not torch.equal(a, b)


def test_manual_seed_and_generator_reproduce_masks():
    x = torch.randn(10007)
    torch.manual_seed(11)
    first = DF.dropout(x, 0.4)
    torch.manual_seed(11)
    assert torch.equal(DF.dropout(x, 0.4), first)
    assert torch.equal(DF.dropout(x, 0.4, generator=torch.Generator().manual_seed(11)), first)
    assert torch.equal(first, expected_dropout(x, reference_keep(x.numel(), seed_of(11), 0.4), 0.4))


# ---------------------------------------------------------------------------------------------
# Values, gradients, saved memory


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_use_one_mask(dtype, p, device, poisoned_empty_like):
    x = torch.randn(3, 5, 257, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    y = DF.dropout(x, p, generator=torch.Generator().manual_seed(4))
    keep = reference_keep(x.numel(), seed_of(4), p).view(x.shape)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.cpu(), expected_dropout(x.detach().cpu(), keep, p))
    y.backward(dy)
    assert torch.equal(x.grad.cpu(), expected_dropout(dy.cpu(), keep, p))


def test_dropped_elements_keep_inf_and_nan_visible():
    """As in torch: a dropped element is x * 0, so inf and NaN give NaN, and -x gives -0."""
    x = torch.tensor([math.inf, math.nan, -1.0, 2.0] * 4096)
    y = DF.dropout(x, 0.5, generator=torch.Generator().manual_seed(5))
    keep = reference_keep(x.numel(), seed_of(5), 0.5)
    dropped = y[~keep]
    assert torch.isnan(dropped[torch.isinf(x[~keep]) | torch.isnan(x[~keep])]).all()
    assert torch.signbit(y[~keep & (x == -1)]).all() and (y[~keep & (x == -1)] == 0).all()


def test_saved_for_backward_is_one_bit_per_element():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(1 << 20, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = DF.dropout(x * 1.0, 0.5)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes <= x.numel() / 8 + 64, saved_bytes
    y.sum().backward()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eval_and_p_zero_return_the_input(p):
    x = torch.randn(7, requires_grad=True)
    assert DF.dropout(x, p, training=False) is x
    assert DF.dropout(x, 0.0, training=True) is x
    module = dnn.Dropout(p).eval()
    assert module(x) is x


def test_p_one_gives_zeros_and_zero_grads():
    x = torch.randn(100, requires_grad=True)
    y = DF.dropout(x, 1.0)
    assert torch.equal(y, x.detach() * 0)
    y.backward(torch.randn(100))
    assert torch.equal(x.grad, torch.zeros(100))


def test_zero_elements_and_zero_dim():
    assert DF.dropout(torch.empty(0, 5), 0.5).shape == (0, 5)
    x = torch.tensor(3.0)
    y = DF.dropout(x, 0.5, generator=torch.Generator().manual_seed(6))
    assert float(y) in (0.0, 6.0)


@pytest.mark.parametrize("p", [-0.1, 1.5, math.nan])
def test_probability_outside_unit_interval_is_a_value_error(p):
    with pytest.raises(ValueError, match="between 0 and 1"):
        DF.dropout(torch.randn(3), p)
    for cls in (dnn.Dropout, dnn.Dropout1d, dnn.Dropout2d, dnn.Dropout3d, dnn.DropPath):
        with pytest.raises(ValueError):  # torch's constructors let NaN through: the forward refuses it
            cls(p)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        DF.dropout_add(torch.randn(3), torch.randn(3), p)


# ---------------------------------------------------------------------------------------------
# Layouts: the mask is keyed by memory order for dense tensors, by logical order for the others.


def _channels_last(x):
    return x.to(memory_format=torch.channels_last)


LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": _channels_last,
    "transposed": lambda x: x.transpose(0, 3),
    "misaligned": lambda x: torch.empty(x.numel() + 3, dtype=x.dtype).narrow(0, 3, x.numel()).view(x.shape).copy_(x),
    "strided_slice": lambda x: torch.cat([x, x], dim=3)[..., ::2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(layout, dtype, poisoned_empty_like):
    x = LAYOUTS[layout](torch.randn(2, 3, 5, 7).to(dtype))
    p = 0.3
    y = DF.dropout(x, p, generator=torch.Generator().manual_seed(7))
    keep_flat = reference_keep(x.numel(), seed_of(7), p)
    dense = _dropout.is_dense(x)
    keep = memory_order_keep(x, keep_flat) if dense else keep_flat.view(x.shape)
    assert torch.equal(y, expected_dropout(x, keep, p))
    if dense:
        assert y.stride() == x.stride()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inplace_writes_into_the_input(layout):
    base = torch.randn(2, 3, 5, 7)
    x = LAYOUTS[layout](base.clone())
    expected = DF.dropout(x.clone(), 0.5, generator=torch.Generator().manual_seed(9))
    x_before = x
    y = DF.dropout(x, 0.5, inplace=True, generator=torch.Generator().manual_seed(9))
    assert y is x_before
    keep = expected != 0
    assert torch.equal(x[keep], expected[keep]) and bool((x[~keep] == 0).all())


def test_inplace_on_a_non_leaf_backpropagates_the_mask():
    w = torch.randn(4099, requires_grad=True)
    h = w * 2
    y = DF.dropout(h, 0.5, inplace=True, generator=torch.Generator().manual_seed(10))
    assert y is h
    y.sum().backward()
    keep = reference_keep(w.numel(), seed_of(10), 0.5)
    assert torch.equal(w.grad, torch.where(keep, torch.tensor(2.0) / 0.5, torch.tensor(0.0)))


def test_inplace_on_a_leaf_that_requires_grad_fails_like_torch():
    x = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        F.dropout(x, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        DF.dropout(x, 0.5, inplace=True)


def test_backward_with_a_grad_in_another_layout():
    x = _channels_last(torch.randn(2, 3, 5, 7)).requires_grad_()
    y = DF.dropout(x, 0.4, generator=torch.Generator().manual_seed(12))
    dy = torch.randn(2, 3, 5, 7)  # contiguous, unlike y
    y.backward(dy)
    assert torch.equal(x.grad, expected_dropout(dy, y.detach() != 0, 0.4))


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=4), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**62))
def test_any_shape_and_probability(shape, p, seed):
    x = torch.randn(shape)
    y = DF.dropout(x, p, generator=torch.Generator().manual_seed(seed))
    if p == 0 or x.numel() == 0:
        assert y is x
        return
    assert torch.equal(y, expected_dropout(x, reference_keep(x.numel(), seed_of(seed), p).view(x.shape), p))


# ---------------------------------------------------------------------------------------------
# Channel and sample variants


@pytest.mark.parametrize("cls, functional, shape, batched", [
    (dnn.Dropout1d, DF.dropout1d, (4, 6, 9), True),
    (dnn.Dropout1d, DF.dropout1d, (6, 9), False),
    (dnn.Dropout2d, DF.dropout2d, (4, 6, 5, 3), True),
    (dnn.Dropout3d, DF.dropout3d, (4, 6, 2, 5, 3), True),
    (dnn.Dropout3d, DF.dropout3d, (6, 2, 5, 3), False),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_dropout_drops_whole_channels(cls, functional, shape, batched, dtype):
    torch_cls = cls.__mro__[1]
    assert issubclass(cls, torch_cls) and torch_cls.__module__.startswith("torch.nn")
    x = (torch.rand(shape) + 0.5).to(dtype).requires_grad_()
    p = 0.4
    torch.manual_seed(13)
    y = cls(p)(x)
    flat = 2 if batched else 1  # one row per (sample, channel)
    channels, x_channels = y.detach().flatten(flat), x.detach().flatten(flat)
    kept = channels != 0
    assert bool((kept.all(-1) | (~kept).all(-1)).all()), "a channel was partly dropped"
    scale = torch.tensor(1.0, dtype=dtype) / (1 - p)  # torch's own arithmetic: x * (1 / (1 - p)) in x's dtype
    assert torch.equal(channels[kept], (x_channels * scale)[kept])
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y.detach() != 0)
    torch.manual_seed(13)
    assert torch.equal(functional(x.detach(), p), y.detach())
    assert cls(p).eval()(x) is x


def test_channel_dropout_keeps_the_expected_share_of_channels():
    n, c, p = 512, 256, 0.3
    y = DF.dropout2d(torch.ones(n, c, 2, 2), p, generator=torch.Generator().manual_seed(14))
    lo, hi = binomial_bounds(n * c, 1 - p)
    assert lo <= int((y[:, :, 0, 0] != 0).sum()) <= hi


def test_channel_dropout_input_checks_follow_torch():
    with pytest.raises(RuntimeError, match="dropout1d"):
        DF.dropout1d(torch.randn(2, 3, 4, 5))
    with pytest.warns(UserWarning, match="dropout2d"):
        DF.dropout2d(torch.randn(2, 3, 4))
    with pytest.warns(UserWarning, match="dropout3d"):
        DF.dropout3d(torch.randn(2, 3, 4))


def test_inplace_channel_dropout():
    x = torch.rand(4, 6, 5, 5) + 0.5
    expected = DF.dropout2d(x.clone(), 0.5, generator=torch.Generator().manual_seed(15))
    y = DF.dropout2d(x, 0.5, inplace=True, generator=torch.Generator().manual_seed(15))
    assert y is x and torch.equal(x, expected)


@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_drop_path_drops_whole_samples(scale_by_keep, dtype):
    x = (torch.rand(64, 3, 4) + 0.5).to(dtype).requires_grad_()
    p = 0.25
    module = dnn.DropPath(p, scale_by_keep=scale_by_keep)
    torch.manual_seed(16)
    y = module(x)
    kept = y.detach().flatten(1) != 0
    assert bool((kept.all(1) | (~kept).all(1)).all())
    assert 0 < int(kept.all(1).sum()) < 64
    scale = torch.tensor(1.0, dtype=dtype) / (1 - p) if scale_by_keep else torch.tensor(1.0, dtype=dtype)
    assert torch.equal(y.detach().flatten(1)[kept], (x.detach().flatten(1) * scale)[kept])
    y.sum().backward()
    assert torch.equal(x.grad != 0, y.detach() != 0)
    assert module.eval()(x) is x
    assert dnn.DropPath(0.0)(x) is x
    assert module.drop_prob == p


def test_drop_path_with_p_one_drops_everything():
    y = DF.drop_path(torch.randn(8, 3), 1.0, training=True)
    assert torch.equal(y, torch.zeros(8, 3))


# ---------------------------------------------------------------------------------------------
# DropConnect


def test_drop_connect_masks_the_weight_in_training_only():
    layer = dnn.DropConnect(17, 5, p=0.3)
    assert isinstance(layer, torch.nn.Linear)
    x = torch.randn(4, 17)
    torch.manual_seed(17)
    y = layer(x)
    keep = reference_keep(layer.weight.numel(), seed_of(17), 0.3).view(5, 17)
    masked = expected_dropout(layer.weight.detach(), keep, 0.3)
    torch.testing.assert_close(y, F.linear(x, masked, layer.bias), rtol=0, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(layer.weight.grad, expected_dropout(x.sum(0).expand(5, 17), keep, 0.3))
    assert layer.bias.grad is not None
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_drop_connect_state_dict_is_a_linears():
    linear = torch.nn.Linear(6, 3)
    layer = dnn.DropConnect(6, 3, p=0.5)
    layer.load_state_dict(linear.state_dict())
    assert set(layer.state_dict()) == set(linear.state_dict())
    shared = dnn.DropConnect.from_linear(linear, p=0.2)
    assert shared.weight is linear.weight and shared.bias is linear.bias and shared.p == 0.2
    no_bias = dnn.DropConnect.from_linear(torch.nn.Linear(6, 3, bias=False))
    assert no_bias.bias is None and no_bias.eval()(torch.randn(2, 6)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# dropout_add


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [None, (33,), (1, 33), (7, 1)], ids=["no-bias", "H", "1xH", "per-row"])
def test_dropout_add_equals_its_definition(dtype, bias_shape, poisoned_empty_like):
    x = torch.randn(7, 33, dtype=dtype, requires_grad=True)
    residual = torch.randn(7, 33, dtype=dtype, requires_grad=True)
    bias = torch.randn(bias_shape, dtype=dtype, requires_grad=True) if bias_shape else None
    dy = torch.randn(7, 33, dtype=dtype)
    p = 0.3
    fused = DF.dropout_add(x, residual, p, bias=bias, generator=torch.Generator().manual_seed(18))
    fused.backward(dy)
    grads = [t.grad.clone() for t in (x, residual, bias) if t is not None]
    for t in (x, residual, bias):
        if t is not None:
            t.grad = None
    biased = x if bias is None else x + bias
    unfused = residual + DF.dropout(biased, p, generator=torch.Generator().manual_seed(18))
    unfused.backward(dy)
    tol = {} if dtype in (torch.float32, torch.float64) else {"rtol": 1e-2, "atol": 1e-2}
    if tol:
        torch.testing.assert_close(fused, unfused, **tol)
    else:
        assert torch.equal(fused, unfused)
    for g, t in zip(grads, [t for t in (x, residual, bias) if t is not None]):
        torch.testing.assert_close(g, t.grad, **(tol or {"rtol": 1e-6, "atol": 1e-6}))


def test_dropout_add_in_eval_and_with_p_zero():
    x, r, b = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)
    assert torch.equal(DF.dropout_add(x, r, 0.5, training=False, bias=b), r + (x + b))
    assert torch.equal(DF.dropout_add(x, r, 0.0, bias=b), r + (x + b))


def test_dropout_add_saves_one_bit_per_element():
    saved = []
    x = torch.randn(1 << 18, requires_grad=True)
    r = torch.randn(1 << 18, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        DF.dropout_add(x, r, 0.5)
    assert sum(t.numel() * t.element_size() for t in saved) <= x.numel() / 8 + 64


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        DF.dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        DF.dropout([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="layout"):
        DF.dropout(torch.randn(4, 4).to_sparse(), 0.5)
    with pytest.raises(ValueError, match="residual has shape"):
        DF.dropout_add(x, torch.randn(4, 6), 0.5)
    with pytest.raises(ValueError, match="residual has dtype"):
        DF.dropout_add(x, torch.randn(4, 5, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="residual is on meta"):
        DF.dropout_add(x, torch.randn(4, 5, device="meta"), 0.5)
    with pytest.raises(ValueError, match="bias of shape"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=torch.randn(3))
    with pytest.raises(ValueError, match="bias is on meta"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=torch.randn(5, device="meta"))


# ---------------------------------------------------------------------------------------------
# CUDA: the same seed gives the same mask as on the CPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_cuda_masks_equal_cpu_masks(dtype, device):
    x = torch.randn(3, 1001, dtype=dtype)
    r = torch.randn_like(x)
    cpu = DF.dropout_add(x, r, 0.3, generator=torch.Generator().manual_seed(19))
    gpu = DF.dropout_add(x.to(device), r.to(device), 0.3, generator=torch.Generator().manual_seed(19))
    assert torch.equal(cpu, gpu.cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(20)
        a = DF.dropout(x, 0.6)
        torch.manual_seed(20)
        b = DF.dropout(x.to(device), 0.6)
    assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("inplace", [False, True])
def test_forward_without_grad_draws_the_same_values(inplace):
    """Without autograd (no_grad, or no input that requires grad) the forward skips the mask: same values."""
    x = LAYOUTS["strided_slice"](torch.randn(2, 3, 5, 7))
    r, b = torch.randn(x.shape), torch.randn(7)
    with_grad = DF.dropout(x.clone().requires_grad_(), 0.3, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        target = x.clone() if inplace else x
        y = DF.dropout(target, 0.3, inplace=inplace, generator=torch.Generator().manual_seed(22))
    assert (y is target) == inplace
    assert torch.equal(y, with_grad.detach())
    def gen(seed):
        return torch.Generator().manual_seed(seed)

    fused = DF.dropout_add(x.contiguous().requires_grad_(), r, 0.3, bias=b, generator=gen(23))
    plain = DF.dropout_add(x.contiguous(), r, 0.3, bias=b, generator=gen(23))
    assert plain.grad_fn is None and torch.equal(plain, fused.detach())
