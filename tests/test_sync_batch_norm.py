"""danlu.nn.SyncBatchNorm: two gloo processes on the CPU, each with its part of a batch, against one process
running torch's BatchNorm on the whole batch; and the non-distributed behaviour and conversion."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import danlu.nn
from danlu._batch_norm import finalize_moments, native_moments

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
STEPS = 3
WORKER_TIMEOUT_S = 120  # generous for a loaded machine; a run takes a few seconds
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a mismatched collective fails instead of hanging


@dataclass(frozen=True)
class Case:
    shape: tuple  # the whole batch, (N, C, ...)
    splits: tuple  # samples on each rank, in rank order
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    activation: str = "identity"
    residual: bool = False
    x_grad: bool = True
    strided_params: bool = False  # weight and bias are strided views (read through their strides)
    inf_at: int | None = None  # sample that holds an inf in channel 0


CASES = {
    "nchw-fp32": Case((8, 3, 4, 5), (4, 4)),
    "channels_last-fp32": Case((8, 3, 4, 5), (4, 4), channels_last=True),
    "nchw-fp64-uneven": Case((8, 3, 4, 5), (3, 5), torch.float64),
    "channels_last-fp64-uneven": Case((8, 3, 4, 5), (5, 3), torch.float64, channels_last=True),
    "fp32-empty-rank": Case((6, 3, 4, 5), (0, 6)),
    "channels_last-fp64-empty-rank": Case((6, 3, 4, 5), (6, 0), torch.float64, channels_last=True),
    "fp32-all-ranks-empty": Case((0, 3, 4, 5), (0, 0)),
    "2d-cumulative-average": Case((10, 7), (4, 6), momentum=None),
    "5d-channels_last-not-affine": Case((4, 2, 3, 3, 3), (1, 3), torch.float64, channels_last=True, affine=False),
    "no-running-stats": Case((8, 3, 4, 5), (2, 6), track_running_stats=False),
    "relu-residual": Case((8, 3, 4, 5), (3, 5), channels_last=True, activation="relu", residual=True),
    "input-without-grad": Case((8, 3, 4, 5), (4, 4), torch.float64, x_grad=False),
    "strided-params": Case((8, 3, 4, 5), (3, 5), strided_params=True),
    "channels_last-strided-params-relu": Case((8, 3, 4, 5), (5, 3), channels_last=True, activation="relu",
                                              strided_params=True),
    "inf-on-the-second-rank": Case((8, 3, 4, 5), (4, 4), inf_at=6),
    "inf-on-the-first-rank-uneven": Case((9, 3, 4, 5), (2, 7), channels_last=True, inf_at=1),
}
# Cases where one rank holds the whole batch: that rank's results are the local BatchNorm's, bit for bit.
WHOLE_BATCH_ON_ONE_RANK = [name for name, case in CASES.items() if 0 in case.splits and sum(case.splits)]

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
TORCH_ACTIVATIONS = {"identity": lambda t: t, "relu": torch.relu}


# ---------------------------------------------------------------------------------------------
# What both sides run: the same batches, parameters and steps


def _memory_format(case):
    if not case.channels_last:
        return torch.contiguous_format
    return torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d


def _batch(case, seed, step):
    """(x, dy, residual or None) of the whole batch for one step."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    tensors = [torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2 + 0.5 for _ in range(3)]
    if case.inf_at is not None:
        tensors[0][case.inf_at, 0].view(-1)[step] = math.inf
    x, dy, res = (t.to(case.dtype).contiguous(memory_format=_memory_format(case)) for t in tensors)
    return x, dy, res if case.residual else None


def _init_params(bn, case, seed, strided=True):
    if case.affine:
        gen = torch.Generator().manual_seed(seed)
        values = [1 + 0.2 * torch.randn(bn.num_features, generator=gen, dtype=torch.float64),
                  0.2 * torch.randn(bn.num_features, generator=gen, dtype=torch.float64)]
        if case.strided_params and strided:  # every other element of a storage twice as long
            bn.weight, bn.bias = (torch.nn.Parameter(torch.zeros(2 * bn.num_features, dtype=case.dtype)[::2])
                                  for _ in range(2))
        with torch.no_grad():
            bn.weight.copy_(values[0])
            bn.bias.copy_(values[1])
    return bn


def _apply(bn, case, x, res):
    if hasattr(bn, "activation"):  # danlu's modules add the residual and activate themselves
        return bn(x, res)
    y = bn(x) if res is None else bn(x) + res
    return TORCH_ACTIVATIONS[case.activation](y)


def _grad(t):
    return None if t is None or t.grad is None else t.grad.clone()


def _train(bn, case, seed, rows):
    """STEPS training steps on the samples `rows` of each batch, then one in eval mode: what they produced."""
    steps = []
    for step in range(STEPS):
        x, dy, res = _batch(case, seed, step)
        x = x[rows].clone().requires_grad_(case.x_grad)
        res = res[rows].clone().requires_grad_() if res is not None else None
        y = _apply(bn, case, x, res)
        y.backward(dy[rows])
        steps.append(dict(y=y.detach(), dx=_grad(x), dres=_grad(res), dw=_grad(bn.weight), db=_grad(bn.bias)))
        bn.zero_grad(set_to_none=True)
    bn.eval()
    x, _, res = _batch(case, seed, 0)
    with torch.no_grad():
        y_eval = _apply(bn, case, x[rows], res[rows] if res is not None else None)
    buffers = {name: t.clone() for name, t in bn.named_buffers()}
    return dict(steps=steps, eval=y_eval, buffers=buffers)


def _rows_of(case, rank):
    start = sum(case.splits[:rank])
    return slice(start, start + case.splits[rank])


def _module_kwargs(case):
    return dict(momentum=case.momentum, affine=case.affine, track_running_stats=case.track_running_stats,
                dtype=case.dtype)


# ---------------------------------------------------------------------------------------------
# The worker processes


def _run_cases(rank):
    results = {}
    for seed, (name, case) in enumerate(CASES.items()):
        bn = danlu.nn.SyncBatchNorm(case.shape[1], activation=case.activation, **_module_kwargs(case))
        results[name] = _train(_init_params(bn, case, seed), case, seed, _rows_of(case, rank))
    return results


def _run_group_of_one(rank):
    """A SyncBatchNorm whose group holds one rank normalises with that rank's batch alone, as torch's does."""
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    case = CASES["nchw-fp32"]
    sync = _init_params(danlu.nn.SyncBatchNorm(3, process_group=groups[rank], **_module_kwargs(case)), case, 0)
    local = _init_params(danlu.nn.BatchNorm2d(3, **_module_kwargs(case)), case, 0)
    return [_train(bn, case, 0, _rows_of(case, rank)) for bn in (sync, local)]


DDP_BATCH = (8, 2, 3, 3)


def _ddp_model(norm_class):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), norm_class(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 1, 1)).double()


def _ddp_batch(step):
    return torch.randn(DDP_BATCH, generator=torch.Generator().manual_seed(step), dtype=torch.float64)


def _train_ddp_model(model, rows, loss_scale):
    """STEPS SGD steps on each batch's `rows`, loss = loss_scale * sum of squares; the final state_dict."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        (model(_ddp_batch(step)[rows]).square().sum() * loss_scale).backward()
        opt.step()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _run_ddp(rank):
    """danlu's SyncBatchNorm inside DistributedDataParallel on CPU modules (torch's SyncBatchNorm is refused)."""
    ddp = torch.nn.parallel.DistributedDataParallel(_ddp_model(danlu.nn.SyncBatchNorm))
    state = _train_ddp_model(ddp, slice(rank * DDP_BATCH[0] // WORLD, (rank + 1) * DDP_BATCH[0] // WORLD), 1.0)
    try:
        torch.nn.parallel.DistributedDataParallel(_ddp_model(torch.nn.SyncBatchNorm))
        torch_refusal = None
    except ValueError as error:
        torch_refusal = str(error)
    return {"state": {name.removeprefix("module."): t for name, t in state.items()}, "torch_refusal": torch_refusal}


def _run_bad_eps(rank):
    """eps = 0 in training: torch's ValueError on every rank before any collective or state change."""
    bn = danlu.nn.SyncBatchNorm(3, eps=0.0)
    try:
        bn(torch.randn(4, 3, 2, 2))
        error = None
    except ValueError as e:
        error = str(e)
    return {"error": error, "buffers": {name: t.clone() for name, t in bn.named_buffers()}}


def worker_main(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        results = dict(cases=_run_cases(rank), group_of_one=_run_group_of_one(rank), ddp=_run_ddp(rank),
                       bad_eps=_run_bad_eps(rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _loopback_interface():
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def _launch_workers(tmp_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    loopback = _loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback  # both ranks are here: no hostname lookup, no outside network
    store = os.path.join(tmp_dir, "store")
    return [subprocess.Popen([sys.executable, __file__, str(rank), store, str(tmp_dir)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(WORLD)]


def _wait(procs):
    """Each worker's output; kills them all if one runs past the timeout."""
    try:
        return [proc.communicate(timeout=WORKER_TIMEOUT_S)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"SyncBatchNorm workers did not finish within {WORKER_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What every rank recorded, in rank order: one launch of the workers for all the cases."""
    tmp_dir = tmp_path_factory.mktemp("sync_bn")
    procs = _launch_workers(tmp_dir)
    outputs = _wait(procs)
    failed = [(rank, out) for rank, (proc, out) in enumerate(zip(procs, outputs)) if proc.returncode != 0]
    if failed:
        pytest.fail("\n".join(f"rank {rank} failed:\n{out[-4000:]}" for rank, out in failed))
    return [torch.load(tmp_dir / f"rank{rank}.pt") for rank in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# Distributed against one process


def _reference(name, rows=slice(None)):
    case = CASES[name]
    bn_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                5: torch.nn.BatchNorm3d}[len(case.shape)]
    seed = list(CASES).index(name)
    # torch's reference gets the values of strided params in dense ones: torch 2.13's channels-last CPU backward
    # misreads a strided weight (its input grad then differs from the one with a dense weight of the same values).
    bn = _init_params(bn_class(case.shape[1], **_module_kwargs(case)), case, seed, strided=False)
    return _train(bn, case, seed, rows)


def _assert_close(actual, expected, case, what):
    torch.testing.assert_close(actual, expected, **TOLERANCE[case.dtype], equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_matches_one_process_on_the_whole_batch(ranks, name):
    case, expected = CASES[name], _reference(name)
    got = [r["cases"][name] for r in ranks]
    for step, ref in enumerate(expected["steps"]):
        for key in ("y", "dx", "dres"):  # per sample: each rank holds its slice
            if ref[key] is not None:
                _assert_close(torch.cat([g["steps"][step][key] for g in got]), ref[key], case, f"step {step} {key}")
        for key in ("dw", "db"):  # each rank's own sums, which DDP adds up (and divides by the world size)
            if ref[key] is not None:
                _assert_close(sum(g["steps"][step][key] for g in got), ref[key], case, f"step {step} {key}")
    # Eval mode never synchronises: without running stats each rank normalises its own batch.
    expected_eval = expected["eval"] if case.track_running_stats else torch.cat(
        [_reference(name, _rows_of(case, rank))["eval"] for rank in range(WORLD)])
    _assert_close(torch.cat([g["eval"] for g in got]), expected_eval, case, "eval output")
    for buffer, ref in expected["buffers"].items():
        _assert_close(got[0]["buffers"][buffer], ref, case, buffer)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_holds_the_same_running_stats(ranks, name):
    first, *others = (r["cases"][name]["buffers"] for r in ranks)
    for other in others:
        for buffer, value in first.items():
            torch.testing.assert_close(other[buffer], value, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{buffer} differs between ranks")


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.channels_last])
def test_keeps_channels_last(ranks, name):
    fmt = _memory_format(CASES[name])
    for rank in ranks:
        for step in rank["cases"][name]["steps"]:
            for key in ("y", "dx", "dres"):
                if step[key] is not None and step[key].numel() > 0:
                    assert step[key].is_contiguous(memory_format=fmt), key


def _assert_runs_identical(got, expected):
    for step_got, step_expected in zip(got["steps"], expected["steps"]):
        for key, value in step_expected.items():
            assert (step_got[key] is None) if value is None else torch.equal(step_got[key], value), key
    assert torch.equal(got["eval"], expected["eval"])
    assert got["buffers"].keys() == expected["buffers"].keys()
    for buffer, value in expected["buffers"].items():
        assert torch.equal(got["buffers"][buffer], value), buffer


@pytest.mark.parametrize("name", WHOLE_BATCH_ON_ONE_RANK)
def test_rank_with_the_whole_batch_is_local_batch_norm_bit_for_bit(ranks, name):
    """One pipeline: where the other ranks hold nothing, the group's statistics, running statistics, outputs and
    grads are the bits of danlu's BatchNorm on that rank alone (the merge with empty ranks is exact, and both
    take the same steps after it)."""
    case = CASES[name]
    seed = list(CASES).index(name)
    rank = case.splits.index(sum(case.splits))
    plain = {2: danlu.nn.BatchNormAct1d, 3: danlu.nn.BatchNormAct1d, 4: danlu.nn.BatchNormAct2d,
             5: danlu.nn.BatchNormAct3d}[len(case.shape)]
    local = _init_params(plain(case.shape[1], activation=case.activation, **_module_kwargs(case)), case, seed)
    _assert_runs_identical(ranks[rank]["cases"][name], _train(local, case, seed, _rows_of(case, rank)))


def test_bad_eps_raises_on_every_rank_before_anything_changes(ranks):
    for rank in ranks:
        assert rank["bad_eps"]["error"] == "batch_norm eps must be positive during training, but got 0.0"
        assert int(rank["bad_eps"]["buffers"]["num_batches_tracked"]) == 0
        assert torch.equal(rank["bad_eps"]["buffers"]["running_mean"], torch.zeros(3))


def test_group_of_one_rank_is_local_batch_norm(ranks):
    for sync, local in (r["group_of_one"] for r in ranks):
        _assert_runs_identical(sync, local)


# ---------------------------------------------------------------------------------------------
# Without a process group


@pytest.mark.parametrize("name", ["nchw-fp32", "channels_last-fp64-uneven", "2d-cumulative-average",
                                  "no-running-stats", "relu-residual"])
def test_without_process_group_is_batch_norm(name):
    case = CASES[name]
    plain = {2: danlu.nn.BatchNormAct1d, 4: danlu.nn.BatchNormAct2d}[len(case.shape)]
    sync = _init_params(danlu.nn.SyncBatchNorm(case.shape[1], activation=case.activation,
                                               **_module_kwargs(case)), case, 0)
    local = _init_params(plain(case.shape[1], activation=case.activation, **_module_kwargs(case)), case, 0)
    _assert_runs_identical(*(_train(bn, case, 0, slice(None)) for bn in (sync, local)))


@pytest.mark.parametrize("sizes", [(7,), (0, 0), (3, 0, 5), (4, 1, 0, 6, 2), (2, 3, 5, 7, 11, 13, 0, 1, 9)])
def test_merge_of_ranks_statistics_is_one_pass_over_all(sizes):
    """What every rank does with the gathered moments, for any number of ranks, odd ones and ranks without
    samples included: the merged moments and statistics are those of one pass over all samples."""
    gen = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 3 + 100 for n in sizes]
    gathered = torch.stack([native_moments(p) for p in parts])
    whole = torch.cat(parts)
    mean, invstd, var = finalize_moments(whole, gathered, 1e-5)
    count, merged_mean, m2 = gathered[0].unbind(1)
    assert torch.equal(count, torch.full((4,), float(len(whole)), dtype=torch.float64))
    if len(whole):
        torch.testing.assert_close(merged_mean, whole.mean(0), rtol=1e-13, atol=0)
        torch.testing.assert_close(mean, whole.mean(0), rtol=1e-13, atol=0)
        torch.testing.assert_close(m2, ((whole - whole.mean(0)) ** 2).sum(0), rtol=1e-11, atol=0)
        torch.testing.assert_close(invstd, (whole.var(0, unbiased=False) + 1e-5).rsqrt(), rtol=1e-11, atol=0)
        if len(whole) > 1:
            torch.testing.assert_close(var, whole.var(0), rtol=1e-11, atol=0)
    else:
        assert not merged_mean.any() and not m2.any()


def test_ddp_on_cpu_modules(ranks):
    """DDP averages the ranks' grads: the same training as one process on the whole batch with the loss divided
    by the world size, and every rank ends with the same parameters and running statistics."""
    expected = _train_ddp_model(_ddp_model(torch.nn.BatchNorm2d), slice(None), 1.0 / WORLD)
    for rank in ranks:
        state = rank["ddp"]["state"]
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-10, atol=1e-10,
                                       msg=lambda m, n=name: f"{n}: {m}")
        assert "only work with GPU modules" in rank["ddp"]["torch_refusal"]  # what torch's own class gets


def test_has_torch_sync_batch_norms_state_dict():
    ours, theirs = danlu.nn.SyncBatchNorm(5, momentum=None), torch.nn.SyncBatchNorm(5, momentum=None)
    # Not a torch.nn.SyncBatchNorm: DDP would refuse it in CPU modules (see test_ddp_on_cpu_modules).
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(ours, torch.nn.SyncBatchNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.running_mean.fill_(0.5)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    theirs.load_state_dict(danlu.nn.SyncBatchNorm(5).state_dict())


def test_rejects_what_torch_rejects():
    bn = danlu.nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2D"):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match="non-zero"):
        danlu.nn.SyncBatchNorm(0)(torch.randn(4, 0))
    with pytest.raises(ValueError, match="unknown activation"):
        danlu.nn.SyncBatchNorm(3, activation="gelu")


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), danlu.nn.BatchNorm2d(3, momentum=None),
        danlu.nn.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(48, affine=False)))
    x = torch.randn(4, 2, 4, 4)
    model(x)  # running stats that differ from their initial values
    model.eval()
    expected = model(x)
    originals = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    group = object()  # never used: no statistics are synchronised in eval mode
    converted = danlu.nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    synced = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(synced) == len(originals) == 4
    assert isinstance(converted[0], torch.nn.Conv2d)
    for new, old in zip(synced, originals):
        assert type(new) is danlu.nn.SyncBatchNorm
        assert new.process_group is group and not new.training
        assert (new.momentum, new.affine, new.eps) == (old.momentum, old.affine, old.eps)
        assert (new.activation, new.act_param) == (getattr(old, "activation", "identity"),
                                                   getattr(old, "act_param", None))
        assert new.state_dict().keys() == old.state_dict().keys()
        for key in old.state_dict():
            assert getattr(new, key) is getattr(old, key), key  # shared, as torch's conversion shares them
    single = danlu.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert type(single) is danlu.nn.SyncBatchNorm and single.process_group is None
    torch.testing.assert_close(converted(x), expected)


if __name__ == "__main__":
    try:
        worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
