"""danlu under torch.compile: models with danlu.nn.BatchNorm2d, BatchNormAct2d, danlu.functional.batch_norm
and the dropout family compile with fullgraph=True (no graph breaks) through the custom ops of danlu/_ops.py,
and give what eager danlu gives: outputs, grads and running statistics over training steps (with parameter
updates in between), then in eval mode; dropout masks are the same for the same seeds. torch.library.opcheck
checks each op's schema, fake implementation and autograd registration."""

from __future__ import annotations

import copy

import pytest
import torch

import danlu
import danlu.functional
import danlu.nn
from danlu._batch_norm import ACTIVATIONS
from helpers.batch_norm import CHANNELS_LAST, CONTIGUOUS, forward_backward, fresh_input, randomize_affine

STEPS = 3  # training steps before the eval step
# aot_eager runs the traced graph op by op: danlu's kernels and torch's ops around them on the same values
# as in eager mode, so every bit must match. inductor fuses and rewrites the torch ops (the running-statistics
# update, the residual's grad) into its own code, which rounds differently.
BITWISE = dict(rtol=0, atol=0)
INDUCTOR_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test compiles from scratch: no test runs on graphs, guards or recompile counts of another."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def run_steps(model, fn, shapes, memory_format, residual):
    """forward_backward's results of fn (the model or a compiled form of it) for each shape in turn: training
    steps, each followed by an SGD step on the model's parameters, then one eval step for the last shape."""
    gen = torch.Generator().manual_seed(0)
    results = []
    for i, shape in enumerate(shapes):
        model.train(i < len(shapes) - 1)
        x64, dy64 = fresh_input(shape, gen), torch.randn(shape, generator=gen, dtype=torch.float64)
        res64 = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
        results.append(forward_backward(fn, model, x64, dy64, res64, dtype=torch.float32, device="cpu",
                                        memory_format=memory_format))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return results


def assert_compiled_matches_eager(model, shapes, memory_format=CONTIGUOUS, residual=False, tol=BITWISE,
                                  **compile_kwargs):
    randomize_affine(model, seed=1)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, **compile_kwargs)
    want = run_steps(model, model, shapes, memory_format, residual)
    got = run_steps(twin, compiled, shapes, memory_format, residual)
    for step, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w)
        for name in w:
            what = f"step {step} ({'eval' if step == len(shapes) - 1 else 'train'}) {name}"
            torch.testing.assert_close(g[name], w[name], **tol, msg=lambda m, what=what: f"{what}: {m}")
            assert g[name].stride() == w[name].stride(), what


MODULES = [
    pytest.param(lambda: danlu.nn.BatchNorm2d(6), CONTIGUOUS, False, id="BatchNorm2d"),
    pytest.param(lambda: danlu.nn.BatchNorm2d(6, momentum=0.3), CHANNELS_LAST, False,
                 id="BatchNorm2d-channels_last"),
    # The cumulative average: the momentum is 1 / num_batches_tracked, a tensor's value inside the graph.
    pytest.param(lambda: danlu.nn.BatchNorm2d(6, momentum=None), CONTIGUOUS, False, id="BatchNorm2d-momentum=None"),
    pytest.param(lambda: danlu.nn.BatchNormAct2d(6, activation="relu"), CONTIGUOUS, True,
                 id="BatchNormAct2d-relu-residual"),
    pytest.param(lambda: danlu.nn.BatchNormAct2d(6, activation="relu"), CHANNELS_LAST, True,
                 id="BatchNormAct2d-relu-residual-channels_last"),
]


@pytest.mark.parametrize("make, memory_format, residual", MODULES)
def test_compiled_module_matches_eager(make, memory_format, residual):
    assert_compiled_matches_eager(make(), [(4, 6, 5, 7)] * (STEPS + 1), memory_format, residual,
                                  backend="aot_eager")


def test_compiled_with_dynamic_shapes_matches_eager():
    """A batch size and spatial size that change every step, traced once with symbolic sizes."""
    shapes = [(4, 6, 5, 7), (3, 6, 5, 7), (5, 6, 4, 9), (2, 6, 3, 3)]
    assert_compiled_matches_eager(danlu.nn.BatchNormAct2d(6, activation="relu"), shapes, CHANNELS_LAST, True,
                                  backend="aot_eager", dynamic=True)


def test_compiled_with_inductor_matches_eager():
    """inductor generates and compiles C++ for the torch ops around danlu's (the running-statistics update,
    the residual's grad): 10 to 20 s on a 2-core CPU with a cold cache."""
    assert_compiled_matches_eager(danlu.nn.BatchNormAct2d(6, activation="relu"), [(4, 6, 5, 7)] * (STEPS + 1),
                                  CONTIGUOUS, True, INDUCTOR_TOL, backend="inductor")


def test_compiled_functional_updates_the_running_stats_it_is_given():
    """danlu.functional.batch_norm on tensors that are inputs of the compiled function, not module buffers:
    the graph mutates them in place as eager does."""
    gen = torch.Generator().manual_seed(3)
    channels = 5

    def fn(x, running_mean, running_var, weight, bias, training):
        return danlu.functional.batch_norm(x, running_mean, running_var, weight, bias, training, 0.2, 1e-3)

    def tensors():
        stats = [torch.zeros(channels), torch.ones(channels)]
        params = [torch.nn.Parameter(torch.linspace(0.5, 1.5, channels)), torch.nn.Parameter(torch.zeros(channels))]
        return stats, params

    runs = {"eager": (fn, *tensors()),
            "compiled": (torch.compile(fn, backend="aot_eager", fullgraph=True), *tensors())}
    for training in (True, True, False):
        x = fresh_input((6, channels, 4), gen).float()
        dy = torch.randn(x.shape, generator=gen)
        results = {}
        for name, (f, stats, params) in runs.items():
            xl = x.clone().requires_grad_()
            f(xl, *stats, *params, training).backward(dy)
            results[name] = [xl.grad, *stats, *(p.grad for p in params)]
            for p in params:
                p.grad = None
        for got, want in zip(results["compiled"], results["eager"]):
            torch.testing.assert_close(got, want, **BITWISE)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck on each op


def _sample(dtype, memory_format, residual, batch_stats, param_dtype=torch.float32, requires_grad=True):
    """Arguments of danlu::batch_norm_forward for a (3, 4, 5, 6) input."""
    gen = torch.Generator().manual_seed(5)
    shape, channels = (3, 4, 5, 6), 4

    def full(requires_grad):
        t = fresh_input(shape, gen).to(dtype).contiguous(memory_format=memory_format)
        return t.requires_grad_(requires_grad)

    x = full(requires_grad)
    res = full(requires_grad) if residual else None
    weight = (1 + 0.5 * torch.randn(channels, generator=gen)).to(param_dtype).requires_grad_(requires_grad)
    bias = torch.randn(channels, generator=gen).to(param_dtype).requires_grad_(requires_grad)
    if batch_stats:
        mean, invstd, _ = torch.ops.danlu.batch_norm_stats(x.detach(), 1e-5)
    else:
        mean, invstd = torch.randn(channels, generator=gen), 0.5 + torch.rand(channels, generator=gen)
    return x, res, weight, bias, mean, invstd, batch_stats


OP_SAMPLES = [
    pytest.param(torch.float32, CONTIGUOUS, False, True, id="fp32-nchw-train"),
    pytest.param(torch.float32, CHANNELS_LAST, True, False, id="fp32-channels_last-residual-eval"),
    pytest.param(torch.bfloat16, CONTIGUOUS, True, True, id="bf16-nchw-residual-train"),
    pytest.param(torch.bfloat16, CHANNELS_LAST, False, True, id="bf16-channels_last-train"),
]


@pytest.mark.parametrize("dtype, memory_format, residual, batch_stats", OP_SAMPLES)
def test_opcheck_forward(dtype, memory_format, residual, batch_stats):
    *tensors, batch_stats = _sample(dtype, memory_format, residual, batch_stats)
    torch.library.opcheck(torch.ops.danlu.batch_norm_forward.default, (*tensors, batch_stats, *ACTIVATIONS["relu"]))


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, CONTIGUOUS), (torch.bfloat16, CHANNELS_LAST),
                                                  (torch.float64, CHANNELS_LAST)])
def test_opcheck_stats(dtype, memory_format):
    x = _sample(dtype, memory_format, False, True, requires_grad=False)[0]
    torch.library.opcheck(torch.ops.danlu.batch_norm_stats.default, (x, 1e-5))


@pytest.mark.parametrize("dtype, memory_format, residual, batch_stats", OP_SAMPLES)
@pytest.mark.parametrize("output_mask", [[True, True, True, True], [False, True, True, False],
                                         [True, False, False, False]])
def test_opcheck_backward(dtype, memory_format, residual, batch_stats, output_mask):
    x, res, weight, bias, mean, invstd, batch_stats = _sample(dtype, memory_format, residual, batch_stats,
                                                              param_dtype=dtype, requires_grad=False)
    dy = torch.randn(x.shape, dtype=dtype)  # contiguous also where x is channels_last: the op takes either
    torch.library.opcheck(torch.ops.danlu.batch_norm_backward.default,
                          (dy, x, res, weight, bias, mean, invstd, batch_stats, *ACTIVATIONS["silu"], output_mask))


def test_op_rejects_a_layout_the_kernels_cannot_read():
    x = torch.randn(4, 3, 5, 6).transpose(2, 3)
    mean, invstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="contiguous, channels_last"):
        torch.ops.danlu.batch_norm_forward(x, None, None, None, mean, invstd, True, *ACTIVATIONS["identity"])



# ---------------------------------------------------------------------------------------------
# Dropout


class DropoutBlock(torch.nn.Module):
    """Every dropout variant in one block: elementwise, fused with a residual and a bias, channels, samples."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.drop, self.drop2d, self.path = danlu.nn.Dropout(0.3), danlu.nn.Dropout2d(0.2), danlu.nn.DropPath(0.25)
        self.bias = torch.nn.Parameter(torch.randn(7))

    def forward(self, x):
        h = self.drop2d(self.conv(x))
        h = danlu.functional.dropout_add(h, self.path(h), 0.4, self.training, bias=self.bias)
        return self.drop(h)


def _dropout_run(fn, model, x, dy):
    model.zero_grad(set_to_none=True)
    xl = x.clone().requires_grad_()
    y = fn(xl)
    y.backward(dy)
    return [y.detach(), xl.grad, *(p.grad for p in model.parameters())]


def test_compiled_dropout_block_draws_the_eager_masks():
    """aot_eager draws each call's Philox key from the default generator in the order eager does: with the same
    torch.manual_seed the compiled block gives eager's outputs and grads bit for bit, step after step, and a
    new key (a new mask) each step without recompiling."""
    model = DropoutBlock()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(6)
    x, dy = torch.randn(4, 3, 5, 7, generator=gen), torch.randn(4, 6, 5, 7, generator=gen)
    torch.manual_seed(7)
    eager = [_dropout_run(model, model, x, dy) for _ in range(3)]
    torch.manual_seed(7)
    traced = [_dropout_run(compiled, model, x, dy) for _ in range(3)]
    for got, want in zip(traced, eager):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **BITWISE)
    assert not torch.equal(eager[0][0], eager[1][0])
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), **BITWISE)


def test_compiled_inplace_dropout_writes_into_its_input():
    def fn(x):
        h = x * 2
        return danlu.functional.dropout(h, 0.5, inplace=True) + 1

    x = torch.randn(1000)
    torch.manual_seed(8)
    want = fn(x)
    torch.manual_seed(8)
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager", fullgraph=True)(x), want, **BITWISE)


@pytest.mark.parametrize("residual, bias, layout", [(False, False, "contiguous"), (True, True, "contiguous"),
                                                    (False, False, "channels_last"), (True, False, "transposed")])
def test_opcheck_dropout(residual, bias, layout):
    x = torch.randn(2, 3, 4, 5)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=CHANNELS_LAST),
         "transposed": x.transpose(1, 3)}[layout].requires_grad_()
    r = torch.randn(x.shape, requires_grad=True) if residual else None
    b = torch.randn(x.shape[-1], requires_grad=True) if bias else None
    seed = torch.tensor(1234)
    torch.library.opcheck(torch.ops.danlu.dropout.default, (x, r, b, 0.7, 0.7, seed))
    _, mask = torch.ops.danlu.dropout(x.detach(), None, None, 0.7, 0.7, seed)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    torch.library.opcheck(torch.ops.danlu.dropout_backward.default, (dy.detach(), mask, 0.7))
