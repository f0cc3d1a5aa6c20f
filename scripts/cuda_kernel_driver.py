"""Calls every kernel of danlu once through the public Python API, on odd sizes and misaligned storage.

It is the program that scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck,
initcheck), so each CUDA kernel is launched on inputs where indexing, vector-width tails and alignment go wrong
if they can: every optimizer rule in every dtype, plain, with a tensor lr and under GradScaler (grad_scale,
found_inf and a skipped step); BatchNorm statistics, forward and backward in NCHW and channels-last with each
activation, with and without a residual, in training and evaluation; dropout forward and backward, in place,
without autograd, on non-dense input, and dropout_add with and without a bias.

With --reference (the default) every result is also compared with PyTorch on the same inputs, loosely: this finds
a kernel that wrote the wrong elements, not a last-bit difference (tests/ does that). Under a sanitizer,
--no-reference leaves PyTorch's own kernels out, which are many and each is instrumented at its first launch.
--device cpu runs the same calls on the CPU kernels: that is how the driver itself is tested without a GPU.

Prints one line per case and a closing count; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

import danlu
import danlu.functional as DF
import danlu.optim

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Loose bounds on max |ours - torch| / max |torch|: a dropped or misplaced element is off by O(1).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 8e-2}
SEED = 20261204


class Mismatch(AssertionError):
    pass


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values, strides and shape in a fresh storage that starts one element late: not 16-byte aligned."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    base = torch.empty(span + 1, dtype=t.dtype, device=t.device)
    return base.as_strided(t.shape, t.stride(), 1).copy_(t)


def check_close(what: str, ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        raise Mismatch(f"{what}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
    if ours.numel() == 0:
        return
    if not torch.equal(ours.isfinite(), ref.isfinite()):
        raise Mismatch(f"{what}: non-finite values where torch has none, or the other way round")
    difference = torch.where(ref.isfinite(), (ours - ref).abs(), 0.0)
    scale = max(float(torch.where(ref.isfinite(), ref.abs(), 0.0).max()), 1e-6)
    error = float(difference.max()) / scale
    if error > TOLERANCE[dtype]:
        raise Mismatch(f"{what}: error {error:.3g} (of the largest |value|, {scale:.3g}) > {TOLERANCE[dtype]:g} at "
                       f"element {int(difference.argmax())} of {ref.numel()}")


# ---------------------------------------------------------------------------------------------------------------
# Optimizers: one bucket of many odd-sized tensors, half of them misaligned, three steps.

OPTIM_CONFIGS = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-2)),
    ("RMSprop", dict(lr=1e-2, momentum=0.9)),
    ("RMSprop", dict(lr=1e-2, centered=True)),
    ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
]
OPTIM_SHAPES = [(1,), (3,), (17, 5), (1021,), (4099,), (33, 31)]
OPTIM_VARIANTS = ("plain", "tensor-lr", "grad-scaler")
STEPS = 3
INF_STEP = 1  # the GradScaler variant puts an inf in one grad at this step: the step must be skipped


def optim_case(name, kwargs, dtype, variant, device, reference):
    gen = torch.Generator().manual_seed(SEED)
    values = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in OPTIM_SHAPES]
    grads = [[torch.randn(shape, generator=gen, dtype=torch.float64) for shape in OPTIM_SHAPES]
             for _ in range(STEPS)]

    def params(dt):
        made = [v.to(device=device, dtype=dtype).to(dt, copy=True) for v in values]
        return [torch.nn.Parameter(misaligned(t) if i % 2 else t) for i, t in enumerate(made)]

    # torch's for-loop optimizers do 16-bit math in 16 bits, danlu in float32 (as torch's fused ones do): the
    # reference runs in float32 on the same 16-bit values and grads.
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ours_p, ref_p = params(dtype), params(ref_dtype)
    ours_kwargs = dict(kwargs)
    if variant == "tensor-lr":
        ours_kwargs["lr"] = torch.tensor(kwargs["lr"], dtype=torch.float64, device=device)
    ours = getattr(danlu.optim, name)(ours_p, **ours_kwargs)
    ref = getattr(torch.optim, name)(ref_p, foreach=False, **kwargs) if reference else None
    runs = [(ours, ours_p)] + ([(ref, ref_p)] if reference else [])
    for step in range(STEPS):
        for opt, ps in runs:
            opt.zero_grad()
            if variant == "grad-scaler":
                scaler = torch.amp.GradScaler(device.type, init_scale=2.0**4)
                loss = sum((p.double() * g.to(device)).sum() for p, g in zip(ps, grads[step]))
                scaler.scale(loss).backward()
                if step == INF_STEP:
                    ps[-1].grad.view(-1)[-1] = float("inf")
                scaler.step(opt)
                scaler.update()
            else:
                for i, (p, g) in enumerate(zip(ps, grads[step])):
                    g = g.to(device=device, dtype=dtype).to(p.dtype, copy=True)
                    p.grad = misaligned(g) if i % 3 == 1 else g
                opt.step()
    if reference:
        for i, (p, q) in enumerate(zip(ours_p, ref_p)):
            check_close(f"param {i}", p, q, dtype)
            for key, value in ref.state[q].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    check_close(f"state {key!r} of param {i}", ours.state[p][key], value, dtype)


def optim_cases(device, reference, dtypes):
    for name, kwargs in OPTIM_CONFIGS:
        options = ",".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")
        for dtype in dtypes:
            for variant in OPTIM_VARIANTS:
                yield (f"optim {name}({options}) {dtype_name(dtype)} {variant}",
                       lambda n=name, k=kwargs, d=dtype, v=variant: optim_case(n, k, d, v, device, reference))


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm: statistics, forward and backward (reduction and apply), training and evaluation.

ACTIVATIONS = {"identity": None, "relu": torch.relu, "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01),
               "elu": torch.nn.functional.elu, "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid,
               "tanh": torch.tanh}
# (shape, memory format): inner > 1 (NCHW), inner = 1 (channels-last and 2-D), 3-D and 5-D; all of odd sizes.
BN_LAYOUTS = {
    "NCHW": ((3, 5, 7, 9), torch.contiguous_format),
    "NHWC": ((3, 5, 7, 9), torch.channels_last),
}
BN_EXTRA_LAYOUTS = {
    "NC": ((37, 5), torch.contiguous_format),
    "NCL": ((4, 6, 13), torch.contiguous_format),
    "NCDHW": ((2, 3, 3, 5, 7), torch.contiguous_format),
    "NDHWC": ((2, 3, 3, 5, 7), torch.channels_last_3d),
}


def batch_norm_case(shape, memory_format, dtype, activation, residual, training, device, reference):
    gen = torch.Generator().manual_seed(SEED)
    channels = shape[1]
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    res64 = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
    dy64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight64 = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias64 = torch.randn(channels, generator=gen, dtype=torch.float64)
    mean64 = torch.randn(channels, generator=gen, dtype=torch.float64)
    var64 = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    affine_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def inputs(dt, affine_dt):
        def dense(t):
            return misaligned(t.to(device=device, dtype=dt).contiguous(memory_format=memory_format))

        def channel(t):
            return t.to(device=device, dtype=affine_dt, copy=True)

        x = dense(x64).requires_grad_()
        res = dense(res64).requires_grad_() if residual else None
        w, b = channel(weight64).requires_grad_(), channel(bias64).requires_grad_()
        return x, res, w, b, channel(mean64), channel(var64)

    x, res, w, b, running_mean, running_var = inputs(dtype, affine_dtype)
    y = DF.batch_norm_act(x, running_mean, running_var, w, b, training, 0.1, 1e-5, activation, None, res)
    y.backward(dy64.to(device=device, dtype=dtype).contiguous(memory_format=memory_format))
    if not reference:
        return
    rx, rres, rw, rb, rmean, rvar = inputs(torch.float64, torch.float64)
    ry = torch.nn.functional.batch_norm(rx, rmean, rvar, rw, rb, training, 0.1, 1e-5)
    if residual:
        ry = ry + rres
    if ACTIVATIONS[activation] is not None:
        ry = ACTIVATIONS[activation](ry)
    ry.backward(dy64.to(device))
    for what, ours, ref in (("y", y, ry), ("dx", x.grad, rx.grad), ("dweight", w.grad, rw.grad),
                            ("dbias", b.grad, rb.grad), ("running_mean", running_mean, rmean),
                            ("running_var", running_var, rvar)) + ((("dresidual", res.grad, rres.grad),)
                                                                    if residual else ()):
        check_close(what, ours, ref, dtype)


def batch_norm_cases(device, reference, dtypes):
    def case(layout, shape, fmt, dtype, activation, residual, training):
        mode = "train" if training else "eval"
        plus = "+residual" if residual else ""
        name = f"batch_norm {layout}{list(shape)} {dtype_name(dtype)} {activation}{plus} {mode}"
        return name, lambda: batch_norm_case(shape, fmt, dtype, activation, residual, training, device, reference)

    for layout, (shape, fmt) in BN_LAYOUTS.items():
        for dtype in dtypes:
            for activation in ACTIVATIONS:
                for residual in (False, True):
                    for training in (True, False):
                        yield case(layout, shape, fmt, dtype, activation, residual, training)
    for layout, (shape, fmt) in BN_EXTRA_LAYOUTS.items():
        for dtype in dtypes:
            yield case(layout, shape, fmt, dtype, "relu", True, True)


# ---------------------------------------------------------------------------------------------------------------
# Dropout family: forward with and without a mask, backward from the 1-bit mask, dropout_add with a bias.

DROPOUT_NUMELS = (1, 3, 33, 1021, 4099, 65537)


def dropout_inputs(numel, dtype, device, gen):
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    x = x + x.sign() * 0.25  # no element near 0: a kept element is never mistaken for a dropped one
    return misaligned(x.to(device=device, dtype=dtype))


def check_dropout(what, y, x, keep_prob, dtype, reference, device, y_cpu=None):
    """y is x / keep_prob where kept and 0 where dropped; on CUDA, the same elements as the CPU kernels keep."""
    if not reference:
        return
    kept = y != 0
    check_close(what, torch.where(kept, y, torch.zeros_like(y)), torch.where(kept, x.double() / keep_prob, 0.0),
                dtype)
    if y_cpu is not None and not torch.equal(kept.cpu(), y_cpu != 0):
        raise Mismatch(f"{what}: CUDA dropped other elements than the CPU kernels for the same seed")


def dropout_case(numel, dtype, p, kind, device, reference):
    gen = torch.Generator().manual_seed(SEED + numel)
    keep = 1.0 - p
    x = dropout_inputs(numel, dtype, device, gen)

    def run(on):  # the same call on `on`, with a generator seeded alike: the same mask on every device
        seeded = torch.Generator().manual_seed(SEED)
        xs = x.to(on)
        if kind == "autograd":
            xs = xs.detach().requires_grad_()
            y = DF.dropout(xs, p, True, False, seeded)
            y.backward(torch.ones_like(y))
            return xs, y, xs.grad
        if kind == "inplace":
            xs = misaligned(xs)
            return xs, DF.dropout(xs, p, True, True, seeded), None
        if kind == "no-grad":
            with torch.no_grad():
                return xs, DF.dropout(xs, p, True, False, seeded), None
        # non-dense: every other element of a 2-D view, copied before the kernel and back after it
        wide = torch.zeros(numel, 2, dtype=xs.dtype, device=on)
        wide[:, 0] = xs
        view = wide[:, 0]
        return xs, DF.dropout(view, p, True, True, seeded), None

    xs, y, dx = run(device)
    y_cpu = run(torch.device("cpu"))[1] if device.type == "cuda" and reference else None
    check_dropout("y", y, x, keep, dtype, reference, device, y_cpu)
    if dx is not None and reference:
        check_close("dx", dx, (y != 0).double() / keep, dtype)


def dropout_add_case(rows, cols, dtype, with_bias, device, reference):
    gen = torch.Generator().manual_seed(SEED + rows * cols)
    keep = 0.7
    x = dropout_inputs(rows * cols, dtype, device, gen).view(rows, cols)
    residual = misaligned(torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device, dtype))
    bias = torch.randn(cols, generator=gen, dtype=torch.float64).to(device, dtype) if with_bias else None

    def run(on):
        xs, rs = x.to(on).detach().requires_grad_(), residual.to(on).detach().requires_grad_()
        bs = bias.to(on).detach().requires_grad_() if with_bias else None
        y = DF.dropout_add(xs, rs, 1 - keep, True, bs, torch.Generator().manual_seed(SEED))
        y.backward(torch.ones_like(y))
        return y, xs.grad, rs.grad, bs.grad if with_bias else None

    y, dx, dresidual, dbias = run(device)
    if not reference:
        return
    # The backward's mask (dx = mask / keep) must be 0 or 1 and be the one the forward applied.
    mask = dx.double() * keep
    if not bool(((mask == 0) | ((mask - 1).abs() < 1e-2)).all()):
        raise Mismatch("dx: elements other than 0 and 1 / keep")
    pre = x.double() + (bias.double() if with_bias else 0.0)
    check_close("y", y, residual.double() + mask.round() * pre / keep, dtype)
    check_close("dresidual", dresidual, torch.ones_like(pre), dtype)
    if with_bias:
        check_close("dbias", dbias, dx.double().sum(0), dtype)
    if device.type == "cuda" and not torch.equal(dx.cpu(), run(torch.device("cpu"))[1]):
        raise Mismatch("dx: CUDA dropped other elements than the CPU kernels for the same seed")


def feature_dropout_case(dtype, device, reference):
    gen = torch.Generator().manual_seed(SEED)
    x = misaligned(torch.randn(3, 5, 7, 9, generator=gen, dtype=torch.float64).to(device, dtype))
    y2d = DF.dropout2d(x, 0.4, True, False, torch.Generator().manual_seed(SEED))
    y_path = DF.drop_path(x, 0.4, True, True, torch.Generator().manual_seed(SEED))
    if reference:
        for what, y, dims in (("dropout2d", y2d, (2, 3)), ("drop_path", y_path, (1, 2, 3))):
            kept = (y != 0).all(dim=dims, keepdim=True) | (y == 0).all(dim=dims, keepdim=True)
            if not bool(kept.all()):
                raise Mismatch(f"{what}: a channel or sample was dropped only in part")
            check_close(what, y, torch.where(y != 0, x.double() / 0.6, 0.0), dtype)


def dropout_cases(device, reference, dtypes):
    for dtype in dtypes:
        for numel in DROPOUT_NUMELS:
            for kind, p in (("autograd", 0.3), ("inplace", 0.5), ("no-grad", 0.1), ("non-dense", 0.5)):
                yield (f"dropout {kind} n={numel} p={p} {dtype_name(dtype)}",
                       lambda n=numel, d=dtype, q=p, k=kind: dropout_case(n, d, q, k, device, reference))
        for rows, cols in ((5, 7), (33, 129)):
            for with_bias in (False, True):
                yield (f"dropout_add {rows}x{cols}{' +bias' if with_bias else ''} {dtype_name(dtype)}",
                       lambda r=rows, c=cols, d=dtype, b=with_bias: dropout_add_case(r, c, d, b, device, reference))
        yield (f"dropout2d and drop_path {dtype_name(dtype)}",
               lambda d=dtype: feature_dropout_case(d, device, reference))


# ---------------------------------------------------------------------------------------------------------------

FAMILIES = {"optim": optim_cases, "batchnorm": batch_norm_cases, "dropout": dropout_cases}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"families, of {', '.join(FAMILIES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"of {', '.join(DTYPES)}")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="compare every result with PyTorch (default); --no-reference under a sanitizer")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    cases = [case for family in args.only.split(",") for case in FAMILIES[family](device, args.reference, dtypes)]
    if args.list:
        print("\n".join(name for name, _ in cases))
        return 0
    if device.type == "cuda" and not (torch.cuda.is_available() and danlu.cuda_available()):
        print(f"cuda_kernel_driver: no CUDA here (torch.cuda.is_available(): {torch.cuda.is_available()}, "
              f"danlu.cuda_available(): {danlu.cuda_available()}); use --device cpu", file=sys.stderr)
        return 2
    torch.manual_seed(SEED)
    failed = 0
    start = time.perf_counter()
    for name, run in cases:
        try:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()  # an asynchronous error shows at the case that caused it
            print(f"ok    {name}", flush=True)
        except Exception as error:  # noqa: BLE001 (every failure is reported, then the next case runs)
            failed += 1
            detail = str(error) if isinstance(error, Mismatch) else traceback.format_exc(limit=-3).strip()
            print(f"FAIL  {name}: {detail}", flush=True)
            if device.type == "cuda" and not isinstance(error, Mismatch):
                break  # a CUDA error poisons the context: later cases would only repeat it
    print(f"cuda_kernel_driver on {device}: {len(cases) - failed} of {len(cases)} cases ok, {failed} failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
