"""The BatchNorm tests' helpers: twin modules, fresh inputs per channel, one forward and backward, and the
comparisons with torch's results."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import danlu.nn
from danlu import _C
from helpers.devices import DANLU_THREADS, num_threads

STEPS = 5  # training steps, each with a fresh input and a fresh output grad, before eval

# Tolerances are derived, never constants: a tensor of ours may be no further from a float64 run of torch's module
# on the same (rounded) inputs than TORCH_FACTOR times torch's own result is, plus a floor of FLOOR_EPS times the
# eps of its dtype times the size of what it is computed from (error_scales): what a correct implementation can
# lose to rounding where torch's own error happens to be smaller.
TORCH_FACTOR = 2.0
FLOOR_EPS = 8

# (dtype of the input, dtype of the module's params and buffers or None for the input's).
FULL_PRECISION = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float64, None, id="fp64"),
]
LOW_PRECISION = [
    pytest.param(torch.bfloat16, torch.float32, id="bf16-input-fp32-params"),
    pytest.param(torch.float16, torch.float32, id="fp16-input-fp32-params"),
    pytest.param(torch.bfloat16, None, id="bf16-input-bf16-params"),
    pytest.param(torch.float16, None, id="fp16-input-fp16-params"),
]
ALL_PRECISIONS = FULL_PRECISION + LOW_PRECISION

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


def error_scales(x64, dy64, res64, eps, batch_stats, weight=None, bias=None, running_mean=None, running_var=None):
    """{name: size of what that tensor is computed from}, in float64, for a forward and backward on x64 with output
    grad dy64 (and res64), normalised with the batch statistics or the running ones (as they are before the step):
    the per-element terms of the normalisation (|x| + |mean|) * invstd * |w| + |b| (+ |residual|) for the output;
    w * invstd * dy, three such terms with batch statistics, for the input grad; dy for the residual grad (the
    activations' slopes are at most about 1); sqrt(count) * dy for the sums over count elements (weight and bias
    grads); x itself for the running mean (a mean of x) and the running var's own size."""
    x64 = torch.where(x64.isfinite(), x64, 0)  # an inf or NaN sizes nothing: where they go is compared exactly
    channels, count = x64.shape[1], x64.numel() // max(x64.shape[1], 1)
    dims = [d for d in range(x64.dim()) if d != 1]
    per_channel = (1, channels) + (1,) * (x64.dim() - 2)
    if batch_stats:
        mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
    else:
        mean, var = running_mean.double(), running_var.double()
    ones = torch.ones(channels, dtype=torch.float64, device=x64.device)
    w = weight.detach().double().abs() if weight is not None else ones
    b = bias.detach().double().abs() if bias is not None else 0 * ones
    scale = (w * (var + eps).rsqrt()).view(per_channel)
    terms = (x64.abs() + mean.abs().view(per_channel)) * scale + b.view(per_channel)
    if res64 is not None:
        terms = terms + res64.abs()

    def rms(t):
        return rms_error(t, torch.zeros_like(t))[0]

    sums = math.sqrt(count) * rms(dy64)
    return {"output": rms(terms), "input.grad": (3 if batch_stats else 1) * rms(scale * dy64),
            "residual.grad": rms(dy64), "weight.grad": sums, "bias.grad": sums, "running_mean": rms(x64),
            "running_var": 0.0}


def module_error_scales(x64, dy64, res64, module):
    """error_scales of a step of a torch BatchNorm module in its current mode and state."""
    batch_stats = module.training or module.running_mean is None
    return error_scales(x64, dy64, res64, module.eps, batch_stats, module.weight, module.bias, module.running_mean,
                        module.running_var)


def assert_no_worse_than_torch(ours, ref, exact, scales, what=""):
    """ours, ref (torch) and exact (torch in float64 on the same inputs): {name: tensor} of the same step. Same names,
    dtypes and shapes as torch's, NaN and inf where torch has them, num_batches_tracked exactly, the output and
    input grad in torch's memory layout; every other value no further from float64 than TORCH_FACTOR times torch's
    own distance plus FLOOR_EPS eps of its dtype times its scale (scales, else the size of the float64 value)."""
    assert sorted(ours) == sorted(ref), f"{what}: compared {sorted(ours)}, torch has {sorted(ref)}"
    for name, e in ref.items():
        a = ours[name]
        if e is None or a is None:
            assert a is None and e is None, f"{what} {name}: ours {a is None and 'None'}, torch {e is None and 'None'}"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, \
            f"{what} {name}: {a.dtype} {tuple(a.shape)}, torch {e.dtype} {tuple(e.shape)}"
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a.cpu(), e.cpu()), f"{what} {name}: {a} vs torch {e}"
            continue
        if name in ("output", "input.grad") and e.numel() > 0:
            assert a.stride() == e.stride(), f"{what} {name}: strides {a.stride()}, torch {e.stride()}"
        a, e, x = (t.detach().cpu().double() for t in (a, e, exact[name]))
        assert torch.equal(a.isnan(), e.isnan()), f"{what} {name}: NaN where torch has none (or the reverse)"
        assert torch.equal(a.isinf() & (a > 0), e.isinf() & (e > 0)) and torch.equal(a.isinf() & (a < 0),
                                                                                     e.isinf() & (e < 0)), \
            f"{what} {name}: inf where torch has none (or the reverse)"
        finite = e.isfinite() & x.isfinite()
        ours_err, size = rms_error(a[finite], x[finite])
        torch_err, _ = rms_error(e[finite], x[finite])
        floor = FLOOR_EPS * torch.finfo(ours[name].dtype).eps * max(scales.get(name, 0.0), size)
        assert ours_err <= TORCH_FACTOR * torch_err + floor, (
            f"{what} {name}: rms distance from float64 {ours_err:.3g}, torch's {torch_err:.3g} (allowed "
            f"{TORCH_FACTOR} x torch's + {floor:.3g}, rms {size:.3g})")


def train_and_compare(ours, ref, shape, *, dtype=torch.float32, device="cpu", memory_format=CONTIGUOUS, view=None,
                      residual=False, activation=None, act_kwargs=None, steps=STEPS, seed=0, eval_steps=2):
    """`steps` training steps then `eval_steps` eval steps, each with fresh x, dy (and residual), inputs rounded to
    `dtype` first; after every step ours, torch's module (ref, followed by the activation where ours has one) and a
    float64 twin of it on the same values are compared (assert_no_worse_than_torch)."""
    gen = torch.Generator().manual_seed(seed)
    exact = float64_twin(ref, device)
    ref_fn = torch_act_reference(ref, activation, act_kwargs) if activation else ref
    exact_fn = torch_act_reference(exact, activation, act_kwargs) if activation else exact
    out_shape = view(torch.empty(shape, device="meta")).shape if view is not None else shape
    for i in range(steps + eval_steps):
        training = i < steps
        for m in (ours, ref, exact):
            m.train(training)
        x64 = fresh_input(shape, gen).to(dtype).double()
        dy64 = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype).double()
        res64 = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype).double() if residual else None
        kw = dict(device=device, memory_format=memory_format, view=view)
        compare_step(ours, ours, ref, ref_fn, x64, dy64, res64, exact=exact, exact_fn=exact_fn, dtype=dtype,
                     what=f"{'train' if training else 'eval'} step {i}", **kw)


def compare_step(ours, ours_fn, ref, ref_fn, x64, dy64, res64=None, *, dtype=torch.float32, device="cpu",
                 memory_format=CONTIGUOUS, view=None, exact=None, exact_fn=None, activation=None, act_kwargs=None,
                 what=""):
    """One forward (ours_fn, ref_fn) and backward of ours and of torch's ref on x64 rounded to dtype, in their
    current modes, compared (assert_no_worse_than_torch) with exact: a float64 twin of ref (made now from ref's
    state unless given), whose forward is exact_fn (default: the module, then the activation)."""
    if exact is None:
        exact = float64_twin(ref, device)
        exact_fn = torch_act_reference(exact, activation, act_kwargs) if activation else exact
    x_seen = view(x64) if view is not None else x64
    scales = module_error_scales(x_seen.to(device), dy64.to(device), None if res64 is None else res64.to(device),
                                 exact)
    kw = dict(device=device, memory_format=memory_format, view=view)
    got = forward_backward(ours_fn, ours, x64, dy64, res64, dtype=dtype, threads=DANLU_THREADS, **kw)
    want = forward_backward(ref_fn, ref, x64, dy64, res64, dtype=dtype, **kw)
    best = forward_backward(exact_fn, exact, x64, dy64, res64, dtype=torch.float64, **kw)
    assert_no_worse_than_torch(got, want, best, scales, what)


def float64_twin(ref, device="cpu"):
    """A float64 copy of a torch BatchNorm: the referee of every comparison."""
    exact = type(ref)(ref.num_features, ref.eps, ref.momentum, ref.affine, ref.track_running_stats,
                      device=device, dtype=torch.float64, bias=ref.bias is not None or not ref.affine)
    exact.load_state_dict(ref.state_dict())
    exact.train(ref.training)
    return exact


# ---------------------------------------------------------------------------------------------
# A model of the native reductions' blocking (csrc/norm/batch_norm_math.h) in NumPy, operation for operation in
# the same float types: what the CPU kernels, and through them the CUDA kernels, must compute bit for bit.

LANES, LANE_STEPS = _C.batch_norm_lanes, _C.batch_norm_lane_steps
BLOCK = LANES * LANE_STEPS


def channel_order(x):
    """[channels, count]: each channel's elements in the order the reductions take them (sample by sample, then the
    spatial positions), the same for every memory format."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]).t()


def _lane_blocks(values, math_dtype):
    """values (a channel, NumPy) as [blocks, LANE_STEPS, LANES] in math_dtype, zeros past the end, the validity of
    each entry and the count of each block."""
    n = len(values)
    blocks = -(-n // BLOCK)
    padded = np.zeros(blocks * BLOCK, dtype=math_dtype)
    padded[:n] = values
    valid = (np.arange(blocks * BLOCK) < n).reshape(blocks, LANE_STEPS, LANES)
    counts = np.minimum(BLOCK, n - np.arange(blocks) * BLOCK)
    return padded.reshape(blocks, LANE_STEPS, LANES), valid, counts


def _lane_sum(terms, valid):
    """Each lane's sum in step order, then the halving tree over lanes: [blocks]."""
    lane = np.zeros(terms.shape[::2], dtype=terms.dtype)
    for k in range(LANE_STEPS):
        lane = lane + np.where(valid[:, k, :], terms[:, k, :], terms.dtype.type(0))
    w = LANES // 2
    while w:
        lane[:, :w] = lane[:, :w] + lane[:, w:2 * w]
        w //= 2
    return lane[:, 0]


def _merge_tree(parts, merge):
    """The aligned pairwise tree over the block partials (a tuple of arrays over blocks): the root."""
    parts = [p.copy() for p in parts]
    n, s = len(parts[0]), 1
    while s < n:
        left = np.arange(0, n - s, 2 * s)
        merged = merge(*(p[left] for p in parts), *(p[left + s] for p in parts))
        for p, m in zip(parts, merged):
            p[left] = m
        s *= 2
    return tuple(p[0] for p in parts)


def _merge_moments(count, mean, m2, count_o, mean_o, m2_o):
    total = count + count_o
    w, w_o = count / total, count_o / total
    delta = mean_o - mean
    return total, mean * w + mean_o * w_o, m2 + m2_o + delta * delta * count * w_o


def model_moments(values, math_dtype):
    """(count, mean, M2) of one channel (NumPy values in its reduction order) as the native stats compute them."""
    if len(values) == 0:
        return 0.0, 0.0, 0.0
    blocks, valid, counts = _lane_blocks(values, math_dtype)
    mean = _lane_sum(blocks, valid) / counts.astype(math_dtype)
    deviations = blocks - mean[:, None, None]
    dev_sum = _lane_sum(deviations, valid).astype(np.float64)
    squares = _lane_sum(deviations * deviations, valid).astype(np.float64)
    n, m = counts.astype(np.float64), mean.astype(np.float64)
    with np.errstate(invalid="ignore"):
        finite = m - m == 0
        m2 = squares - dev_sum * dev_sum / n
        m2 = np.where(finite, np.where(m2 < 0, 0.0, m2), squares)
        m = np.where(finite, m + dev_sum / n, m)
    return _merge_tree((n, m, m2), _merge_moments)


def model_statistics(x, eps):
    """(moments [channels, 3], mean, invstd, var) of x as danlu's native stats compute them."""
    math_dtype = np.float64 if x.dtype == torch.float64 else np.float32
    values = channel_order(x.cpu()).to(torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()
    moments = np.array([model_moments(v, math_dtype) for v in values], dtype=np.float64).reshape(-1, 3)
    count, mean, m2 = moments.T
    with np.errstate(divide="ignore", invalid="ignore"):
        finished = (mean, 1.0 / np.sqrt(m2 / count + eps), m2 / (count - 1))
    return (torch.from_numpy(moments), *(torch.from_numpy(t.astype(math_dtype)) for t in finished))


def model_grad_sums(x, dy, mean, invstd, weight, bias, activation):
    """(sum of dz, sum of dz * xhat) per channel as danlu's native backward reduction computes them, for the
    activations whose derivative is exact in NumPy: identity and relu."""
    math_dtype = np.float64 if x.dtype == torch.float64 else np.float32

    def arr(t):
        return t.detach().cpu().to(torch.float64 if math_dtype == np.float64 else torch.float32).numpy()

    xs, dys = (arr(channel_order(t)) for t in (x, dy))
    mean, invstd, weight, bias = (arr(t) for t in (mean, invstd, weight, bias))
    sums = []
    for c in range(xs.shape[0]):
        xb, valid, _ = _lane_blocks(xs[c], math_dtype)
        dyb, _, _ = _lane_blocks(dys[c], math_dtype)
        centered = xb - mean[c]
        dz = dyb
        if activation == "relu":
            z = centered * (invstd[c] * weight[c]) + bias[c]
            dz = dyb * np.where(z <= 0, math_dtype(0), math_dtype(1))
        parts = (_lane_sum(dz, valid).astype(np.float64),
                 _lane_sum(dz * (centered * invstd[c]), valid).astype(np.float64))
        root = _merge_tree(parts, lambda a, b, a_o, b_o: (a + a_o, b + b_o)) if len(xs[c]) else (0.0, 0.0)
        sums.append(root)
    sums = np.array(sums, dtype=np.float64).reshape(-1, 2).astype(math_dtype)
    return torch.from_numpy(sums[:, 0].copy()), torch.from_numpy(sums[:, 1].copy())
