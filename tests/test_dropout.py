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
from helpers.devices import DEVICES, requires_cuda, supported_isas

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


def reference_words(numel, seed, offset=0, start=0):
    """The Philox words of elements start, ..., start + numel - 1."""
    first_group = start // 4
    groups = np.arange(first_group, (start + numel + 3) // 4, dtype=np.uint64)
    words = philox4x32_10((groups & _MASK32, groups >> np.uint64(32), np.full_like(groups, offset & 0xFFFFFFFF),
                           np.full_like(groups, offset >> 32)), (seed & 0xFFFFFFFF, seed >> 32))
    skip = start - 4 * first_group
    return np.stack(words, axis=1).reshape(-1)[skip:skip + numel]


def reference_keep(numel, seed, p, offset=0, start=0):
    """Kept elements (of start, ..., start + numel - 1): Philox word below round((1 - p) * 2^32), capped at
    2^32 - 1."""
    threshold = min(round((1.0 - p) * 2.0**32), 2**32 - 1)
    return torch.from_numpy(reference_words(numel, seed, offset, start) < threshold)


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


def expected_dropout_add(x, residual, bias, keep, p):
    """residual + drop(x + bias) in the math type, rounded once to x's dtype; bias: x.shape[-1] values."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.to(math_dtype) + (0 if bias is None else bias.to(math_dtype))
    return (residual.to(math_dtype) + torch.where(keep.to(x.device), v / (1.0 - p), v * 0)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("isa", supported_isas())
def test_forward_and_backward_bits_do_not_depend_on_isa_or_threads(isa, num_threads, dtype, restore_cpu_isa,
                                                                   restore_num_threads):
    """Every ISA variant on 1 to 3 threads (which split the tensor in the middle of bias rows) gives the
    reference's mask words and values bit for bit, for the fused residual + bias forward and the backward."""
    _C.set_cpu_isa(isa)
    torch.set_num_threads(num_threads)
    rows, columns, p, seed, offset = 99, 1001, 0.35, 0xC0FFEE123, 5  # 99099 elements: 3 threads' worth
    gen = torch.Generator().manual_seed(24)
    x, residual, dy = (torch.randn(rows, columns, generator=gen).to(dtype) for _ in range(3))
    bias = torch.randn(columns, generator=gen).to(dtype)
    y = torch.full_like(x, math.nan)
    mask = torch.full((_dropout.mask_words(x.numel()),), -1, dtype=torch.int32)
    _dropout.draw(x, 1 - p, 1 - p, seed, offset, out=y, residual=residual, bias=bias, mask=mask)
    keep = reference_keep(x.numel(), seed, p, offset)
    assert torch.equal(unpack_mask(mask, x.numel()), keep)
    assert torch.equal(y, expected_dropout_add(x, residual, bias, keep.view(rows, columns), p))
    dx = _dropout.apply_mask(dy, mask, 1 - p)
    assert torch.equal(dx, expected_dropout(dy, keep.view(rows, columns), p))


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
    "misaligned": lambda x: x.new_empty(x.numel() + 3).narrow(0, 3, x.numel()).view(x.shape).copy_(x),
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
@pytest.mark.parametrize("shape, bias_shape", [
    ((7, 33), None), ((7, 33), (33,)), ((7, 33), (1, 33)), ((7, 33), (7, 1)),
    ((7, 7), (7, 1)), ((7, 7), (1, 7)), ((3, 7, 7), (7, 1)), ((3, 7, 7), (3, 1, 7)),
], ids=["no-bias", "H", "1xH", "per-row", "per-row-square", "1xH-square", "per-row-3d", "per-sample"])
def test_dropout_add_equals_its_definition(dtype, shape, bias_shape, poisoned_empty_like):
    """A per-row (7, 1) bias on a (7, 7) input has as many values as a row: it must still go by rows."""
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, dtype=dtype, requires_grad=True)
    bias = torch.randn(bias_shape, dtype=dtype, requires_grad=True) if bias_shape else None
    dy = torch.randn(shape, dtype=dtype)
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
# Bad input: torch's exception where torch has the function (danlu's message names the argument), a clear one
# elsewhere; raised before anything changes (inplace inputs and the generator's state stay as they were).

FAMILY_SHAPES = {"dropout": (4, 5), "dropout1d": (2, 3, 4), "dropout2d": (2, 3, 4, 5), "dropout3d": (2, 3, 2, 4, 5),
                 "dropout_add": (4, 5), "drop_path": (4, 5)}
TORCH_FUNCTIONS = {"dropout": F.dropout, "dropout1d": F.dropout1d, "dropout2d": F.dropout2d, "dropout3d": F.dropout3d}
MODULES = {"Dropout": (dnn.Dropout, (4, 5)), "Dropout1d": (dnn.Dropout1d, (2, 3, 4)),
           "Dropout2d": (dnn.Dropout2d, (2, 3, 4, 5)), "Dropout3d": (dnn.Dropout3d, (2, 3, 2, 4, 5)),
           "DropPath": (dnn.DropPath, (4, 5))}


def call_family(name, x, p=0.5, training=True, **kwargs):
    """danlu.functional.<name>(x, p, training, **kwargs); dropout_add gets a residual like x."""
    if name == "dropout_add":
        residual = x.clone() if isinstance(x, torch.Tensor) else torch.randn(4, 5)
        return DF.dropout_add(x, residual, p, training, **kwargs)
    return getattr(DF, name)(x, p, training, **kwargs)


def torch_raises(fn):
    """The exception class fn raises (None if it returns)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (any class: the tests compare it)
        return type(e)
    return None


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_p_as_a_0d_tensor_is_its_value(name, p_dtype):
    """torch's dropout functions take p as a 0-d tensor (read with .item()); so does every danlu function."""
    x = torch.rand(FAMILY_SHAPES[name]) + 0.5
    p = torch.tensor(0.3, dtype=p_dtype)
    want = call_family(name, x, float(p), generator=torch.Generator().manual_seed(30))
    got = call_family(name, x, p, generator=torch.Generator().manual_seed(30))
    assert torch.equal(got, want) and not torch.equal(got, x)
    if name in TORCH_FUNCTIONS:
        TORCH_FUNCTIONS[name](x, p)  # accepted by torch too
    identity = call_family(name, x, 0.0)  # (x itself, or x + residual for dropout_add)
    for zero in (torch.tensor(0), torch.tensor(False)):  # integer and bool 0-d tensors, as torch takes them
        assert torch.equal(call_family(name, x, zero), identity)


@pytest.mark.parametrize("name", list(MODULES) + ["DropConnect"])
def test_modules_take_p_as_a_0d_tensor(name):
    if name == "DropConnect":
        def make(p):
            torch.manual_seed(31)
            return dnn.DropConnect(5, 3, p=p)
        x = torch.randn(4, 5)
    else:
        cls, shape = MODULES[name]
        make, x = cls, torch.rand(shape) + 0.5
    torch.manual_seed(32)
    want = make(0.3)(x)
    torch.manual_seed(32)
    got = make(torch.tensor(0.3))(x)
    assert torch.equal(got, want)


P_TENSORS = {
    "two-elements": (torch.tensor([0.5, 0.2]), RuntimeError),
    "no-elements": (torch.tensor([]), RuntimeError),
    "1-d-one-element": (torch.tensor([0.5]), TypeError),
    "requires-grad": (torch.tensor(0.5, requires_grad=True), TypeError),
    "complex": (torch.tensor(0.5 + 0j), TypeError),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p_kind", list(P_TENSORS))
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_p_tensors_torch_refuses_are_refused_like_torch(name, p_kind, training):
    """The same exception class as torch's dropout functions, in training and in eval, naming p."""
    p, error = P_TENSORS[p_kind]
    x = torch.randn(FAMILY_SHAPES[name])
    if name in TORCH_FUNCTIONS and p_kind != "complex":  # (torch's message for a complex p is an unrelated one)
        assert torch_raises(lambda: TORCH_FUNCTIONS[name](x, p, training)) is error
    with pytest.raises(error, match="p must be"):
        call_family(name, x, p, training)


@pytest.mark.parametrize("p", ["0.5", None, [0.5], 0.5j, np.array(0.5)],
                         ids=["str", "None", "list", "complex", "ndarray"])
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_p_that_is_not_a_number_is_a_type_error(name, p):
    x = torch.randn(FAMILY_SHAPES[name])
    if name in TORCH_FUNCTIONS:
        assert torch_raises(lambda: TORCH_FUNCTIONS[name](x, p)) is TypeError
    with pytest.raises(TypeError, match="p must be"):
        call_family(name, x, p)


@pytest.mark.parametrize("p", [-0.1, 1.5, math.nan, torch.tensor(1.5), torch.tensor(math.nan)],
                         ids=["negative", "above-one", "nan", "tensor-above-one", "tensor-nan"])
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_p_outside_the_unit_interval_is_a_value_error_in_every_function(name, p):
    """torch raises ValueError, except for NaN, which slips past its Python check to a RuntimeError from ATen
    with the same message: danlu raises ValueError for all."""
    with pytest.raises(ValueError, match="between 0 and 1"):
        call_family(name, torch.randn(FAMILY_SHAPES[name]), p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        call_family(name, torch.randn(FAMILY_SHAPES[name]), p, training=False)


@pytest.mark.parametrize("generator", ["seed", 123, torch.tensor(1)], ids=["str", "int", "tensor"])
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_generator_that_is_not_a_generator_changes_nothing(name, generator):
    x = torch.rand(FAMILY_SHAPES[name]) + 0.5
    before, rng = x.clone(), torch.get_rng_state()
    kwargs = {} if name in ("dropout_add", "drop_path") else {"inplace": True}
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        call_family(name, x, 0.5, generator=generator, **kwargs)
    assert torch.equal(x, before) and torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("training", [1, None, torch.tensor(True)], ids=["int", "None", "tensor"])
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_training_that_is_not_a_bool_is_a_type_error(name, training):
    x = torch.randn(FAMILY_SHAPES[name])
    if name in TORCH_FUNCTIONS:
        assert torch_raises(lambda: TORCH_FUNCTIONS[name](x, 0.5, training)) is TypeError
    with pytest.raises(TypeError, match="training must be a bool"):
        call_family(name, x, 0.5, training)


@pytest.mark.parametrize("x", [[1.0, 2.0], None, 3.0], ids=["list", "None", "float"])
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_input_that_is_not_a_tensor_is_a_type_error(name, x):
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        call_family(name, x, 0.5)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        call_family(name, x, 0.5, training=False)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_unsupported_dtypes_fail_in_training_and_pass_through_where_nothing_is_dropped(name, dtype):
    """torch raises (RuntimeError or NotImplementedError) when it would draw a mask for such a tensor and
    returns it as it is in eval, with p = 0 or with no elements; danlu raises a TypeError naming the dtype, and
    returns the input in the same cases (dropout_add, danlu's own, checks its tensors in every mode)."""
    x = torch.ones(FAMILY_SHAPES[name], dtype=dtype)
    if name in TORCH_FUNCTIONS:
        assert torch_raises(lambda: TORCH_FUNCTIONS[name](x, 0.5)) is not None
        assert TORCH_FUNCTIONS[name](x, 0.5, False) is x
    with pytest.raises(TypeError, match=f"dtype {dtype}"):
        call_family(name, x, 0.5)
    if name == "dropout_add":
        with pytest.raises(TypeError, match=f"dtype {dtype}"):
            call_family(name, x, 0.5, training=False)
        return
    assert call_family(name, x, 0.5, training=False) is x
    assert call_family(name, x, 0.0) is x
    empty = torch.ones((0,) + FAMILY_SHAPES[name][1:], dtype=dtype)
    assert call_family(name, empty, 0.5) is empty


INPLACE_FUNCTIONS = ["dropout", "dropout1d", "dropout2d", "dropout3d"]


@pytest.mark.parametrize("view", [False, True], ids=["leaf", "view-of-leaf"])
@pytest.mark.parametrize("name", INPLACE_FUNCTIONS)
def test_inplace_on_a_leaf_that_requires_grad_changes_nothing(name, view):
    """torch's error for an in-place op on a leaf (or a view of one) that requires grad, raised before the
    kernel writes into it or a key is drawn."""
    leaf = (torch.rand((3,) + FAMILY_SHAPES[name][1:]) + 0.5).requires_grad_()
    target = (lambda: leaf[1:]) if view else (lambda: leaf)
    message = "a view of a leaf Variable" if view else "a leaf Variable that requires grad"
    with pytest.raises(RuntimeError, match=message):
        TORCH_FUNCTIONS[name](target(), 0.5, inplace=True)
    before, rng = leaf.detach().clone(), torch.get_rng_state()  # (torch draws its mask before it raises)
    with pytest.raises(RuntimeError, match=message):
        getattr(DF, name)(target(), 0.5, inplace=True)
    assert torch.equal(leaf.detach(), before) and torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():  # where torch allows it, so does danlu
        assert getattr(DF, name)(target(), 0.5, inplace=True) is not None
    assert not torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("name", INPLACE_FUNCTIONS)
def test_inplace_on_an_expanded_tensor_changes_nothing(name):
    """Elements that share memory cannot be dropped one by one: torch raises, and so does danlu, before it
    writes anything."""
    shape = FAMILY_SHAPES[name]
    base = torch.rand((1,) + shape[1:]) + 0.5
    before, rng = base.clone(), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        TORCH_FUNCTIONS[name](base.expand(shape), 0.5, inplace=True)
    torch.set_rng_state(rng)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        getattr(DF, name)(base.expand(shape), 0.5, inplace=True)
    assert torch.equal(base, before) and torch.equal(torch.get_rng_state(), rng)
    y = getattr(DF, name)(base.expand(shape), 0.5)  # out of place, an expanded input is fine
    assert y.shape == shape and torch.equal(base, before)


@pytest.mark.parametrize("name", INPLACE_FUNCTIONS)
def test_inplace_on_an_inference_tensor_fails_like_torch(name):
    """torch raises (after it has written into the tensor); danlu raises before."""
    with torch.inference_mode():
        x, for_torch = torch.rand(FAMILY_SHAPES[name]) + 0.5, torch.rand(FAMILY_SHAPES[name]) + 0.5
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        TORCH_FUNCTIONS[name](for_torch, 0.5, inplace=True)
    before = x.clone()
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        getattr(DF, name)(x, 0.5, inplace=True)
    assert torch.equal(x, before)
    with torch.inference_mode():
        assert getattr(DF, name)(x, 0.5, inplace=True) is x


def test_p_checks_trace_under_torch_compile():
    """The checks of p (including a p that torch.compile makes symbolic once it varies) trace without graph
    breaks and draw the eager masks."""
    compiled = torch.compile(lambda x, p: DF.dropout(x, p), backend="aot_eager", fullgraph=True)
    x = torch.randn(1000)
    for p in (0.3, 0.4, 0.5):
        torch.manual_seed(34)
        got = compiled(x, p)
        torch.manual_seed(34)
        assert torch.equal(got, DF.dropout(x, p))


def test_drop_path_on_a_0d_tensor():
    x = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="drop_path: input must have a batch dimension"):
        DF.drop_path(x, 0.5, training=True)
    with pytest.raises(RuntimeError, match="batch dimension"):
        dnn.DropPath(0.5).train()(x)
    assert DF.drop_path(x, 0.5, training=False) is x
    assert DF.drop_path(torch.tensor([2.0]), 1.0, training=True).shape == (1,)


def test_dropout_add_needs_a_residual_tensor():
    x = torch.randn(4, 5)
    for residual in (None, 1.0, [0.0] * 5):
        with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
            DF.dropout_add(x, residual, 0.5)
        with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
            DF.dropout_add(x, residual, 0.5, training=False)


def test_dropout_add_checks_its_tensors():
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="layout"):
        DF.dropout(torch.randn(4, 4).to_sparse(), 0.5)
    with pytest.raises(TypeError, match="residual must be a dense"):
        DF.dropout_add(x, torch.randn(4, 5).to_sparse(), 0.5)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=[0.0] * 5)
    with pytest.raises(TypeError, match="bias must be a dense"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=torch.randn(5).to_sparse())
    with pytest.raises(ValueError, match="residual has shape"):
        DF.dropout_add(x, torch.randn(4, 6), 0.5)
    with pytest.raises(ValueError, match="residual has shape"):
        DF.dropout_add(x, torch.randn(5), 0.5)  # (broadcasting residuals are not taken: the output is x's shape)
    with pytest.raises(ValueError, match="residual has dtype"):
        DF.dropout_add(x, torch.randn(4, 5, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="residual is on meta"):
        DF.dropout_add(x, torch.randn(4, 5, device="meta"), 0.5)
    with pytest.raises(ValueError, match="bias of shape"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=torch.randn(3))
    with pytest.raises(ValueError, match="bias has dtype"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=torch.randn(5, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias is on meta"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5, bias=torch.randn(5, device="meta"))


@pytest.mark.parametrize("bias", [None, torch.tensor(0.25)], ids=["none", "0-d"])
def test_dropout_add_on_a_0d_input(bias):
    x, residual = torch.tensor(3.0), torch.tensor(-1.0)
    y = DF.dropout_add(x, residual, 0.5, bias=bias, generator=torch.Generator().manual_seed(33))
    kept = bool(reference_keep(1, seed_of(33), 0.5)[0])
    biased = 3.0 + (0.0 if bias is None else 0.25)
    assert y.shape == () and float(y) == (biased / 0.5 if kept else 0.0) - 1.0
    with pytest.raises(ValueError, match="does not broadcast"):  # it would make the output (1,)
        DF.dropout_add(x, residual, 0.5, bias=torch.tensor([0.25]))


# ---------------------------------------------------------------------------------------------
# CUDA: the same seed gives the same masks, outputs and grads as on the CPU, bit for bit (docs/design.md principles 2
# and 4). These cases skip without a GPU; DANLU_REQUIRE_CUDA=1 makes the skips failures.

CUDA = [pytest.param("cuda", id="cuda", marks=requires_cuda)]
# Around every vector (2-8 elements), Philox block (4), mask word (32), warp tile (256-1024) and block
# (2048-8192 elements) boundary of every dtype, and a few blocks' worth.
CUDA_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 33, 127, 128, 129, 255, 256, 257, 511, 513, 1023, 1024, 1025, 2047, 2049,
              4095, 4096, 4097, 8191, 8193, 70001, (1 << 20) + 3]


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("residual, bias_size", [(False, 0), (True, 0), (True, 1), (True, 7), (True, 33), (True, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", CUDA)
def test_cuda_kernels_equal_the_cpu_kernels(device, dtype, residual, bias_size, poisoned_empty_like):
    """The native forward (with residual and bias) and backward under every public function: the mask words,
    outputs and grads the CPU kernels write, and the reference's mask. Outputs start NaN and mask words all ones,
    so memory a kernel leaves unwritten shows."""
    rng = np.random.default_rng(46)
    for numel in CUDA_SIZES:
        seed, offset, p = int(rng.integers(2**63 - 1)), int(rng.integers(3)), float(rng.uniform(0.05, 0.95))
        x, r, dy = (torch.randn(numel).to(dtype) for _ in range(3))
        bias = torch.randn(bias_size).to(dtype) if bias_size else None
        results = []
        for dev in ("cpu", device):
            y = torch.full((numel,), math.nan, dtype=dtype, device=dev)
            mask = torch.full((_dropout.mask_words(numel),), -1, dtype=torch.int32, device=dev)
            _dropout.draw(x.to(dev), 1 - p, 1 - p, seed, offset, out=y, residual=r.to(dev) if residual else None,
                          bias=None if bias is None else bias.to(dev), mask=mask)
            dx = _dropout.apply_mask(dy.to(dev), mask, 1 - p)
            results.append([t.cpu() for t in (y, mask, dx)])
        (y_cpu, mask_cpu, dx_cpu), (y_gpu, mask_gpu, dx_gpu) = results
        assert torch.equal(unpack_mask(mask_gpu, numel), reference_keep(numel, seed, p, offset)), numel
        assert torch.equal(mask_gpu, mask_cpu), numel
        assert torch.equal(y_gpu, y_cpu), numel
        assert torch.equal(dx_gpu, dx_cpu), numel


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
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", CUDA)
def test_cuda_layouts_and_inplace_equal_the_cpu(device, dtype, layout, inplace):
    """Contiguous, channels_last, transposed, misaligned and non-dense inputs, in place, or out of place with
    the backward: CUDA gives the CPU's values, strides and grads."""
    base = torch.randn(4, 6, 33, 17).to(dtype)
    dy = torch.randn(LAYOUTS[layout](base).shape).to(dtype)
    results = []
    for dev in ("cpu", device):
        x = LAYOUTS[layout](base.to(dev, copy=True))
        if inplace:
            y = DF.dropout(x, 0.4, inplace=True, generator=gen(47))
            assert y is x
            results.append((y.cpu(), y.stride(), None))
        else:
            x.requires_grad_()
            y = DF.dropout(x, 0.4, generator=gen(47))
            y.backward(dy.to(dev))
            results.append((y.detach().cpu(), y.stride(), x.grad.cpu()))
    (y_cpu, strides_cpu, grad_cpu), (y_gpu, strides_gpu, grad_gpu) = results
    assert torch.equal(y_gpu, y_cpu) and strides_gpu == strides_cpu
    assert inplace or torch.equal(grad_gpu, grad_cpu)


@pytest.mark.parametrize("device", CUDA)
def test_cuda_inplace_on_a_non_leaf_backpropagates_the_mask(device):
    w = torch.randn(4099, device=device, requires_grad=True)
    h = w * 2
    y = DF.dropout(h, 0.5, inplace=True, generator=gen(57))
    assert y is h
    y.sum().backward()
    keep = reference_keep(w.numel(), seed_of(57), 0.5)
    assert torch.equal(w.grad.cpu(), torch.where(keep, torch.tensor(2.0) / 0.5, torch.tensor(0.0)))


@pytest.mark.parametrize("offsets", [(1, 0), (0, 1), (3, 5), (2, 2), (7, 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", CUDA)
def test_cuda_misaligned_storage_offsets(device, dtype, offsets):
    """Inputs that start 1 to 7 elements into their storage (not 16-byte aligned), x and residual differently,
    and in place on such an input: the CPU's values."""
    x, r = torch.randn(257, 65).to(dtype), torch.randn(257, 65).to(dtype)
    bias = torch.randn(65).to(dtype)

    def at_offset(t, offset, dev):
        return torch.empty(t.numel() + offset, dtype=t.dtype, device=dev).narrow(0, offset, t.numel()).view(t.shape) \
            .copy_(t)

    results = []
    for dev in ("cpu", device):
        xs, rs = at_offset(x, offsets[0], dev), at_offset(r, offsets[1], dev)
        fused = DF.dropout_add(xs, rs, 0.3, bias=bias.to(dev), generator=gen(48))
        inplace = DF.dropout(xs, 0.3, inplace=True, generator=gen(49))
        assert inplace is xs
        results.append((fused.cpu(), xs.cpu()))
    assert all(torch.equal(g, c) for g, c in zip(results[1], results[0]))


@pytest.mark.parametrize("shape, bias_shape, channels_last", [
    ((257, 1000), (1000,), False), ((64, 33), (33,), False), ((31, 7), None, False), ((8, 5, 7), (5, 1), False),
    ((4099,), (4099,), False), ((3, 1), (1,), False), ((4, 6, 9, 11), None, True), ((4, 6, 9, 11), (11,), True),
], ids=["wide", "odd-H", "no-bias", "per-row", "1-d", "H=1", "channels-last", "channels-last-bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", CUDA)
def test_cuda_dropout_add_forward_and_backward_equal_the_cpu(device, dtype, shape, bias_shape, channels_last):
    """Values and the grads of x and residual bit for bit. The bias grad is torch's own reduction of the (equal)
    grad of x, in another order on each device: on both, its error against a float64 sum stays within the bound
    of any summation order of those values in the accumulation type, plus the rounding to the dtype."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    r, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    bias = torch.randn(bias_shape).to(dtype) if bias_shape else None
    results = []
    for dev in ("cpu", device):
        xl, rl = x.to(dev, copy=True).requires_grad_(), r.to(dev, copy=True).requires_grad_()
        bl = None if bias is None else bias.to(dev, copy=True).requires_grad_()
        y = DF.dropout_add(xl, rl, 0.3, bias=bl, generator=gen(50))
        y.backward(dy.to(dev))
        results.append([t.cpu() for t in (y.detach(), xl.grad, rl.grad)] + [None if bl is None else bl.grad.cpu()])
    (y_cpu, dx_cpu, dr_cpu, db_cpu), (y_gpu, dx_gpu, dr_gpu, db_gpu) = results
    assert torch.equal(y_gpu, y_cpu) and torch.equal(dx_gpu, dx_cpu) and torch.equal(dr_gpu, dr_cpu)
    if bias is not None:
        padded = (1,) * (len(shape) - len(bias_shape)) + tuple(bias_shape)
        reduced = [d for d, n in enumerate(padded) if n == 1]  # the dimensions the bias is broadcast along
        terms = dx_cpu.double()
        exact = terms.sum(reduced, keepdim=True).reshape(bias_shape) if reduced else terms.reshape(bias_shape)
        magnitude = terms.abs().sum(reduced, keepdim=True).reshape(bias_shape) if reduced else exact.abs()
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        count = dx_cpu.numel() // bias.numel()
        allowed = count * torch.finfo(accumulate).eps * magnitude + torch.finfo(dtype).eps * exact.abs()
        for db in (db_cpu, db_gpu):
            assert bool(((db.double() - exact).abs() <= allowed).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", CUDA)
def test_cuda_channel_and_sample_dropout_equal_the_cpu(device, dtype):
    x = (torch.rand(8, 6, 5, 7) + 0.5).to(dtype)
    calls = [lambda t, g: DF.dropout2d(t, 0.3, generator=g), lambda t, g: DF.drop_path(t, 0.3, True, generator=g),
             lambda t, g: DF.dropout1d(t.flatten(2), 0.3, generator=g),
             lambda t, g: DF.dropout3d(t.unsqueeze(2), 0.3, generator=g)]
    for call in calls:
        assert torch.equal(call(x.to(device), gen(51)).cpu(), call(x, gen(51)))


@pytest.mark.parametrize("device", CUDA)
def test_cuda_calls_run_on_the_current_stream(device):
    """Forward and backward on a side stream whose input is written only after a ~25 ms sleep on that stream:
    a kernel launched on any other stream would read the input before it is written."""
    n = (1 << 20) + 5
    x_cpu, r_cpu, dy_cpu = torch.rand(n) + 0.5, torch.randn(n), torch.randn(n)
    want = DF.dropout_add(x_cpu.requires_grad_(), r_cpu, 0.3, bias=None, generator=gen(52))
    want.backward(dy_cpu)
    sources = [t.detach().to(device) for t in (x_cpu, r_cpu, dy_cpu)]
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x, r, dy = (t * 1 for t in sources)  # written on the side stream, after the sleep
        x.requires_grad_()
        y = DF.dropout_add(x, r, 0.3, generator=gen(52))
        y.backward(dy)
        y2 = DF.dropout(x.detach() * 1, 0.3, generator=gen(53))
    torch.cuda.current_stream(device).wait_stream(side)
    assert torch.equal(y.detach().cpu(), want.detach())
    assert torch.equal(x.grad.cpu(), x_cpu.grad)
    assert torch.equal(y2.cpu(), DF.dropout(x_cpu.detach(), 0.3, generator=gen(53)))


@pytest.mark.parametrize("device", CUDA)
def test_cuda_generator_and_cuda_p(device):
    """A CUDA generator gives the key it draws on its device, for CPU and CUDA inputs alike; p as a 0-d CUDA
    tensor is read like torch reads it."""
    x = torch.rand(10007) + 0.5
    key = int(torch.randint(2**63 - 1, (), dtype=torch.int64, device=device,
                            generator=torch.Generator(device=device).manual_seed(54)))
    want = expected_dropout(x, reference_keep(x.numel(), key, 0.4), 0.4)
    for dev in ("cpu", device):
        y = DF.dropout(x.to(dev), 0.4, generator=torch.Generator(device=device).manual_seed(54))
        assert torch.equal(y.cpu(), want)
    p = torch.tensor(0.4, device=device)
    F.dropout(x.to(device), p)  # torch takes it too
    for dev in ("cpu", device):
        assert torch.equal(DF.dropout(x.to(dev), p, generator=gen(55)).cpu(), DF.dropout(x, 0.4, generator=gen(55)))


@pytest.mark.parametrize("device", CUDA)
def test_cuda_residual_and_bias_on_another_device_are_refused(device):
    x = torch.randn(4, 5, device=device)
    with pytest.raises(ValueError, match="residual is on cpu but the input is on cuda"):
        DF.dropout_add(x, torch.randn(4, 5), 0.5)
    with pytest.raises(ValueError, match="bias is on cpu but the input is on cuda"):
        DF.dropout_add(x, torch.randn(4, 5, device=device), 0.5, bias=torch.randn(5))
    with pytest.raises(ValueError, match="residual is on cuda"):
        DF.dropout_add(x.cpu(), torch.randn(4, 5, device=device), 0.5)


def _free_cuda_bytes(device):
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(torch.device(device))[0]


def _check_slices(numel, seed, p, slices, check):
    """check(lo, hi, keep) for each [lo, hi) of slices, clipped to [0, numel)."""
    for lo, hi in slices:
        lo, hi = max(lo, 0), min(hi, numel)
        if lo < hi:
            check(lo, hi, reference_keep(hi - lo, seed, p, start=lo))


LARGE_NUMEL = (1 << 31) + 1029  # past 2^31, and not a multiple of a vector, a block or a mask word


@pytest.mark.large
@pytest.mark.parametrize("device", CUDA)
def test_cuda_kernels_past_2_31_elements(device):
    """fp32 forward with residual and a bias of 4099 columns, and backward (40 GiB at most): the grid is capped
    there, so warps take a second tile, whose bias columns are followed by additions. Every element against
    torch's arithmetic on the mask's bits; the mask against the reference at the ends, around 2^31 and where
    the second tiles start."""
    if _free_cuda_bytes(device) < 40 << 30:
        pytest.skip("needs 40 GiB of free GPU memory")
    numel, columns, p, seed = LARGE_NUMEL, 4099, 0.3, 0x5EED5EED5EED
    x, r = torch.randn(numel, device=device), torch.randn(numel, device=device)
    bias = torch.randn(columns, device=device)
    mask = torch.full((_dropout.mask_words(numel),), -1, dtype=torch.int32, device=device)
    y = _dropout.draw(x, 1 - p, 1 - p, seed, residual=r, bias=bias, mask=mask)
    dx = _dropout.apply_mask(r, mask, 1 - p)
    assert (int(mask[-1]) & 0xFFFFFFFF) >> (numel % 32) == 0  # no bits past the last element
    chunk = 1 << 27  # (temporaries of a few GiB)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    # A tensor divisor: torch on CUDA multiplies by the reciprocal of a Python number, the kernels divide.
    divisor = torch.tensor(1 - p, device=device)
    for lo in range(0, numel, chunk):
        hi = min(lo + chunk, numel)
        kept = ((mask[lo // 32:(hi + 31) // 32].unsqueeze(1) >> shifts) & 1).flatten()[:hi - lo].bool()
        v = x[lo:hi] + bias[torch.arange(lo, hi, device=device) % columns]
        assert torch.equal(y[lo:hi], r[lo:hi] + torch.where(kept, v / divisor, v * 0)), lo
        assert torch.equal(dx[lo:hi], torch.where(kept, r[lo:hi] / divisor, r[lo:hi] * 0)), lo
        del kept, v
    second_tiles = 524280 * 4096  # blocks_for's cap times the elements of a block (fp32)

    def check(lo, hi, keep):
        assert torch.equal(unpack_mask(mask[lo // 32:(hi + 31) // 32], hi - lo + lo % 32)[lo % 32:], keep), lo

    _check_slices(numel, seed, p, [(0, 8192), ((1 << 31) - 8192, (1 << 31) + 8192),
                                   (second_tiles - 8192, second_tiles + 8192), (numel - 8192, numel)], check)


@pytest.mark.large
@pytest.mark.parametrize("device", CUDA)
def test_cuda_dropout_add_past_2_31_elements(device):
    """bf16 dropout_add with a bias of 4099 columns (17 GiB): forward, mask and backward, slices at the ends and
    around 2^31 against the reference."""
    if _free_cuda_bytes(device) < 20 << 30:
        pytest.skip("needs 20 GiB of free GPU memory")
    columns, p = 4099, 0.2
    rows = -(-LARGE_NUMEL // columns)
    numel = rows * columns
    x = torch.rand(rows, columns, device=device, dtype=torch.bfloat16).add_(0.5).requires_grad_()
    r = torch.randn(rows, columns, device=device, dtype=torch.bfloat16)
    bias = torch.randn(columns, device=device, dtype=torch.bfloat16)
    y = DF.dropout_add(x, r, p, bias=bias, generator=gen(56))
    y.backward(r)
    seed = seed_of(56)
    xf, yf, rf, dxf = x.detach().view(-1), y.detach().view(-1), r.view(-1), x.grad.view(-1)

    def check(lo, hi, keep):
        columns_of = torch.arange(lo, hi, device=device) % columns
        want = expected_dropout_add(xf[lo:hi].cpu(), rf[lo:hi].cpu(), bias[columns_of].cpu(), keep, p)
        assert torch.equal(yf[lo:hi].cpu(), want), lo
        assert torch.equal(dxf[lo:hi].cpu(), expected_dropout(rf[lo:hi].cpu(), keep, p)), lo

    _check_slices(numel, seed, p, [(0, 8192), ((1 << 31) - 8192, (1 << 31) + 8192), (numel - 8192, numel)], check)


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
