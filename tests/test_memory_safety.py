"""The optimizers' native step never sees a stale pointer, size or stride, and a step that raises changes
nothing.

Each case does to a danlu optimizer and to torch's (foreach=False) the same thing between steps: swap a
tensor's storage through `.data`, `set_` or a storage resize, shrink a param, replace or corrupt state, give
a bad hyper-parameter. Then either both train on identically, or both raise the same exception type and
danlu's params and state are bitwise as they were. These cases read freed memory or past a tensor's end in
danlu 0.1 (ASan: heap-use-after-free, heap-buffer-overflow); CI runs this file under ASan."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers.optim import (
    RICH_CONFIGS,
    GradSource,
    Spec,
    assert_bitwise_equal,
    assert_optimizers_match,
    config_params,
    make_optimizer,
    make_params,
    set_grads,
    snapshot,
    step,
    train,
    twin,
)

SPECS = [Spec((7,)), Spec((1021,)), Spec((13, 9)), Spec((2, 3, 4, 5), channels_last=True), Spec((100,))]
WARMUP = 3


def runs_of(name, kwargs, specs=SPECS, groups=None):
    """[(danlu optimizer, params), (torch optimizer, params)] on twins of the same params."""
    params = make_params(specs, torch.float32)
    runs = []
    for impl in ("danlu", "torch"):
        p = twin(params)
        arg = p if groups is None else [{"params": [p[i] for i in g], **extra} for g, extra in groups]
        runs.append((make_optimizer(impl, name, arg, **kwargs), p))
    return runs


def all_state_tensors(opt):
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# Storage swapped under the optimizer: training goes on exactly as torch's


def move_state_storage(opt, params):
    """The "move the optimizer to a device" idiom: every state tensor keeps its identity, its storage moves."""
    for v in all_state_tensors(opt):
        v.data = v.data.clone()


def grow_state_storage(opt, params):
    """A resize of the shared storage through an alias reallocates it: same tensor, same shape, new memory."""
    for v in all_state_tensors(opt):
        if v.dim() > 0:
            v.data.resize_(v.numel() * 64)


def move_param_storage(opt, params):
    for p in params:
        p.data = p.data.clone()


def set_param_storage(opt, params):
    with torch.no_grad():
        for p in params:
            p.set_(p.detach().clone())


def reload_state(opt, params):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def replace_state_by_hand(opt, params):
    for state in opt.state.values():
        for key, value in state.items():
            state[key] = value.clone()


def restride_grads_in_place(opt, params):
    """The grads keep their tensors and memory; a 2-d grad is now read through transposed strides."""
    for p in params:
        if p.dim() == 2:
            p.grad.data = p.grad.data.t().contiguous().t()


SWAPS = [move_state_storage, grow_state_storage, move_param_storage, set_param_storage, reload_state,
         replace_state_by_hand]


@pytest.mark.parametrize("swap", SWAPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_storage_swapped_between_steps_trains_on_like_torch(name, kwargs, swap):
    runs = runs_of(name, kwargs)
    src = GradSource(SPECS, torch.float32)
    train(runs, src, WARMUP)
    kept_alive = [all_state_tensors(opt) for opt, _ in runs]  # nothing freed can be reused by accident
    for opt, params in runs:
        swap(opt, params)
    train(runs, src, 4)
    (ours, ours_p), (ref, ref_p) = runs
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)
    del kept_alive


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_grad_swapped_each_step_in_every_way(name, kwargs):
    """Grads that keep their tensor but change memory or strides, every step, next to fresh grads."""
    runs = runs_of(name, kwargs)
    src = GradSource(SPECS, torch.float32)
    train(runs, src, 1)
    for i in range(6):
        grads = src()
        for opt, params in runs:
            for k, (p, g) in enumerate(zip(params, grads)):
                if (i + k) % 3 == 0:
                    p.grad = g.clone()
                elif (i + k) % 3 == 1:
                    p.grad.data = g.clone()
                else:
                    p.grad.copy_(g)
            if i == 3:
                restride_grads_in_place(opt, params)
            step(opt)
    (ours, ours_p), (ref, ref_p) = runs
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


# ---------------------------------------------------------------------------------------------
# Changes that torch refuses: the same exception type, and nothing changed


def expect_unchanged_after_raise(runs, error, match=None, torch_error=None):
    """Steps both optimizers; torch's must raise `torch_error` (default: `error`; None: torch is not asked),
    danlu's `error`, and danlu's params and state stay bitwise as they were, with no state added."""
    (ours, ours_p), (ref, ref_p) = runs
    before, keys = snapshot(ours, ours_p), {id(p): sorted(ours.state.get(p, {})) for p in ours_p}
    if torch_error is not False:
        with pytest.raises(torch_error or error):
            step(ref)
    with pytest.raises(error, match=match):
        step(ours)
    assert_bitwise_equal(snapshot(ours, ours_p), before)
    assert {id(p): sorted(ours.state.get(p, {})) for p in ours_p} == keys, "a step that raised changed the state"


def shrink_param(opt, params):
    """`p.data = p.data[:4]` then a 4-element grad: the state still has the old shape."""
    p = params[1]
    p.data = p.data[:4]
    p.grad = torch.randn(4)


def shrink_param_and_grad_in_place(opt, params):
    """The same, with the grad shrunk through .data too: every data pointer stays where it was."""
    p = params[1]
    p.data = p.data[:4]
    p.grad.data = p.grad.data[:4]


def param_to_float64(opt, params):
    p = params[0]
    p.data = p.data.double()
    p.grad = torch.randn(p.shape, dtype=torch.float64)


def state_to_float64(opt, params):
    state = opt.state[params[2]]
    for key, value in state.items():
        if key != "step":
            state[key] = value.double()


def state_reshaped(opt, params):
    """Same elements, another shape: torch refuses to broadcast it into the param's."""
    state = opt.state[params[2]]
    for key, value in state.items():
        if key != "step":
            state[key] = value.reshape(-1)


REFUSED = [
    (shrink_param, RuntimeError, "shape"),
    (shrink_param_and_grad_in_place, RuntimeError, "shape"),
    (param_to_float64, RuntimeError, "dtype"),
    (state_to_float64, RuntimeError, "dtype"),
    (state_reshaped, RuntimeError, "shape"),
]
# torch's SGD and Adagrad update a float32 tensor with a float64 one in place (add_ and addcmul_ cast down), its
# Adam and RMSprop refuse; one native call computes in one dtype, so danlu refuses for every optimizer.
TORCH_MIXES_DTYPES = {"SGD", "Adagrad"}


@pytest.mark.parametrize("change, error, match", REFUSED, ids=[c[0].__name__ for c in REFUSED])
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_refused_change_raises_like_torch_and_changes_nothing(name, kwargs, change, error, match):
    runs = runs_of(name, kwargs)
    train(runs, GradSource(SPECS, torch.float32), WARMUP)
    for opt, params in runs:
        change(opt, params)
    mixed = match == "dtype" and name in TORCH_MIXES_DTYPES
    expect_unchanged_after_raise(runs, error, match, torch_error=False if mixed else None)


LOADED_STATE_DEFECTS = {
    "one_element": lambda v: torch.zeros(1, dtype=v.dtype),
    "zero_dim": lambda v: torch.zeros((), dtype=v.dtype),
    "transposed_shape": lambda v: torch.zeros(tuple(reversed(v.shape)), dtype=v.dtype) if v.dim() > 1 else None,
}


@pytest.mark.parametrize("defect", sorted(LOADED_STATE_DEFECTS))
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_loaded_state_of_the_wrong_shape_raises(name, kwargs, defect):
    """A checkpoint whose state tensors do not have their param's shape: torch raises at the step (a (1,) or
    0-d exp_avg would otherwise be broadcast and stepped)."""
    runs = runs_of(name, kwargs)
    train(runs, GradSource(SPECS, torch.float32), WARMUP)
    bad = copy.deepcopy(runs[0][0].state_dict())
    param_index = 2  # (13, 9)
    for key, value in bad["state"][param_index].items():
        if key != "step":
            bad["state"][param_index][key] = LOADED_STATE_DEFECTS[defect](value)
    for opt, _ in runs:
        opt.load_state_dict(copy.deepcopy(bad))
    expect_unchanged_after_raise(runs, RuntimeError, f"param {param_index}")


@pytest.mark.parametrize("name, kwargs", config_params([c for c in RICH_CONFIGS if c[0] != "SGD"]))
def test_loaded_state_missing_a_key_raises_key_error(name, kwargs):
    """torch raises KeyError for a missing state key (it does not fill zeros); SGD's momentum_buffer is the
    exception, a missing buffer there is a fresh one (tested with the other SGD cases)."""
    runs = runs_of(name, kwargs)
    train(runs, GradSource(SPECS, torch.float32), WARMUP)
    bad = copy.deepcopy(runs[0][0].state_dict())
    key = sorted(k for k in bad["state"][3] if k != "step")[-1]
    del bad["state"][3][key]
    for opt, _ in runs:
        opt.load_state_dict(copy.deepcopy(bad))
    expect_unchanged_after_raise(runs, KeyError, key)


def test_sgd_loaded_state_without_momentum_buffer_starts_a_fresh_one():
    runs = runs_of("SGD", dict(lr=0.05, momentum=0.9))
    src = GradSource(SPECS, torch.float32)
    train(runs, src, WARMUP)
    bad = copy.deepcopy(runs[0][0].state_dict())
    del bad["state"][1]["momentum_buffer"]
    for opt, _ in runs:
        opt.load_state_dict(copy.deepcopy(bad))
    train(runs, src, 3)
    (ours, ours_p), (ref, ref_p) = runs
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


# ---------------------------------------------------------------------------------------------
# Every group is checked before the first kernel runs


# (key, value, danlu's error, torch's error: torch's step fails wherever the value is first used)
BAD_HYPER = [
    ("lr", None, TypeError, TypeError),
    ("lr", torch.tensor([0.1, 0.2]), ValueError, (TypeError, RuntimeError)),
    ("lr", torch.tensor([]), ValueError, (TypeError, RuntimeError)),
    ("eps", "small", (TypeError, ValueError), (TypeError, ValueError)),
]


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("key, value, error, torch_error", BAD_HYPER,
                         ids=["lr-None", "lr-2-elements", "lr-empty", "eps-string"])
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_bad_hyperparameter_in_a_later_group_changes_nothing(name, kwargs, key, value, error, torch_error,
                                                             first_step):
    if key == "eps" and name == "SGD":
        key = "momentum"
    runs = runs_of(name, kwargs, groups=[([0, 1, 2], {}), ([3, 4], {})])
    src = GradSource(SPECS, torch.float32)
    train(runs, src, 0 if first_step else WARMUP)
    grads = src()
    for opt, params in runs:
        set_grads(params, grads)
        opt.param_groups[1][key] = value
    expect_unchanged_after_raise(runs, error, torch_error=torch_error)


@pytest.mark.parametrize("name, kwargs", config_params([c for c in RICH_CONFIGS if c[0] in ("Adam", "AdamW")]))
def test_betas_of_one_value_raise_before_anything_moves(name, kwargs):
    runs = runs_of(name, kwargs, groups=[([0, 1, 2], {}), ([3, 4], {"betas": (0.9,)})])
    set_grads(runs[0][1], GradSource(SPECS, torch.float32)())
    set_grads(runs[1][1], GradSource(SPECS, torch.float32)())
    expect_unchanged_after_raise(runs, ValueError)
    assert not runs[0][0].state, "a step that raised created state"


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_lr_tensor_with_more_than_one_element_names_the_group(name, kwargs):
    (ours, params), _ = runs_of(name, kwargs)
    set_grads(params, GradSource(SPECS, torch.float32)())
    ours.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="1-element"):
        step(ours)


# ---------------------------------------------------------------------------------------------
# A param listed twice, and tensors that share memory


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_param_listed_twice_is_updated_twice_like_torch(name, kwargs):
    """torch warns and then applies the update once per listing, each seeing the state the last one left."""
    params = make_params([Spec((7,)), Spec((31,)), Spec((3, 5))], torch.float32)
    runs = []
    for impl in ("danlu", "torch"):
        p = twin(params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = make_optimizer(impl, name, [p[0], p[1], p[0], p[2], p[0]], **kwargs)
        assert any("duplicate parameters" in str(w.message) for w in caught)
        runs.append((opt, p))
    train(runs, GradSource([Spec((7,)), Spec((31,)), Spec((3, 5))], torch.float32), 5)
    (ours, ours_p), (ref, ref_p) = runs
    assert_optimizers_match(ours, ours_p, ref, ref_p, 2e-6)


def overlapping_params():
    storage = torch.randn(30)
    return [torch.nn.Parameter(storage[0:20]), torch.nn.Parameter(storage[10:30])]


@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_tensors_that_share_memory_raise_a_clear_error(name, kwargs):
    """One parallel pass cannot update two params that overlap in memory, or a param through its own grad."""
    params = overlapping_params()
    opt = make_optimizer("danlu", name, params, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="overlap"):
        step(opt)
    assert_bitwise_equal(snapshot(opt, params), before)

    p = make_params([Spec((9,))], torch.float32)[0]
    opt = make_optimizer("danlu", name, [p], **kwargs)
    p.grad = p.detach()
    with pytest.raises(ValueError, match="overlap"):
        step(opt)


@pytest.mark.parametrize("where", ["param", "grad", "state"])
@pytest.mark.parametrize("name, kwargs", config_params(RICH_CONFIGS))
def test_wrapper_subclass_without_memory_raises_a_clear_error(name, kwargs, where):
    """A tensor subclass that wraps others (a DTensor of FSDP2, here torch's test TwoTensor) reports data_ptr() 0:
    handing that to the kernel killed the process with SIGSEGV."""
    from torch.testing._internal.two_tensor import TwoTensor

    runs = runs_of(name, kwargs)
    train(runs, GradSource(SPECS, torch.float32), WARMUP if where == "state" else 0)
    (ours, params), _ = runs
    p = params[0]
    if where == "param":
        p.data = TwoTensor(p.detach().clone(), p.detach().clone())
    if where in ("param", "grad"):
        p.grad = TwoTensor(torch.randn(p.shape), torch.randn(p.shape))
    else:
        key = next(k for k in ours.state[p] if k != "step")
        ours.state[p][key] = TwoTensor(ours.state[p][key].clone(), ours.state[p][key].clone())
    for q in params[1:]:
        q.grad = torch.randn(q.shape).contiguous(memory_format=torch.preserve_format)
    with pytest.raises(TypeError, match="without memory of its own"):
        step(ours)
