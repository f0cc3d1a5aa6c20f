"""danlu.optim against torch.optim (foreach=False, or fused=True where GradScaler is involved)."""

import copy
import inspect
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from danlu import _C
from danlu.optim._table import BLOCK_ELEMS, block_first_tensor
from helpers.devices import DEVICES, requires_cuda, supported_isas
from helpers.optim import (
    CONFIGS,
    FULL_PRECISION,
    LOW_PRECISION,
    ODD_SPECS,
    OPTIMIZERS,
    RICH_CONFIGS,
    SMALL_SPECS,
    TORCH_FUSED,
    GradSource,
    Spec,
    assert_bitwise_equal,
    assert_matches,
    assert_optimizers_match,
    assert_same_state_keys,
    assert_steps_equal,
    clone_like,
    config_params,
    make_optimizer,
    make_params,
    scaled_errors,
    set_grads,
    snapshot,
    step,
    tensors_of,
    train,
    twin,
)

RICH = dict(RICH_CONFIGS)


def dtype_params(*dtypes):
    return [pytest.param(d, id=str(d).replace("torch.", "")) for d in dtypes]


ALL_DTYPES = dtype_params(torch.float32, torch.float64, torch.float16, torch.bfloat16)
STEPS = 25


def danlu_and_torch(name, kwargs, params, **torch_kwargs):
    """(danlu optimizer, its params, torch optimizer, its params) on twins of `params`."""
    ours_p, ref_p = twin(params), twin(params)
    return (make_optimizer("danlu", name, ours_p, **kwargs), ours_p,
            make_optimizer("torch", name, ref_p, **kwargs, **torch_kwargs), ref_p)


# ---------------------------------------------------------------------------------------------
# The math, option by option


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol", FULL_PRECISION)
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_matches_torch(name, kwargs, dtype, rtol, device):
    params = make_params(ODD_SPECS, dtype, device)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    train([(ours, ours_p), (ref, ref_p)], GradSource(ODD_SPECS, dtype), STEPS)
    assert_optimizers_match(ours, ours_p, ref, ref_p, rtol)


def mean_error_by_kind(actual, reference):
    errors = {}
    for name, err in scaled_errors(actual, reference).items():
        errors.setdefault(name.split(".", 1)[1] if "." in name else "param", []).append(err)
    return {kind: sum(v) / len(v) for kind, v in errors.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, factor", LOW_PRECISION)
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_low_precision_no_worse_than_torch(name, kwargs, dtype, factor, device):
    """bf16/fp16: our distance from a float64 run of torch is at most `factor` times torch's own."""
    params = make_params(ODD_SPECS, dtype, device)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    exact_p = twin(params, torch.float64)
    exact = make_optimizer("torch", name, exact_p, **kwargs)
    train([(ours, ours_p), (ref, ref_p), (exact, exact_p)], GradSource(ODD_SPECS, dtype), STEPS)

    ours_t, ref_t, exact_t = tensors_of(ours, ours_p), tensors_of(ref, ref_p), tensors_of(exact, exact_p)
    assert_same_state_keys(ours_t, ref_t)
    assert_steps_equal(ours_t, ref_t)
    assert all(ours_t[n].dtype == ref_t[n].dtype for n in ref_t)
    ours_err, torch_err = mean_error_by_kind(ours_t, exact_t), mean_error_by_kind(ref_t, exact_t)
    assert all(math.isfinite(e) for e in torch_err.values()), torch_err
    worse = {k: (ours_err[k], torch_err[k]) for k in torch_err if not ours_err[k] <= factor * torch_err[k]}
    assert not worse, f"(ours, torch) mean relative error vs float64 where ours > {factor}x torch's: {worse}"


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_first_step_writes_every_element(name, kwargs, dtype, poisoned_empty_like):
    """An element the kernel skips keeps its old value (or a staging buffer's NaN): with every grad well
    away from zero and small params, every param and state element must change and be finite."""
    specs = ODD_SPECS + [Spec((5, 7), offset=1, grad="transposed", grad_offset=3),
                         Spec((2, 3, 4, 5), channels_last=True, grad="transposed")]
    params = make_params(specs, dtype, scale=0.1)
    before = [p.detach().clone() for p in params]
    opt = make_optimizer("danlu", name, params, **kwargs)
    set_grads(params, GradSource(specs, dtype, low=0.5)())
    step(opt)
    for i, (p, old) in enumerate(zip(params, before)):
        assert torch.isfinite(p).all() and (p != old).all(), f"param {i} {tuple(p.shape)} has unwritten elements"
        for key, s in opt.state[p].items():
            if key != "step":
                assert torch.isfinite(s).all() and (s != 0).all(), \
                    f"param {i} state {key} has elements the step did not write (zero or not finite)"


LAYOUT_CASES = {
    "misaligned": [Spec((1,), offset=1, grad_offset=3), Spec((7,), offset=1, grad_offset=3),
                   Spec((31,), offset=3, grad_offset=1), Spec((1021,), offset=1, grad_offset=1),
                   Spec((13, 9), offset=3, grad_offset=3), Spec((100003,), offset=3, grad_offset=1)],
    "channels_last": [Spec((2, 3, 4, 5), channels_last=True), Spec((3, 7, 5, 11), channels_last=True),
                      Spec((1, 5, 1, 3), channels_last=True), Spec((7,))],
    "grad_strides_differ": [Spec((5, 7), grad="transposed"), Spec((3, 4, 5), grad="transposed"),
                            Spec((2, 3, 4, 5), channels_last=True, grad="transposed"),
                            Spec((257, 300), grad="transposed"), Spec((31,))],
    "misaligned_grad_strides_differ": [Spec((5, 7), offset=1, grad="transposed", grad_offset=3),
                                       Spec((2, 3, 4, 5), channels_last=True, offset=3, grad="transposed",
                                            grad_offset=1),
                                       Spec((300, 257), offset=1, grad="transposed", grad_offset=1)],
}
LAYOUTS = [pytest.param(specs, id=case) for case, specs in LAYOUT_CASES.items()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("specs", LAYOUTS)
@pytest.mark.parametrize("dtype, rtol", FULL_PRECISION)
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_layouts_match_torch(name, kwargs, dtype, rtol, specs, device, poisoned_empty_like):
    params = make_params(specs, dtype, device)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    assert [p.storage_offset() for p in ours_p] == [s.offset for s in specs]
    train([(ours, ours_p), (ref, ref_p)], GradSource(specs, dtype), STEPS)
    assert_optimizers_match(ours, ours_p, ref, ref_p, rtol)
    # The params and grads keep their own layout.
    assert all(p.stride() == q.stride() for p, q in zip(ours_p, ref_p))
    assert all(p.grad.stride() == q.grad.stride() for p, q in zip(ours_p, ref_p))


@pytest.mark.parametrize("specs", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_layout_does_not_change_results(name, kwargs, dtype, specs):
    """Bitwise equal to the same values laid out contiguously and aligned, in every dtype."""
    plain_specs = [Spec(s.shape) for s in specs]
    laid_out = make_params(specs, dtype)
    plain = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in laid_out]
    opt_laid_out = make_optimizer("danlu", name, laid_out, **kwargs)
    opt_plain = make_optimizer("danlu", name, plain, **kwargs)
    laid_out_grads, plain_grads = GradSource(specs, dtype), GradSource(plain_specs, dtype)
    for _ in range(5):
        set_grads(laid_out, laid_out_grads())
        set_grads(plain, plain_grads())
        step(opt_laid_out)
        step(opt_plain)
    assert_bitwise_equal(snapshot(opt_laid_out, laid_out), snapshot(opt_plain, plain))


@pytest.mark.parametrize("dtype, rtol", [pytest.param(torch.complex64, 2e-6, id="complex64"),
                                         pytest.param(torch.complex128, 1e-12, id="complex128")])
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_complex_matches_torch(name, kwargs, dtype, rtol):
    specs = SMALL_SPECS + [Spec((1021,)), Spec((31,), offset=1, grad_offset=1), Spec((5, 7), grad="transposed")]
    params = make_params(specs, dtype)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    train([(ours, ours_p), (ref, ref_p)], GradSource(specs, dtype), STEPS)
    assert_optimizers_match(ours, ours_p, ref, ref_p, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_many_tensors_match_torch(name, kwargs, device):
    """Hundreds of odd-sized tensors: thread and block boundaries fall at arbitrary places in them."""
    gen = torch.Generator().manual_seed(5)
    specs = [Spec((int(n),)) for n in torch.randint(0, 600, (300,), generator=gen)] + [Spec((33333,))]
    params = make_params(specs, torch.float32, device)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    train([(ours, ours_p), (ref, ref_p)], GradSource(specs, torch.float32), 5)
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


# ---------------------------------------------------------------------------------------------
# Param groups, missing grads, lr as a tensor, lr changes and schedulers


@pytest.mark.parametrize("dtype, rtol", FULL_PRECISION)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_groups_missing_grads_and_add_param_group(name, dtype, rtol):
    configs = [kwargs for n, kwargs in CONFIGS if n == name]
    specs = [Spec((7,)), Spec((31,)), Spec((3, 5)),  # group 0
             Spec((1,)), Spec((1021,)), Spec((13, 9)),  # group 1
             Spec((5,)), Spec((2, 3, 5))]  # group 2, added after 10 steps
    params = make_params(specs, dtype)
    runs = []
    for impl in ("danlu", "torch"):
        p = twin(params)
        groups = [{"params": p[0:3], **configs[1]}, {"params": p[3:6], **configs[-1]}]
        runs.append((make_optimizer(impl, name, groups, **configs[0]), p))
    src = GradSource(specs, dtype)

    def without_grad(step):  # params 1 and 3 have no grad until step 2, others now and then
        return {1, 3} if step < 2 else {i for i in range(len(specs)) if (step + i) % 4 == 0}

    train(runs, src, 10, without_grad)
    for opt, p in runs:
        opt.add_param_group({"params": p[6:8], **configs[2]})
    train(runs, src, 15, without_grad)
    (ours, ours_p), (ref, ref_p) = runs
    assert_optimizers_match(ours, ours_p, ref, ref_p, rtol)
    if name != "SGD":  # the steps really differ between params
        assert len({float(ours.state[p]["step"]) for p in ours_p}) > 1


def test_adagrad_added_group_starts_from_torchs_initial_accumulator():
    """torch's Adagrad fills a lazily created `sum` from defaults["initial_accumulator_value"], not
    from the group's own value (and its constructor uses the constructor's value for every group)."""
    specs = [Spec((7,)), Spec((3, 5))]
    params = make_params(specs, torch.float32)
    ours, ours_p, ref, ref_p = danlu_and_torch("Adagrad", dict(lr=0.1, initial_accumulator_value=0.2),
                                               params[:1])
    extra_ours, extra_ref = twin(params[1:]), twin(params[1:])
    ours.add_param_group({"params": extra_ours, "initial_accumulator_value": 0.7})
    ref.add_param_group({"params": extra_ref, "initial_accumulator_value": 0.7})
    train([(ours, ours_p + extra_ours), (ref, ref_p + extra_ref)], GradSource(specs, torch.float32), 5)
    assert_optimizers_match(ours, ours_p + extra_ours, ref, ref_p + extra_ref, 2e-6)


# A tensor lr on the params' device is read by the kernel; one on the CPU next to CUDA params is read first.
LR_PLACES = [pytest.param("cpu", "cpu", id="cpu"),
             pytest.param("cuda", "cuda", id="cuda-lr-on-cuda", marks=requires_cuda),
             pytest.param("cuda", "cpu", id="cuda-lr-on-cpu", marks=requires_cuda)]


@pytest.mark.parametrize("device, lr_device", LR_PLACES)
@pytest.mark.parametrize("dtype, rtol", FULL_PRECISION)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_tensor_same_as_float_lr(name, lr_dtype, dtype, rtol, device, lr_device):
    kwargs = dict(RICH[name])
    lr = torch.tensor(kwargs.pop("lr"), dtype=lr_dtype, device=lr_device)
    specs = SMALL_SPECS + [Spec((1021,))]
    params = make_params(specs, dtype, device)
    with_tensor, with_float, reference = twin(params), twin(params), twin(params)
    opt_tensor = make_optimizer("danlu", name, with_tensor, lr=lr.clone(), **kwargs)
    opt_float = make_optimizer("danlu", name, with_float, lr=float(lr), **kwargs)
    ref = make_optimizer("torch", name, reference, lr=float(lr), **kwargs)
    runs = [(opt_tensor, with_tensor), (opt_float, with_float), (ref, reference)]
    src = GradSource(specs, dtype)
    train(runs, src, 10)
    # A scheduler updates a tensor lr in place.
    opt_tensor.param_groups[0]["lr"].mul_(0.3)
    opt_float.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = float(opt_tensor.param_groups[0]["lr"])
    train(runs, src, 10)
    assert isinstance(opt_tensor.param_groups[0]["lr"], torch.Tensor)
    assert_bitwise_equal(snapshot(opt_tensor, with_tensor), snapshot(opt_float, with_float))
    assert_optimizers_match(opt_tensor, with_tensor, ref, reference, rtol)


def _manual_lr(opt):
    class Manual:
        def __init__(self):
            self.n = 0

        def step(self):
            self.n += 1
            for i, group in enumerate(opt.param_groups):
                group["lr"] = group["lr"] * (0.5 if self.n % 3 == 0 else 1.1) + 1e-4 * i

    return Manual()


SCHEDULERS = {
    "manual": _manual_lr,
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30),
}
SCHEDULER_CASES = [pytest.param(name, sched, id=f"{name}-{sched}") for name in OPTIMIZERS
                   for sched in ("manual", "StepLR", "CosineAnnealingLR")]
# OneCycleLR also cycles the momentum (Adam's beta1, SGD's momentum) every step.
SCHEDULER_CASES += [pytest.param(name, "OneCycleLR", id=f"{name}-OneCycleLR") for name in ("Adam", "AdamW", "SGD")]


@pytest.mark.parametrize("name, scheduler", SCHEDULER_CASES)
def test_lr_changes_and_schedulers(name, scheduler):
    specs = SMALL_SPECS + [Spec((1021,))]
    params = make_params(specs, torch.float32)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, RICH[name], params)
    scheds = {id(ours): SCHEDULERS[scheduler](ours), id(ref): SCHEDULERS[scheduler](ref)}
    src = GradSource(specs, torch.float32)
    lrs = []
    for _ in range(30):
        grads = src()
        for opt, p in ((ours, ours_p), (ref, ref_p)):
            set_grads(p, grads)
            step(opt)
            scheds[id(opt)].step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        lrs.append(ours.param_groups[0]["lr"])
    assert len(set(lrs)) > 1
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


# ---------------------------------------------------------------------------------------------
# state_dict, deepcopy and pickle


def assert_state_dicts_alike(ours, ref):
    assert ours["param_groups"] == ref["param_groups"]
    assert sorted(ours["state"]) == sorted(ref["state"])
    for index, ref_state in ref["state"].items():
        state = ours["state"][index]
        assert sorted(state) == sorted(ref_state), f"param {index}"
        for key, value in ref_state.items():
            assert (value.dtype, value.shape, value.device) == (state[key].dtype, state[key].shape, state[key].device)
            if key == "step":
                assert state[key].dtype == torch.float32 and state[key].dim() == 0
                assert float(state[key]) == float(value)


@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_state_dict_format_matches_torch(name, kwargs):
    params = make_params(SMALL_SPECS, torch.float32)
    # foreach as torch's default here: param_groups must be equal, foreach key included.
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params, foreach=None)
    assert_state_dicts_alike(ours.state_dict(), ref.state_dict())
    train([(ours, ours_p), (ref, ref_p)], GradSource(SMALL_SPECS, torch.float32), 3)
    assert_state_dicts_alike(ours.state_dict(), ref.state_dict())
    if name == "SGD":
        assert all("step" not in s for s in ours.state_dict()["state"].values())


@pytest.mark.parametrize("direction", ["torch_to_danlu", "danlu_to_torch"])
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_state_dict_round_trip(name, kwargs, direction, poisoned_empty_like):
    specs = SMALL_SPECS + [Spec((1021,)), Spec((5, 7), grad="transposed")]
    params = make_params(specs, torch.float32)
    src = GradSource(specs, torch.float32)
    first_impl, second_impl = direction.split("_to_")
    first_p = twin(params)
    first = make_optimizer(first_impl, name, first_p, **kwargs)
    train([(first, first_p)], src, 7)

    second_p = twin(first_p)
    second = make_optimizer(second_impl, name, second_p, **kwargs)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert_state_dicts_alike(second.state_dict(), first.state_dict())
    train([(first, first_p), (second, second_p)], src, 10)
    ours, ours_p, ref, ref_p = (second, second_p, first, first_p) if second_impl == "danlu" else \
        (first, first_p, second, second_p)
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_state_tensors_replaced_between_steps(name, kwargs):
    """Code that resets optimizer state assigns new tensors into opt.state; the next step must use them."""
    specs = SMALL_SPECS + [Spec((1021,))]
    params = make_params(specs, torch.float32)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    src = GradSource(specs, torch.float32)
    train([(ours, ours_p), (ref, ref_p)], src, 4)
    # The replaced tensors stay alive: a step that still writes to them then fails this test instead of
    # writing to freed memory and crashing the whole run.
    replaced = []
    for opt, ps in ((ours, ours_p), (ref, ref_p)):
        for p in ps[::2]:
            for key, value in opt.state[p].items():
                replaced.append(value)
                opt.state[p][key] = torch.zeros_like(value) if key != "step" else torch.tensor(1.0)
    train([(ours, ours_p), (ref, ref_p)], src, 4)
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


@pytest.mark.parametrize("method", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_copy_round_trip(name, kwargs, method):
    specs = SMALL_SPECS + [Spec((1021,)), Spec((5, 7), grad="transposed")]
    params = make_params(specs, torch.float32)
    opt = make_optimizer("danlu", name, params, **kwargs)
    src = GradSource(specs, torch.float32)
    train([(opt, params)], src, 4)
    clone = copy.deepcopy(opt) if method == "deepcopy" else pickle.loads(pickle.dumps(opt))
    clone_p = [p for group in clone.param_groups for p in group["params"]]
    assert type(clone) is type(opt)
    assert not any(p is q for p, q in zip(clone_p, params))
    assert_bitwise_equal(snapshot(clone, clone_p), snapshot(opt, params))
    train([(opt, params), (clone, clone_p)], src, 4)
    assert_bitwise_equal(snapshot(clone, clone_p), snapshot(opt, params))


# ---------------------------------------------------------------------------------------------
# zero_grad, closures, hooks


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_zero_grad_across_steps(name, kwargs, set_to_none):
    specs = SMALL_SPECS + [Spec((1021,)), Spec((5, 7), grad="transposed")]
    params = make_params(specs, torch.float32)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    src = GradSource(specs, torch.float32)
    for i_step in range(10):
        grads = src()
        for opt, ps in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad(set_to_none=set_to_none)
            for p, g in zip(ps, grads):
                if i_step > 0:
                    assert (p.grad is None) if set_to_none else not p.grad.any()
                if p.grad is None:
                    p.grad = clone_like(g)
                else:  # accumulate into the same grad tensor, as backward does
                    p.grad.add_(g)
            step(opt)
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_grad_restrided_in_place_matches_torch(name, kwargs):
    """A grad tensor kept across steps whose strides change while its memory stays where it was
    (`grad.data = grad.data.t()`): the step must read it with its new strides."""
    specs = [Spec((6, 6)), Spec((7,)), Spec((9, 9)), Spec((3, 4, 4))]
    params = make_params(specs, torch.float32)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    src = GradSource(specs, torch.float32)
    for i_step in range(8):
        grads = src()
        for opt, ps in ((ours, ours_p), (ref, ref_p)):
            for p, g in zip(ps, grads):
                if p.grad is None:
                    p.grad = clone_like(g)
                    continue
                if i_step == 4 and p.dim() > 1:
                    pointer = p.grad.data_ptr()
                    p.grad.data = p.grad.data.transpose(-1, -2)
                    assert p.grad.data_ptr() == pointer and not p.grad.is_contiguous()
                p.grad.copy_(g)
            step(opt)
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_step_with_closure_returns_loss(name, kwargs):
    model, ref_model = small_model(0), small_model(0)
    ours = make_optimizer("danlu", name, model.parameters(), **kwargs)
    ref = make_optimizer("torch", name, ref_model.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 3, generator=gen, dtype=torch.float64)

    def closure_for(m, opt):
        def closure():
            opt.zero_grad()
            loss = F.mse_loss(m(x), y)
            loss.backward()
            return loss
        return closure

    losses = []
    for _ in range(15):
        loss, ref_loss = ours.step(closure_for(model, ours)), ref.step(closure_for(ref_model, ref))
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        losses.append(loss.item())
    if not kwargs.get("maximize"):
        assert losses[-1] < losses[0]
    assert_optimizers_match(ours, list(model.parameters()), ref, list(ref_model.parameters()), 1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_hooks_are_called(name):
    params = make_params([Spec((7,))], torch.float32)
    opt = make_optimizer("danlu", name, params, **RICH[name])
    calls = []

    def pre(o, args, kwargs):
        calls.append(("pre", o, params[0].detach().clone()))

    def post(o, args, kwargs):
        calls.append(("post", o, params[0].detach().clone()))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    for _ in range(2):
        set_grads(params, GradSource([Spec((7,))], torch.float32)())
        step(opt)
    assert [c[0] for c in calls] == ["pre", "post", "pre", "post"]
    assert all(c[1] is opt for c in calls)
    assert not torch.equal(calls[0][2], calls[1][2])  # the step ran between pre and post
    for h in handles:
        h.remove()
    step(opt)
    assert len(calls) == 4


# ---------------------------------------------------------------------------------------------
# Construction: subclassing, defaults, validation


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_isinstance_signature_and_defaults(name):
    danlu_cls, torch_cls = OPTIMIZERS[name]
    params = make_params([Spec((3,))], torch.float32)
    ours, ref = danlu_cls(params), torch_cls(params)
    assert isinstance(ours, torch_cls) and isinstance(ours, torch.optim.Optimizer)
    assert ours.defaults == ref.defaults
    assert ours.param_groups[0].keys() == ref.param_groups[0].keys()

    def described(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert described(danlu_cls) == described(torch_cls)


INVALID_HYPERPARAMETERS = [
    *[(name, bad) for name in ("Adam", "AdamW") for bad in (
        dict(lr=-1.0), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.0)), dict(betas=(0.9, -0.5)), dict(weight_decay=-0.1))],
    ("SGD", dict(lr=-1.0)), ("SGD", dict(momentum=-0.1)), ("SGD", dict(weight_decay=-0.1)),
    ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=True)), ("SGD", dict(nesterov=True)),
    ("RMSprop", dict(lr=-1.0)), ("RMSprop", dict(eps=-1e-8)), ("RMSprop", dict(momentum=-0.1)),
    ("RMSprop", dict(alpha=-0.1)), ("RMSprop", dict(weight_decay=-0.1)),
    ("Adagrad", dict(lr=-1.0)), ("Adagrad", dict(lr_decay=-0.1)), ("Adagrad", dict(weight_decay=-0.1)),
    ("Adagrad", dict(initial_accumulator_value=-0.1)), ("Adagrad", dict(eps=-1e-10)),
]


@pytest.mark.parametrize("name, kwargs", config_params(INVALID_HYPERPARAMETERS, show_lr=True))
def test_invalid_hyperparameters_raise_like_torch(name, kwargs):
    danlu_cls, torch_cls = OPTIMIZERS[name]
    params = make_params([Spec((3,))], torch.float32)
    with pytest.raises(ValueError) as torch_error:
        torch_cls(params, **kwargs)
    with pytest.raises(ValueError) as danlu_error:
        danlu_cls(params, **kwargs)
    assert str(danlu_error.value) == str(torch_error.value)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_differentiable_not_supported(name):
    with pytest.raises(NotImplementedError):
        OPTIMIZERS[name][0](make_params([Spec((3,))], torch.float32), differentiable=True)


FLAG_CASES = [pytest.param(name, flag, id=f"{name}-{flag}") for name in OPTIMIZERS for flag in ("foreach", "fused")
              if not (name == "RMSprop" and flag == "fused")]  # torch's RMSprop has no fused option


@pytest.mark.parametrize("name, flag", FLAG_CASES)
def test_foreach_and_fused_accepted(name, flag):
    specs = SMALL_SPECS + [Spec((1021,))]
    params = make_params(specs, torch.float32)
    ours_p, ref_p = twin(params), twin(params)
    ours = make_optimizer("danlu", name, ours_p, **RICH[name], **{flag: True})
    ref = make_optimizer("torch", name, ref_p, **RICH[name])
    train([(ours, ours_p), (ref, ref_p)], GradSource(specs, torch.float32), 10)
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


# ---------------------------------------------------------------------------------------------
# GradScaler: grad_scale and found_inf


SCALER_SPECS = SMALL_SPECS + [Spec((1021,)), Spec((5, 7), grad="transposed"), Spec((13,), offset=1, grad_offset=3)]


def scaled(grads, scale):
    return [g * scale for g in grads]


def in_layout_of(p, g):
    out = clone_like(p.detach())
    out.copy_(g)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol", FULL_PRECISION)
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_grad_scale_matches_torch_fused(name, kwargs, dtype, rtol, device):
    """found_inf=0: same step as torch's fused kernel (where torch has one on this device; otherwise torch on
    unscaled grads), and the grads are left unscaled in place, in their own layout."""
    params = make_params(SCALER_SPECS, dtype, device)
    fused = name in TORCH_FUSED[device]
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params, **({"fused": True} if fused else {}))
    src = GradSource(SCALER_SPECS, dtype)
    for i_step in range(8):
        scale = 1024.0 if i_step < 4 else 3.0
        grads = scaled(src(), scale)
        set_grads(ours_p, grads)
        ours.grad_scale, ours.found_inf = torch.tensor(scale, device=device), torch.tensor(0.0, device=device)
        if fused:
            # torch's fused CPU kernels read a grad as if it had its param's strides: give them that.
            for p, g in zip(ref_p, grads):
                p.grad = in_layout_of(p, g.to(device))
            ref.grad_scale, ref.found_inf = torch.tensor(scale, device=device), torch.tensor(0.0, device=device)
        else:
            set_grads(ref_p, [g / scale for g in grads])
        strides = [p.grad.stride() for p in ours_p]
        step(ours)
        step(ref)
        assert [p.grad.stride() for p in ours_p] == strides
        unscaled = {f"grad{i}": p.grad for i, p in enumerate(ours_p)}
        assert_matches(unscaled, {f"grad{i}": p.grad for i, p in enumerate(ref_p)}, rtol)
    assert_optimizers_match(ours, ours_p, ref, ref_p, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inf_at_step", [0, 3])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_found_inf_skips_the_step(name, kwargs, dtype, inf_at_step, device):
    """found_inf=1: params, every state tensor and step bitwise unchanged; afterwards training goes
    on as if that step never happened."""
    specs = SCALER_SPECS
    params = make_params(specs, dtype, device)
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    exact_p = twin(params, torch.float64)
    exact = make_optimizer("torch", name, exact_p, **kwargs)
    src = GradSource(specs, dtype)
    for i_step in range(8):
        grads = src()
        set_grads(ours_p, scaled(grads, 4.0))
        if i_step == inf_at_step:
            ours_p[2].grad.view(-1)[0] = float("inf")
            ours.grad_scale, ours.found_inf = torch.tensor(4.0, device=device), torch.tensor(1.0, device=device)
            before = snapshot(ours, ours_p)
            step(ours)
            after = snapshot(ours, ours_p)
            if inf_at_step == 0:  # the state created for the step may appear, all zero
                assert all(torch.equal(after[k], v) for k, v in before.items())
                assert all(float(v) == 0 for k, v in after.items() if k.endswith(".step"))
            else:
                assert_bitwise_equal(after, before)
            continue
        ours.grad_scale, ours.found_inf = torch.tensor(4.0, device=device), torch.tensor(0.0, device=device)
        step(ours)
        for opt, p in ((ref, ref_p), (exact, exact_p)):
            set_grads(p, grads)
            step(opt)
    if dtype in (torch.float32, torch.float64):
        assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6 if dtype == torch.float32 else 1e-12)
    else:  # the scale 4 is exact: the low-precision run must still track float64 as well as torch's
        ours_err = mean_error_by_kind(tensors_of(ours, ours_p), tensors_of(exact, exact_p))
        torch_err = mean_error_by_kind(tensors_of(ref, ref_p), tensors_of(exact, exact_p))
        assert all(ours_err[k] <= 2 * torch_err[k] for k in torch_err), (ours_err, torch_err)
        assert_steps_equal(tensors_of(ours, ours_p), tensors_of(ref, ref_p))


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_grad_scaler_training_loop(name, kwargs):
    """torch.amp.GradScaler around real CPU training, one step with an inf grad; the reference is torch
    fused (or, for RMSprop, torch's unscale-then-step path)."""
    models = [small_model(1).float(), small_model(1).float()]
    torch_kwargs = {"fused": True} if name in TORCH_FUSED["cpu"] else {}
    opts = [make_optimizer("danlu", name, models[0].parameters(), **kwargs),
            make_optimizer("torch", name, models[1].parameters(), **kwargs, **torch_kwargs)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3) for _ in models]
    gen = torch.Generator().manual_seed(3)
    for i_step in range(12):
        x, y = torch.randn(16, 7, generator=gen), torch.randn(16, 3, generator=gen)
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            if i_step == 5:
                model[0].weight.grad[1, 2] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert not hasattr(opts[0], "grad_scale") and not hasattr(opts[0], "found_inf")
    params = [list(m.parameters()) for m in models]
    if name != "SGD":
        assert all(float(opts[0].state[p]["step"]) == 11 for p in params[0])
    assert_optimizers_match(opts[0], params[0], opts[1], params[1], 2e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear exception, and nothing changed


def _corrupt(bad, params, index):
    """Makes param `index` (or a new param appended there) bad; returns (params, expected error, match)."""
    p = params[index]
    if bad == "sparse_grad":
        p.grad = p.grad.to_sparse()
        return RuntimeError, "sparse"
    if bad == "grad_dtype":
        p.grad.data = p.grad.data.double()
        return (TypeError, ValueError, RuntimeError), "dtype"
    if bad == "grad_shape":
        p.grad.data = p.grad.data.reshape(-1)
        return (TypeError, ValueError, RuntimeError), "shape"
    if bad == "grad_dtype_same_memory":
        p.grad.data = p.grad.data.view(torch.int32)
        return (TypeError, ValueError, RuntimeError), "dtype"
    if bad == "grad_shape_same_memory":
        p.grad.data = p.grad.data.view(-1)
        return (TypeError, ValueError, RuntimeError), "shape"
    if bad == "integer_param":
        p.grad = torch.ones_like(p)
        return (TypeError, ValueError, RuntimeError), "dtype"
    if bad == "non_dense_param":
        p.grad = torch.randn(p.shape)
        return (TypeError, ValueError, RuntimeError), "dense"
    raise AssertionError(bad)


def _extra_param(bad):
    if bad == "integer_param":
        return torch.nn.Parameter(torch.arange(6, dtype=torch.int32), requires_grad=False)
    if bad == "non_dense_param":
        return torch.nn.Parameter(torch.randn(6, 10)[:, ::2])  # strided view with gaps
    return None


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("bad_group", [0, 1])
@pytest.mark.parametrize("bad", ["sparse_grad", "grad_dtype", "grad_shape", "grad_dtype_same_memory",
                                 "grad_shape_same_memory", "integer_param", "non_dense_param"])
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_bad_input_raises_and_changes_nothing(name, kwargs, bad, bad_group, warmup):
    specs = [Spec((7,)), Spec((1021,)), Spec((3, 5)), Spec((31,)), Spec((13, 9)), Spec((2, 3))]
    params = make_params(specs, torch.float32)
    extra = _extra_param(bad)
    runs = []
    for impl in ("danlu", "torch"):
        p = twin(params)
        groups = [p[0:3], p[3:6]]
        if extra is not None:
            extra_twin = torch.nn.Parameter(extra.detach().clone(), requires_grad=extra.requires_grad) \
                if impl == "torch" else extra
            groups[bad_group].append(extra_twin)
        runs.append((make_optimizer(impl, name, [{"params": g} for g in groups], **kwargs), p))
    (ours, ours_p), (ref, ref_p) = runs
    bad_index = 2 + 3 * bad_group  # a 2-d param, so a flattened grad has the same numel
    src = GradSource(specs, torch.float32)
    train(runs, src, warmup)

    if not (warmup and bad.endswith("same_memory")):
        set_grads(ours_p, src())
    # else: the grads of the last step, changed without moving: no new data pointer to notice
    target = extra if extra is not None else ours_p[bad_index]
    error, match = _corrupt(bad, [target], 0)
    before = snapshot(ours, ours_p)
    state_keys = {i: sorted(ours.state.get(p, {})) for i, p in enumerate(ours_p)}
    with pytest.raises(error, match=match):
        step(ours)
    assert_bitwise_equal(snapshot(ours, ours_p), before)
    assert {i: sorted(ours.state.get(p, {})) for i, p in enumerate(ours_p)} == state_keys, "new state after a raise"

    if extra is not None:
        extra.grad = None
    train(runs, src, 4)  # torch never saw the failed step
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


# ---------------------------------------------------------------------------------------------
# Determinism: ISA variants and thread counts


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_set_cpu_isa_accepts_exactly_what_the_cpu_has(restore_cpu_isa):
    assert restore_cpu_isa in ("generic", "avx2", "avx512")
    with pytest.raises(ValueError):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() == restore_cpu_isa
    supported = supported_isas()
    assert "generic" in supported
    flags = _cpu_flags()
    if flags is not None:
        assert ("avx2" in supported) == ({"avx2", "fma"} <= flags)
        assert ("avx512" in supported) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
        assert restore_cpu_isa == supported[-1]  # the default is the best the CPU has


@pytest.mark.parametrize("dtype", ALL_DTYPES + dtype_params(torch.complex64))
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_cpu_isa_variants_bitwise_equal(name, kwargs, dtype, restore_cpu_isa):
    specs = [s for s in ODD_SPECS if s.shape != (100003,)] + [
        Spec((4099,)), Spec((5, 7), offset=1, grad="transposed", grad_offset=3), Spec((29,), offset=3)]
    params = make_params(specs, dtype)
    results = {}
    for isa in supported_isas():
        _C.set_cpu_isa(isa)
        p = twin(params)
        opt = make_optimizer("danlu", name, p, **kwargs)
        train([(opt, p)], GradSource(specs, dtype), 3)
        results[isa] = snapshot(opt, p)
    first = next(iter(results))
    assert len(results) >= 1
    for result in results.values():
        assert_bitwise_equal(result, results[first])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_thread_count_does_not_change_results(name, kwargs, dtype, restore_num_threads):
    specs = ODD_SPECS + [Spec((70001,)), Spec((65,))]
    params = make_params(specs, dtype)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        p = twin(params)
        opt = make_optimizer("danlu", name, p, **kwargs)
        train([(opt, p)], GradSource(specs, dtype), 4, threads=None)
        results.append(snapshot(opt, p))
    for result in results[1:]:
        assert_bitwise_equal(result, results[0])


# ---------------------------------------------------------------------------------------------
# CUDA


# Rules whose coefficients need no pow: their CPU and CUDA kernels round every operation alike (update_rules.h,
# no FMA contraction on either side, IEEE division and square root on both).
NO_POW = {"SGD", "RMSprop", "Adagrad"}
# Adam's bias corrections come from the C library's pow on the CPU and CUDA's on the GPU, which may differ in the
# last bit of a double; that moves a float coefficient by at most one ulp now and then.
ADAM_CPU_CUDA_RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@requires_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name, kwargs", config_params(CONFIGS))
def test_cpu_and_cuda_agree_on_many_small_tensors(name, kwargs, dtype):
    """1000 small tensors (block and chunk boundaries of the CUDA kernel fall everywhere) and a few odd ones:
    bitwise the CPU's results for the rules without pow, within a last-bit difference of Adam's coefficients."""
    gen = torch.Generator().manual_seed(11)
    specs = [Spec((int(n),)) for n in torch.randint(0, 300, (1000,), generator=gen)]
    specs += [Spec((3, 5)), Spec((100003,)), Spec((2, 3, 4, 5), channels_last=True),
              Spec((5, 7), offset=1, grad="transposed", grad_offset=3), Spec((70001,), offset=3, grad_offset=1)]
    params = make_params(specs, dtype)
    cpu_p, cuda_p = twin(params), twin(params, device="cuda")
    cpu = make_optimizer("danlu", name, cpu_p, **kwargs)
    cuda = make_optimizer("danlu", name, cuda_p, **kwargs)
    train([(cpu, cpu_p), (cuda, cuda_p)], GradSource(specs, dtype), 10)
    torch.cuda.synchronize()
    assert all(p.device.type == "cuda" for p in cuda_p)
    if name in NO_POW:
        assert_bitwise_equal({k: v.cpu() for k, v in snapshot(cuda, cuda_p).items()}, snapshot(cpu, cpu_p))
    else:
        assert_optimizers_match(cuda, cuda_p, cpu, cpu_p, ADAM_CPU_CUDA_RTOL[dtype])


@requires_cuda
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_cuda_step_on_side_streams_matches_torch(name, kwargs):
    """Steps go round the current stream and two side streams, each made to wait for the work before it, as
    torch's stream semantics ask: the step kernel's scratch counter is zeroed on the stream it runs on."""
    specs = SMALL_SPECS + [Spec((100003,)), Spec((40000,))]
    params = make_params(specs, torch.float32, "cuda")
    ours, ours_p, ref, ref_p = danlu_and_torch(name, kwargs, params)
    main = torch.cuda.current_stream()
    streams = [main, torch.cuda.Stream(), torch.cuda.Stream()]
    src = GradSource(specs, torch.float32)
    for i in range(9):
        grads = src()
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        side = streams[i % 3]
        side.wait_stream(main)
        with torch.cuda.stream(side):
            step(ours)
        main.wait_stream(side)
        step(ref)
    torch.cuda.synchronize()
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


@requires_cuda
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_cuda_two_optimizers_on_two_streams_match_torch(name, kwargs):
    """Two optimizers with their own params stepping at the same time on two streams."""
    specs = SMALL_SPECS + [Spec((300001,))]
    first, second = make_params(specs, torch.float32, "cuda", seed=1), make_params(specs, torch.float32, "cuda", seed=2)
    runs = [danlu_and_torch(name, kwargs, params) for params in (first, second)]
    main, streams = torch.cuda.current_stream(), [torch.cuda.Stream(), torch.cuda.Stream()]
    sources = [GradSource(specs, torch.float32, seed=3), GradSource(specs, torch.float32, seed=4)]
    for _ in range(6):
        for (_, ours_p, ref, ref_p), src in zip(runs, sources):
            grads = src()
            set_grads(ours_p, grads)
            set_grads(ref_p, grads)
            step(ref)
        for (ours, _, _, _), side in zip(runs, streams):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                step(ours)
        for side in streams:
            main.wait_stream(side)
    torch.cuda.synchronize()
    for ours, ours_p, ref, ref_p in runs:
        assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


@requires_cuda
@pytest.mark.large
@pytest.mark.parametrize("name, kwargs, dtype", [
    pytest.param("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), torch.bfloat16, id="SGD-nesterov-bf16"),
    pytest.param("Adagrad", dict(lr=0.1, weight_decay=0.05), torch.float16, id="Adagrad-fp16"),
])
def test_cuda_tensor_past_2_31_elements(name, kwargs, dtype):
    """One param of 2^31 + 13 elements (4 GiB in 16 bits) next to a small one: 64-bit indexing from the block
    map to the last vector. Slices at the start, around 2^31 and at the end match the CPU kernel on the same
    values bit for bit (no pow in these rules)."""
    numel = 2**31 + 13
    big = torch.nn.Parameter(torch.empty(numel, dtype=dtype, device="cuda").uniform_(-1, 1))
    small = torch.nn.Parameter(torch.randn(7, dtype=dtype, device="cuda"))
    windows = [slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(numel - 4096, numel)]
    cpu_p = [torch.nn.Parameter(big.detach()[w].cpu()) for w in windows] + [torch.nn.Parameter(small.detach().cpu())]
    ours = make_optimizer("danlu", name, [big, small], **kwargs)
    cpu = make_optimizer("danlu", name, cpu_p, **kwargs)
    for _ in range(2):
        big.grad = torch.empty_like(big).uniform_(-1, 1)
        small.grad = torch.randn_like(small)
        for p, w in zip(cpu_p, windows):
            p.grad = big.grad[w].cpu()
        cpu_p[-1].grad = small.grad.cpu()
        step(ours)
        step(cpu)
    torch.cuda.synchronize()
    for p, w in zip(cpu_p, windows):
        assert torch.equal(big.detach()[w].cpu(), p.detach()), f"elements {w.start}..{w.stop} differ"
    assert torch.equal(small.detach().cpu(), cpu_p[-1].detach())


# ---------------------------------------------------------------------------------------------
# The CUDA kernel's walk over a table, modelled on the CPU


def walk_like_the_cuda_kernel(numel, itemsize, threads=256):
    """Every (tensor, element) the step kernel of csrc/optim/optim_cuda.cu updates, in a NumPy model of its
    blocks (from the table's real block map), chunks of `threads` tensors and vectors dealt to threads."""
    width = 16 // itemsize
    padded = -(-numel // width) * width
    offsets = np.zeros(len(numel), dtype=np.int64)
    np.cumsum(padded[:-1], out=offsets[1:])
    total = int(padded.sum())
    blocks = max(1, -(-total // BLOCK_ELEMS))
    first_of_block = block_first_tensor(offsets, blocks)
    visited = []
    for b in range(blocks):
        begin, end = b * BLOCK_ELEMS, min((b + 1) * BLOCK_ELEMS, total)
        first = int(first_of_block[b])
        while True:
            mine = np.arange(first, min(first + threads, len(numel)))
            start = offsets[mine][offsets[mine] < end]
            count = len(start)
            if count == 0:
                break
            assert np.array_equal(start, offsets[first:first + count]), "the chunk is not a prefix of the threads"
            lo = max(begin, int(start[0]))
            hi = min(end, int(offsets[first + count])) if count == threads and first + count < len(numel) else end
            assert lo % width == 0
            for v in range(lo, hi, width):
                seg = int(np.searchsorted(start, v, side="right") - 1)
                index = v - int(start[seg])
                valid = max(0, min(width, int(numel[first + seg]) - index))
                visited += [(first + seg, index + j) for j in range(valid)]
            if count < threads:
                break
            first += threads
    return visited


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("case", ["empties-and-ones", "chunk-boundaries", "big-and-small", "all-empty"])
def test_block_map_walk_updates_every_element_once(case, itemsize):
    """The host's block map and the kernel's walk together cover every element of every tensor exactly once:
    tensors spanning blocks, more than one chunk of tensors in a block, empty tensors anywhere."""
    gen = np.random.default_rng(7)
    numel = {
        "empties-and-ones": gen.choice([0, 0, 1, 2, 3], 2000),
        "chunk-boundaries": gen.integers(0, 40, 900),
        "big-and-small": np.concatenate([gen.integers(0, 9, 300), [3 * BLOCK_ELEMS + 5], gen.integers(0, 5000, 40),
                                         [0, 0, BLOCK_ELEMS - 1]]),
        "all-empty": np.zeros(5, dtype=np.int64),
    }[case].astype(np.int64)
    visited = walk_like_the_cuda_kernel(numel, itemsize)
    expected = [(t, i) for t, n in enumerate(numel) for i in range(int(n))]
    assert len(visited) == len(set(visited)), "an element is updated twice"
    assert sorted(visited) == expected
