"""The benchmark harness runs end to end on the CPU in its smallest mode (``--smoke``) and writes a row per
implementation, for every family. Timings are never asserted: a benchmark is not a test (docs/design.md); the
timing engine's arithmetic (ratios, quartiles, flags, pruning, reruns, memory groups) is checked on
made-up times.

The smoke run uses one thread: on a shared 2-core machine a parallel region stalls whenever another process
holds a core, which turns milliseconds into seconds without testing anything more."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import batchnorm, dropout, e2e, harness, models, optim, peers, shapes  # noqa: E402

OPTIM_IMPLS = {"danlu", "torch-forloop", "torch-foreach", "torch-fused"}
SMOKE = harness.MODES["smoke"]
CPU = torch.device("cpu")


def run_harness(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    result = run_harness("--device", "cpu", "--smoke", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout, json.loads((out / "results.json").read_text())


def family_rows(results, family):
    return [r for r in results["rows"] if r["family"] == family]


def test_json_has_metadata(smoke):
    _, _, results = smoke
    meta = results["metadata"]
    assert meta["device"] == "cpu" and meta["device_name"]
    assert meta["torch"] == torch.__version__
    assert meta["copy_gbps"]["1"] > 0 and meta["threads"] == [1] and meta["clocks"] == {"1": "cpu"}
    assert meta["mode"] == "smoke" and meta["quick"] is False
    assert {"danlu", "commit", "date", "seconds", "cores", "fraction_ceiling", "spread_limit"} <= meta.keys()


def test_every_family_ran(smoke):
    _, _, results = smoke
    assert {r["family"] for r in results["rows"]} == set(harness.FAMILIES)
    assert not [s for s in results["skipped"] if s["failed"]]


def test_rows_carry_the_interleaved_statistics(smoke):
    _, _, results = smoke
    for row in results["rows"]:
        assert row["threads"] == 1 and row["rounds"] >= SMOKE.floor_rounds and row["calls_per_block"] >= 1
        assert row["ms_q25"] <= row["ms"] <= row["ms_q75"]
        assert row["best_peer"] and not row["best_peer"].startswith("danlu")
        assert row["speedup_q25"] <= row["speedup"] <= row["speedup_q75"]
        if row["impl"] == row["best_peer"]:
            assert row["speedup"] == row["speedup_q25"] == row["speedup_q75"] == 1.0
        assert row["unstable"] == bool({"noisy", "above-limit", "stalled"} & set(row["flags"]))
        assert row["attempts"] == 1 and row["peak_mem_mib"] is None  # no reruns in smoke; peak memory is CUDA only


def test_optim_rows(smoke):
    _, _, results = smoke
    rows, skipped = family_rows(results, "optim"), results["skipped"]
    cases = {row["case"] for row in rows}
    assert cases == {case.name for case in optim.cases(CPU, SMOKE)}
    assert {case.split("/")[0] for case in cases} == {o.label for o in optim.OPTIMIZERS}
    assert {case for case in cases if case.endswith("/bf16")} == {"Adam/23-tiny/bf16"}
    for case in cases:
        ran = {row["impl"] for row in rows if row["case"] == case}
        not_run = {s["impl"] for s in skipped if s["case"] == case}
        with_deepspeed = case.split("/")[0] in peers.DEEPSPEED_OPTIMIZERS
        assert ran | not_run == OPTIM_IMPLS | ({"deepspeed"} if with_deepspeed else set()), case
        assert not ran & not_run and {"danlu", "torch-forloop", "torch-foreach"} <= ran, case
    for row in rows:
        assert row["ms"] > 0 and row["gbps"] > 0 and row["fraction"] > 0 and row["n_tensors"] > 0
        assert row["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[row["case"].rsplit("/", 1)[1]]


def test_torch_fused_exactly_where_torch_has_it(smoke):
    _, _, results = smoke
    ran = {(row["case"].split("/")[0], row["impl"]) for row in family_rows(results, "optim")}
    for o in optim.OPTIMIZERS:
        has_fused = "fused" in inspect.signature(getattr(torch.optim, o.cls)).parameters
        assert ((o.label, "torch-fused") in ran) == has_fused, o.label


def test_optional_peers_run_or_say_why_not(smoke):
    _, stdout, results = smoke
    for peer, family in (("deepspeed", "optim"), ("timm", "batchnorm")):
        ran = [r for r in family_rows(results, family) if r["impl"] == peer]
        notes = [s for s in results["skipped"] if s["impl"] == peer]
        assert bool(ran) != bool(notes), peer  # everywhere or nowhere on one machine
        assert all("not importable" in s["reason"] or "does not build" in s["reason"] for s in notes)
        assert all(f"not run: {s['case']} {peer}" in stdout for s in notes)
    timm_cases = {r["case"] for r in family_rows(results, "batchnorm") if r["impl"] == "timm"}
    timm_cases |= {s["case"] for s in results["skipped"] if s["impl"] == "timm"}
    assert timm_cases and all(case.startswith("BN+ReLU-") for case in timm_cases)


def test_deepspeed_gets_torchs_hyper_parameters(monkeypatch):
    made = {}

    class FakeDeepSpeed:
        def __init__(self, params, **kwargs):
            made.update(kwargs)
            self.params = params

        def step(self):
            pass

    monkeypatch.setattr(peers, "deepspeed_optimizer", lambda name, device: FakeDeepSpeed)
    for label, expected in (("AdamW", {"adamw_mode": True, "weight_decay": 1e-2, "lr": 1e-3, "eps": 1e-8}),
                            ("Adam", {"adamw_mode": False, "weight_decay": 0, "betas": (0.9, 0.999)}),
                            ("Adagrad", {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0})):
        for dtype in (torch.float32, torch.bfloat16):
            opt = next(o for o in optim.OPTIMIZERS if o.label == label)
            case = optim.optimizer_case(opt, "tiny", [(3,)], CPU, dtype)
            made.clear()
            next(i for i in case.impls if i.name == "deepspeed").build()
            assert expected.items() <= made.items() and made["fp32_optimizer_states"] == (dtype == torch.float32)


def test_markdown_and_terminal_tables(smoke):
    out, stdout, results = smoke
    markdown = (out / "results.md").read_text()
    assert results["metadata"]["device_name"] in markdown
    assert markdown.index("## Training step, end to end") < markdown.index("## Kernels")
    for row in results["rows"]:
        assert f"| {row['impl']} | 1 |" in markdown and row["impl"] in stdout
    for case in {row["case"] for row in results["rows"]}:
        assert f"| {case} |" in markdown
    assert "copy bandwidth" in stdout


def test_plain_progress_lines_when_not_a_terminal(smoke):
    _, stdout, results = smoke
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    cases = list(dict.fromkeys(row["case"] for row in results["rows"]))
    assert len(lines) == len(cases)
    assert lines[0].startswith(f"[  1/{len(cases)} ") and f"1thr] {cases[0]}: danlu " in lines[0]


def test_charts_when_matplotlib_is_installed(smoke):
    pytest.importorskip("matplotlib")
    out, _, _ = smoke
    for family in harness.FAMILIES:
        assert (out / f"{family}-speedup.png").stat().st_size > 0
    for family in ("optim", "batchnorm", "dropout"):  # e2e has no bytes model
        assert (out / f"{family}-fraction.png").stat().st_size > 0


def test_batchnorm_rows(smoke):
    _, _, results = smoke
    rows = [r for r in family_rows(results, "batchnorm") if r["impl"] != "timm"]
    grid = batchnorm.case_grid(SMOKE)
    assert {(v.label, p, d, layout) for v, p, d, _, layout in grid} == {
        (v.label, p, d, layout) for v in batchnorm.VARIANTS for p in batchnorm.PASSES
        for d in batchnorm.DTYPES for layout in batchnorm.LAYOUTS}
    assert sorted((r["case"], r["impl"]) for r in rows) == sorted(
        (case.name, impl) for case in batchnorm.cases(CPU, SMOKE) for impl in ("danlu", "torch"))
    for row in rows:
        variant, pass_ = row["case"].split("/")[0].rsplit("-", 1)
        residual = variant == "BN+add+ReLU"
        itemsize = {"float32": 4, "bfloat16": 2}[row["dtype"]]
        assert row["case"].endswith({"float32": "/fp32", "bfloat16": "/bf16"}[row["dtype"]])
        assert row["bytes_moved"] == ((8 if pass_ == "train" else 2) + residual * (2 if pass_ == "train" else 1)) \
            * row["numel"] * itemsize
        assert row["n_tensors"] == 1 + residual
        assert row["ms"] > 0 and row["gbps"] > 0 and row["speedup"] > 0


def test_batchnorm_grids():
    full = batchnorm.cases(CPU, harness.MODES["full"])
    quick = batchnorm.cases(CPU, harness.MODES["quick"])
    assert [batchnorm.streams_per_element(v, training) for v in batchnorm.VARIANTS
            for training in (True, False)] == [8, 2, 8, 2, 10, 3]
    assert len(full) == 3 * 2 * 5 * 2 * 2  # variants, passes, shapes, layouts, dtypes
    for grid in (full, quick):  # names key the charts: one per case
        assert len({case.name for case in grid}) == len(grid)
    assert {case.name.split("/")[1] for case in full} == {"32x64x56x56", "32x128x28x28", "32x256x14x14",
                                                          "32x512x7x7", "32x2048x7x7"}
    assert {case.dtype for case in quick} == {torch.float32, torch.bfloat16}
    assert all(case.name.startswith("BN-") for case in quick if case.dtype == torch.bfloat16)


def test_dropout_rows(smoke):
    _, _, results = smoke
    rows = family_rows(results, "dropout")
    assert sorted((r["case"], r["impl"]) for r in rows) == sorted(
        (case.name, impl.name) for case in dropout.cases(CPU, SMOKE) for impl in case.impls)
    assert {r["impl"] for r in rows if r["case"].startswith("Dropout-")} == {"danlu", "danlu-regenerate", "torch"}
    for row in rows:
        variant, pass_ = row["case"].split("/")[0].rsplit("-", 1)
        itemsize = {"float32": 4, "bfloat16": 2}[row["dtype"]]
        streams = 2 + (variant == "dropout_add") + 2 * (pass_ == "train")
        mask_bytes = row["numel"] // 8 * (2 if pass_ == "train" else 1)
        assert row["bytes_moved"] == streams * row["numel"] * itemsize + mask_bytes
        assert row["ms"] > 0 and row["gbps"] > 0 and row["speedup"] > 0


def test_e2e_rows_have_step_times_and_profiles(smoke):
    _, _, results = smoke
    rows = family_rows(results, "e2e")
    assert sorted((r["case"], r["impl"]) for r in rows) == sorted(
        (case.name, impl.name) for case in e2e.cases(CPU, SMOKE) for impl in case.impls)
    for row in rows:
        assert row["bytes_moved"] is None and row["gbps"] is None and row["fraction"] is None
        prof = row["extra"]["profile"]
        assert prof["clock"] == "cpu" and prof["op_ms"] > 0 and 0 < prof["replaced_share"] < 1
        assert prof["optimizer_ms"] > 0
        if row["case"].startswith("resnet"):
            assert prof["batchnorm_ms"] > 0 and prof["dropout_ms"] == 0
        else:
            assert prof["dropout_ms"] > 0 and prof["batchnorm_ms"] == 0


def test_the_two_models_of_a_case_are_the_same_network():
    """Same weights and state_dict keys; in eval mode (no dropout, running statistics) the same outputs."""
    for make, shape in ((lambda d: models.ResNet18(d, width=8), (2, 3, 16, 16)),
                        (lambda d: models.Transformer(d, dim=32, depth=2), (2, 8, 32))):
        torch.manual_seed(0)
        reference = make(False).eval()
        torch.manual_seed(0)
        ours = make(True).eval()
        assert reference.state_dict().keys() == ours.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert torch.equal(value, ours.state_dict()[key]), key
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


def test_replaced_time_counts_forward_and_backward_once():
    """The profile of a tiny step: BatchNorm's forward (the outer labelled range only) and backward (by
    sequence number) land in "batchnorm"; the convolution does not; the optimizer step is counted."""
    torch.manual_seed(0)
    net = models.ResNet18(False, width=4)
    step = e2e.TrainingStep(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.randn(2, 3, 8, 8),
                            torch.tensor([1, 2]), CPU, profile_steps=1)
    step()
    with e2e._labelled(net), torch.profiler.profile() as prof:
        step()
    events = prof.events()
    totals = e2e.replaced_time(events, device_clock=False)
    outer_bn = [e for e in events if e.name == e2e.LABEL + "batchnorm"
                and e2e.LABEL + "batchnorm" not in _ancestors(e)]
    bn_backward = [e for e in events if e.name.startswith(e2e.BACKWARD)
                   and e.name.endswith(("NativeBatchNormBackward0", "ReluBackward0", "AddBackward0"))]
    assert len(outer_bn) == 20  # stem, 2 per block, 3 shortcuts
    assert totals["batchnorm"] == pytest.approx(sum(e.cpu_time_total for e in outer_bn + bn_backward))
    assert totals["optimizer"] > 0 and totals["dropout"] == 0
    assert totals["total"] > totals["batchnorm"] + totals["optimizer"]


def _ancestors(event):
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def test_e2e_grid():
    for mode in ("full", "quick"):
        grid = e2e.model_grid(CPU, harness.MODES[mode])
        assert grid[0][0].label.startswith("resnet18/b") and grid[-1][0].label.startswith("transformer-d256")
    assert e2e.model_grid(CPU, harness.MODES["full"])[0][0].input_shape == (64, 3, 32, 32)
    assert [c.impls[-1].name for c in e2e.cases(CPU, SMOKE)] == ["torch-fused"] * 2


def test_two_thread_counts(tmp_path):
    result = run_harness("--device", "cpu", "--smoke", "--only", "dropout", "--threads", "1,2", "--out",
                         str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["metadata"]["copy_gbps"]) == {"1", "2"}
    assert results["metadata"]["clocks"] == {"1": "cpu", "2": "wall"}
    per_thread = {n: {(r["case"], r["impl"]) for r in results["rows"] if r["threads"] == n} for n in (1, 2)}
    assert per_thread[1] == per_thread[2] and per_thread[1]


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import danlu

    if torch.cuda.is_available() and danlu.cuda_available():
        pytest.skip("a GPU is present")
    result = run_harness("--device", "cuda", "--smoke", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "cuda" in result.stderr.lower() and "Traceback" not in result.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("args, message", [(("--only", "optimz"), "known: optim"),
                                           (("--threads", "0"), "thread counts"),
                                           (("--threads", "two"), "thread counts")])
def test_bad_arguments(tmp_path, args, message):
    result = run_harness(*args, "--out", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------- the timing engine, on made-up times

def timed(rounds, calls=None):
    names = {n for r in rounds for n in r}
    return harness._Timed(group_rounds=[rounds], calls=calls or dict.fromkeys(names, 1))


def toy_case(impls=("danlu", "torch-a", "torch-b"), bytes_moved=4_000_000, footprint=10**9):
    return harness.Case("optim", "toy", torch.float32, numel=10**6, n_tensors=1, bytes_moved=bytes_moved,
                        footprint_bytes=footprint, impls=[harness.Impl(n, lambda: (lambda: None)) for n in impls])


def test_ratios_are_per_round_against_the_fastest_peer():
    # torch-b is the fastest peer by median; in round 3 the machine slowed everything down 10x
    rounds = [{"danlu": 1.0, "torch-a": 3.0, "torch-b": 2.0},
              {"danlu": 1.0, "torch-a": 3.0, "torch-b": 2.2},
              {"danlu": 10.0, "torch-a": 30.0, "torch-b": 20.0},
              {"danlu": 1.1, "torch-a": 3.3, "torch-b": 2.2}]
    rows = {r.impl: r for r in harness._rows(toy_case(), timed(rounds), 1.0, SMOKE, CPU, 1, 0, paired=False)}
    assert {r.best_peer for r in rows.values()} == {"torch-b"}
    assert rows["danlu"].speedup == pytest.approx(2.0)  # the slow round changes no ratio
    assert rows["danlu"].ms == pytest.approx(1.05e3) and rows["torch-a"].speedup == pytest.approx(2 / 3)
    assert rows["torch-b"].speedup == 1.0 and rows["torch-b"].spread == 0
    assert not rows["danlu"].unstable and rows["danlu"].rounds == 4


def test_flags():
    noisy = [{"danlu": 1.0, "torch-a": 1.0}, {"danlu": 1.0, "torch-a": 2.0}, {"danlu": 1.0, "torch-a": 1.0},
             {"danlu": 1.0, "torch-a": 2.0}]
    rows = harness._rows(toy_case(("danlu", "torch-a")), timed(noisy), 1e9, SMOKE, CPU, 1, 0, paired=False)
    assert rows[0].flags == ["noisy"] and rows[0].unstable
    # 4 MB in 1 ms is 4 GB/s: 4x a 1 GB/s copy, above the CPU's ceiling of 2x
    fast = [{"danlu": 1e-3, "torch-a": 1e-3}] * 4
    big = harness._rows(toy_case(("danlu", "torch-a")), timed(fast), 1.0, SMOKE, CPU, 1, 10**6, paired=False)
    assert big[0].flags == ["above-limit"] and big[0].unstable and big[0].fraction == pytest.approx(4.0)
    small = harness._rows(toy_case(("danlu", "torch-a"), footprint=10**5), timed(fast), 1.0, SMOKE, CPU, 1,
                          10**6, paired=False)
    assert small[0].flags == ["in-cache"] and not small[0].unstable


def test_multi_thread_rows_slower_than_one_thread_are_stalled():
    def row(threads, ms):
        return harness.Row("bn", "toy", "danlu", threads, "float32", 1, 1, ms, ms, ms, None, None, None, None, None,
                           None, None, None, 3, 1, 1, [], False, None)

    rows = [row(1, 1.0), row(2, 1.4), row(4, 8.0)]
    harness.flag_stalls(rows)
    assert [(r.flags, r.unstable) for r in rows] == [([], False), ([], False), (["stalled"], True)]


def test_paired_ratios_go_through_danlu():
    groups = [[{"danlu": 1.0, "torch-a": 2.0}] * 3, [{"danlu": 2.0, "torch-b": 8.0}] * 3]  # a 2x slower machine
    t = harness._Timed(group_rounds=groups, calls={"danlu": 1, "torch-a": 1, "torch-b": 1})
    rows = {r.impl: r for r in harness._rows(toy_case(), t, 1.0, SMOKE, CPU, 1, 0, paired=True)}
    assert rows["danlu"].best_peer == "torch-a" and rows["danlu"].speedup == pytest.approx(2.0)
    assert rows["torch-b"].speedup == pytest.approx(0.5) and rows["danlu"].rounds == 6
    assert all("paired" in r.flags for r in rows.values())


def test_cases_that_do_not_fit_are_timed_in_pairs_with_danlu(monkeypatch):
    case = toy_case(footprint=1 << 30)
    monkeypatch.setattr(harness, "available_memory", lambda device: 64 << 30)
    assert harness.groups_that_fit(case, CPU) == [case.impls]
    monkeypatch.setattr(harness, "available_memory", lambda device: 4 << 30)
    assert [[i.name for i in g] for g in harness.groups_that_fit(case, CPU)] == [["danlu", "torch-a"],
                                                                                ["danlu", "torch-b"]]


def test_rounds_rotate_the_order_and_prune_the_slowest():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("danlu", "torch-a", "torch-b")}
    rounds, failed = harness.time_rounds(fns, dict.fromkeys(fns, 1), 4, 4, 0.0, harness.stopwatch(CPU),
                                         {"torch-a", "torch-b"}, prune_after=10)
    assert not failed and len(rounds) == 4
    assert calls[:6] == ["danlu", "torch-a", "torch-b", "torch-a", "torch-b", "danlu"]
    median = {"danlu": 1.0, "torch-a": 2.0, "torch-b": 9.0, "torch-c": 50.0}
    rounds = [median] * 3
    assert harness._keep_after_pruning(list(median), rounds, {"torch-a", "torch-b", "torch-c"}) == ["danlu", "torch-a"]
    # danlu and the fastest peer always stay
    slow_danlu = {"danlu": 9.0, "torch-a": 1.0}
    assert harness._keep_after_pruning(list(slow_danlu), [slow_danlu], {"torch-a"}) == ["danlu", "torch-a"]


def test_a_failing_implementation_is_reported_and_the_others_still_run():
    def broken():
        raise RuntimeError("boom")

    def fails_later():
        state = {"calls": 0}

        def call():
            state["calls"] += 1
            if state["calls"] > 3:
                raise MemoryError("later")
        return call

    works = harness.Impl("torch-forloop", lambda: torch.zeros(4).abs_)
    case = harness.Case("optim", "toy", torch.float32, numel=4, n_tensors=1, bytes_moved=32, footprint_bytes=32,
                        impls=[harness.Impl("danlu", broken), works, harness.Impl("torch-foreach", fails_later)])
    rows, skipped = harness.run_case(case, CPU, SMOKE, copy_gbps=1.0)
    assert [r.impl for r in rows] == ["torch-forloop"] and rows[0].speedup == 1.0
    assert {(s.impl, s.failed) for s in skipped} == {("danlu", True), ("torch-foreach", True)}
    assert any("boom" in s.reason for s in skipped) and any("later" in s.reason for s in skipped)


def test_unstable_cases_are_timed_again_and_the_steadiest_attempt_kept(monkeypatch):
    attempts = iter([[{"danlu": 1.0, "torch-a": 1.0}, {"danlu": 1.0, "torch-a": 3.0}] * 2,  # noisy
                     [{"danlu": 1.0, "torch-a": 2.0}] * 4,                                 # steady
                     [{"danlu": 1.0, "torch-a": 1.0}, {"danlu": 1.0, "torch-a": 5.0}] * 2])
    monkeypatch.setattr(harness, "time_rounds", lambda fns, *args, **kwargs: (next(attempts), {}))
    monkeypatch.setattr(harness, "calls_per_block", lambda *args: 1)
    mode = harness.Mode("test", block_s=0, min_rounds=4, max_rounds=4, case_s=0, reruns=2)
    rows, _ = harness.run_cases([toy_case(("danlu", "torch-a"), bytes_moved=None)], CPU, mode, 1.0)
    danlu_row = next(r for r in rows if r.impl == "danlu")
    assert danlu_row.attempts == 2 and danlu_row.speedup == 2.0 and not danlu_row.unstable
    assert danlu_row.extra["attempt_speedups"] == [pytest.approx(2.0), 2.0]


def test_the_budget_shrinks_cases_to_their_floor():
    mode = harness.Mode("test", block_s=0.01, min_rounds=5, max_rounds=9, case_s=2.0, budget_s=10.0, floor_rounds=3)
    budget = harness.Budget(mode, n_cases=4)
    assert budget.plan() == (5, pytest.approx(2.0, abs=0.01))
    budget.start -= 9.9  # nearly all of it spent
    assert budget.plan() == (3, 0.0) and not budget.can_rerun(1.0)
    assert harness.Budget(harness.MODES["full"], 4).plan() == (10, 4.0)


def test_bytes_model_and_model_shapes():
    streams = {o.label: optim.streams_per_element(o) for o in optim.OPTIMIZERS}
    assert streams == {"Adam": 7, "AdamW": 7, "SGD-nesterov": 5, "RMSprop": 5, "Adagrad": 5}
    assert {o.label: optim.tensors_per_element(o) for o in optim.OPTIMIZERS} == {
        "Adam": 4, "AdamW": 4, "SGD-nesterov": 3, "RMSprop": 3, "Adagrad": 3}
    assert optim.streams_per_element(optim.Optimizer("Adam", "Adam", {"amsgrad": True})) == 9
    assert optim.streams_per_element(optim.Optimizer("SGD", "SGD", {"lr": 0.1})) == 3
    assert (len(shapes.resnet50()), shapes.numel(shapes.resnet50())) == (161, 25_557_032)
    assert (len(shapes.gpt2_small()), shapes.numel(shapes.gpt2_small())) == (148, 124_439_808)


def test_quick_optim_grid():
    names = {case.name: [i.name for i in case.impls] for case in optim.cases(CPU, harness.MODES["quick"])}
    assert set(names) == {"Adam/3-tensors-16M/fp32", "Adam/800-small/fp32", "SGD-nesterov/3-tensors-16M/fp32",
                          "SGD-nesterov/800-small/fp32", "RMSprop/3-tensors-16M/fp32", "Adam/3-tensors-16M/bf16",
                          "Adam/800-small/bf16"}
    assert names["Adam/800-small/fp32"] == ["danlu", "torch-fused", "deepspeed"]
    assert names["Adam/3-tensors-16M/fp32"] == ["danlu", "torch-forloop", "torch-foreach", "torch-fused", "deepspeed"]
