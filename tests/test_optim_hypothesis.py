"""Property tests: random valid hyper-parameters, random lists of shapes and layouts, danlu against
torch (foreach=False) over a few steps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.optim import (
    GradSource,
    Spec,
    assert_optimizers_match,
    make_optimizer,
    make_params,
    train,
    twin,
)

TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-12}

unit = st.floats(0.0, 0.99)
weight_decay = st.one_of(st.just(0.0), st.floats(1e-4, 0.5))
lr = st.floats(1e-4, 0.1)
eps = st.floats(1e-10, 1e-2)


@st.composite
def adam_kwargs(draw, decoupled_option=True):
    kwargs = dict(lr=draw(lr), betas=(draw(unit), draw(st.floats(0.5, 0.9999))), eps=draw(eps),
                  weight_decay=draw(weight_decay), amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
    if decoupled_option:
        kwargs["decoupled_weight_decay"] = draw(st.booleans())
    return kwargs


@st.composite
def sgd_kwargs(draw):
    nesterov = draw(st.booleans())
    momentum = draw(st.floats(0.05, 0.99)) if nesterov else draw(st.one_of(st.just(0.0), unit))
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), unit))
    return dict(lr=draw(lr), momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=draw(weight_decay), maximize=draw(st.booleans()))


@st.composite
def rmsprop_kwargs(draw):
    centered = draw(st.booleans())
    # Centered RMSprop takes square_avg - grad_avg**2; a small alpha makes that difference cancel to
    # rounding noise in torch's run and ours alike, and then no tolerance is meaningful.
    alpha = draw(st.floats(0.5, 0.999)) if centered else draw(st.floats(0.0, 0.999))
    return dict(lr=draw(lr), alpha=alpha, eps=draw(eps), weight_decay=draw(weight_decay),
                momentum=draw(st.one_of(st.just(0.0), unit)), centered=centered, maximize=draw(st.booleans()))


@st.composite
def adagrad_kwargs(draw):
    return dict(lr=draw(lr), lr_decay=draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.5))),
                weight_decay=draw(weight_decay), initial_accumulator_value=draw(st.floats(0.0, 1.0)),
                eps=draw(eps), maximize=draw(st.booleans()))


HYPER = {
    "Adam": adam_kwargs(),
    "AdamW": adam_kwargs(decoupled_option=False),
    "SGD": sgd_kwargs(),
    "RMSprop": rmsprop_kwargs(),
    "Adagrad": adagrad_kwargs(),
}


@st.composite
def specs(draw):
    """1 to 6 params, 1-d up to 300 elements or 2- to 4-d up to 12 per dimension, random layouts and
    storage offsets."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        shape = tuple(draw(st.one_of(st.lists(st.integers(0, 300), min_size=1, max_size=1),
                                     st.lists(st.integers(0, 12), min_size=2, max_size=4))))
        out.append(Spec(shape, channels_last=len(shape) == 4 and draw(st.booleans()),
                        offset=draw(st.sampled_from([0, 1, 3])),
                        grad=draw(st.sampled_from(["same", "transposed"])),
                        grad_offset=draw(st.sampled_from([0, 1, 3]))))
    return out


@pytest.mark.parametrize("name", list(HYPER))
@settings(max_examples=40, deadline=None)
@given(data=st.data(), param_specs=specs(), dtype=st.sampled_from([torch.float32, torch.float64]),
       steps=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_random_hyperparameters_and_shapes_match_torch(name, data, param_specs, dtype, steps, seed):
    kwargs = data.draw(HYPER[name], label="kwargs")
    params = make_params(param_specs, dtype, seed=seed)
    ours_p, ref_p = twin(params), twin(params)
    ours = make_optimizer("danlu", name, ours_p, **kwargs)
    ref = make_optimizer("torch", name, ref_p, **kwargs)
    train([(ours, ours_p), (ref, ref_p)], GradSource(param_specs, dtype, seed=seed + 1), steps)
    assert_optimizers_match(ours, ours_p, ref, ref_p, TOLERANCE[dtype])
