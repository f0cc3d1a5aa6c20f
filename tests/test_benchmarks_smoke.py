"""The benchmark harness runs end to end on the CPU in its smallest mode (``--smoke``) and writes a row
per implementation. Timings are never asserted: a benchmark is not a test (DESIGN.md)."""

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

from benchmarks import batchnorm, dropout, harness, optim, shapes  # noqa: E402

IMPLS = {"danlu", "torch-forloop", "torch-foreach", "torch-fused"}


def run_harness(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    result = run_harness("--device", "cpu", "--smoke", "--only", "optim,batchnorm,dropout", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout, json.loads((out / "results.json").read_text())


def test_json_has_metadata(smoke):
    _, _, results = smoke
    meta = results["metadata"]
    assert meta["device"] == "cpu" and meta["device_name"]
    assert meta["torch"] == torch.__version__
    assert meta["copy_gbps"] > 0 and meta["threads"] >= 1
    assert meta["mode"] == "smoke" and meta["quick"] is False
    assert {"danlu", "commit", "date"} <= meta.keys()


def test_json_has_a_row_per_implementation(smoke):
    _, _, results = smoke
    rows, skipped = [r for r in results["rows"] if r["family"] == "optim"], results["skipped"]
    assert not [s for s in skipped if s["failed"]]
    cases = {row["case"] for row in rows}
    assert {case.split("/")[0] for case in cases} == {o.label for o in optim.OPTIMIZERS}
    assert len(cases) == len(optim.OPTIMIZERS)
    for case in cases:
        ran = {row["impl"] for row in rows if row["case"] == case}
        not_run = {s["impl"] for s in skipped if s["case"] == case}
        assert ran | not_run == IMPLS and not ran & not_run, case
        assert {"danlu", "torch-forloop", "torch-foreach"} <= ran, case
    for row in rows:
        assert row["ms"] > 0 and row["gbps"] > 0 and row["fraction"] > 0
        assert row["speedup"] > 0 and row["peak_mem_mib"] is None  # peak memory is CUDA only
        assert row["dtype"] == "float32" and row["n_tensors"] > 0


def test_torch_fused_exactly_where_torch_has_it(smoke):
    _, _, results = smoke
    ran = {(row["case"].split("/")[0], row["impl"]) for row in results["rows"] if row["family"] == "optim"}
    for o in optim.OPTIMIZERS:
        has_fused = "fused" in inspect.signature(getattr(torch.optim, o.cls)).parameters
        assert ((o.label, "torch-fused") in ran) == has_fused, o.label


def test_markdown_and_terminal_tables(smoke):
    out, stdout, results = smoke
    markdown = (out / "results.md").read_text()
    assert results["metadata"]["device_name"] in markdown
    for row in results["rows"]:
        assert f"| {row['case']} | {row['impl']} |" in markdown
        assert row["impl"] in stdout
    assert "copy bandwidth" in stdout


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import danlu

    if torch.cuda.is_available() and danlu.cuda_available():
        pytest.skip("a GPU is present")
    result = run_harness("--device", "cuda", "--smoke", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "cuda" in result.stderr.lower() and "Traceback" not in result.stderr
    assert not (tmp_path / "results.json").exists()


def test_batchnorm_rows(smoke):
    _, _, results = smoke
    rows = [r for r in results["rows"] if r["family"] == "batchnorm"]
    grid = batchnorm.case_grid(harness.MODES["smoke"])
    assert {(v.label, p, d, layout) for v, p, d, _, layout in grid} == {
        (v.label, p, d, layout) for v in batchnorm.VARIANTS for p in batchnorm.PASSES
        for d in batchnorm.DTYPES for layout in batchnorm.LAYOUTS}
    assert not [s for s in results["skipped"] if s["case"].startswith("BN")]
    assert sorted((r["case"], r["impl"]) for r in rows) == sorted(
        (case.name, impl) for case in batchnorm.cases(torch.device("cpu"), harness.MODES["smoke"])
        for impl in batchnorm.IMPLS)
    for row in rows:
        variant, pass_ = row["case"].split("/")[0].rsplit("-", 1)
        residual = variant == "BN+add+ReLU"
        itemsize = {"float32": 4, "bfloat16": 2}[row["dtype"]]
        assert row["case"].endswith({"float32": "/fp32", "bfloat16": "/bf16"}[row["dtype"]])
        assert row["bytes_moved"] == ((8 if pass_ == "train" else 2) + residual * (2 if pass_ == "train" else 1)) \
            * row["numel"] * itemsize
        assert row["n_tensors"] == 1 + residual
        assert row["ms"] > 0 and row["gbps"] > 0 and row["speedup"] > 0 and row["peak_mem_mib"] is None


def test_batchnorm_grids():
    cpu = torch.device("cpu")
    full = batchnorm.cases(cpu, harness.MODES["full"])
    quick = batchnorm.cases(cpu, harness.MODES["quick"])
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
    rows = [r for r in results["rows"] if r["family"] == "dropout"]
    assert not [s for s in results["skipped"] if s["case"].startswith(("Dropout", "dropout_add"))]
    assert sorted((r["case"], r["impl"]) for r in rows) == sorted(
        (case.name, impl.name) for case in dropout.cases(torch.device("cpu"), harness.MODES["smoke"])
        for impl in case.impls)
    assert {r["impl"] for r in rows if r["case"].startswith("Dropout-")} == {"danlu", "danlu-regenerate", "torch"}
    for row in rows:
        variant, pass_ = row["case"].split("/")[0].rsplit("-", 1)
        itemsize = {"float32": 4, "bfloat16": 2}[row["dtype"]]
        streams = 2 + (variant == "dropout_add") + 2 * (pass_ == "train")
        mask_bytes = row["numel"] // 8 * (2 if pass_ == "train" else 1)
        assert row["bytes_moved"] == streams * row["numel"] * itemsize + mask_bytes
        assert row["ms"] > 0 and row["gbps"] > 0 and row["speedup"] > 0


def test_unknown_families(tmp_path):
    result = run_harness("--only", "optimz", "--out", str(tmp_path))
    assert result.returncode == 2 and "known: optim" in result.stderr and "Traceback" not in result.stderr


def test_a_failing_implementation_is_reported_and_the_others_still_run():
    def broken():
        raise RuntimeError("boom")

    works = harness.Impl("torch-forloop", lambda: torch.zeros(4).abs_)
    case = harness.Case("optim", "toy", torch.float32, numel=4, n_tensors=1, bytes_moved=32,
                        impls=[harness.Impl("danlu", broken), works])
    rows, skipped = harness.run_case(case, torch.device("cpu"), harness.MODES["smoke"], copy_gbps=1.0)
    assert [r.impl for r in rows] == ["torch-forloop"] and rows[0].speedup == 1.0
    assert len(skipped) == 1 and skipped[0].failed and "boom" in skipped[0].reason


def test_bytes_model_and_model_shapes():
    streams = {o.label: optim.streams_per_element(o) for o in optim.OPTIMIZERS}
    assert streams == {"Adam": 7, "AdamW": 7, "SGD-nesterov": 5, "RMSprop": 5, "Adagrad": 5}
    assert optim.streams_per_element(optim.Optimizer("Adam", "Adam", {"amsgrad": True})) == 9
    assert optim.streams_per_element(optim.Optimizer("SGD", "SGD", {"lr": 0.1})) == 3
    assert (len(shapes.resnet50()), shapes.numel(shapes.resnet50())) == (161, 25_557_032)
    assert (len(shapes.gpt2_small()), shapes.numel(shapes.gpt2_small())) == (148, 124_439_808)
