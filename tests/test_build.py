"""The build and the tools around it: what _C says it is, the one version, AUTO's choice of CUDA architectures,
the kernel resource check, the CUDA case selection and kernel driver of scripts/gpu_check.sh (on the CPU)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import danlu
from danlu import _C

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import check_kernel_resources  # noqa: E402
import cuda_kernel_driver  # noqa: E402


def pyproject_version():
    return re.search(r'^version = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_build_info_describes_this_build():
    info = _C.build_info()
    assert info["cpu_isas"] == ["generic", "avx2", "avx512"]
    assert _C.cpu_isa() in info["cpu_isas"]
    assert info["cuda"] is bool(_C.built_with_cuda)
    assert bool(info["cuda_archs"]) is info["cuda"]
    assert (info["cuda_version"] is not None) is info["cuda"]
    assert all(re.fullmatch(r"\d+a?-(real|virtual)|\d+a?", arch) for arch in info["cuda_archs"])
    assert info["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["commit"])
    assert set(info) >= {"version", "commit", "build_type", "compiler", "cpu_isas", "cuda", "cuda_version",
                         "cuda_archs", "sanitize"}


def test_the_version_is_written_once():
    """pyproject.toml holds it; the build passes it to _C; the package and its metadata say the same."""
    version = pyproject_version()
    assert _C.build_info()["version"] == version
    assert danlu.__version__ == version
    assert importlib.metadata.version("danlu") == version


def cmake_configure(tmp_path, env):
    pybind11 = pytest.importorskip("pybind11")
    if not (shutil.which("cmake") and shutil.which("ninja")):
        pytest.skip("cmake and ninja are needed to configure the project")
    result = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.removeprefix("-- ") for line in result.stdout.splitlines() if line.startswith("-- danlu")]


def test_auto_builds_cuda_for_the_visible_gpus_only(tmp_path):
    """With DANLU_CUDA unset (AUTO), the architectures are those of the GPUs nvidia-smi lists, each once, less
    those nvcc cannot compile for (sm_61: CUDA 13 dropped Pascal)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=compute_cap" ] && printf "9.0\\n6.1\\n8.0\\n9.0\\n" && exit 0\n'
                   "exit 9\n")
    smi.chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "DANLU_CUDA": "", "DANLU_CUDA_ARCHS": ""}
    messages = cmake_configure(tmp_path, env)
    cuda = next(m for m in messages if m.startswith("danlu: CUDA kernels"))
    if shutil.which("nvcc") or os.environ.get("CUDACXX"):
        assert re.fullmatch(r"danlu: CUDA kernels ON \(nvcc [\d.]+\) for 90-real 80-real", cuda), cuda
    else:
        assert cuda.endswith("no CUDA compiler (nvcc) found to build for 90-real 61-real 80-real"), cuda
    assert any(m.startswith("danlu: CPU kernels for generic avx2 avx512") for m in messages)


def test_an_explicit_choice_wins_over_detection(tmp_path):
    messages = cmake_configure(tmp_path, {"DANLU_CUDA": "OFF"})
    assert "danlu: CUDA kernels OFF: DANLU_CUDA=OFF" in messages


# ---------------------------------------------------------------------------------------------
# scripts/check_kernel_resources.py

DUMP = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN5danlu3fooEv:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN5danlu3barEv:
  REG:48 STACK:32 SHARED:0 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_100
 Function _ZN5danlu3bazEv:
  REG:255 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_check_flags_stack_frames_and_local_memory():
    usages = check_kernel_resources.parse(DUMP)
    assert [(u.arch, u.name, u.resources["REG"]) for u in usages] == [
        ("sm_90", "_ZN5danlu3fooEv", 40), ("sm_90", "_ZN5danlu3barEv", 48), ("sm_100", "_ZN5danlu3bazEv", 255)]
    assert [u.problems() for u in usages] == [[], ["STACK 32 bytes"], ["LOCAL 8 bytes"]]


@pytest.mark.skipif(not _C.built_with_cuda, reason="danlu was built without its GPU kernels")
def test_resource_check_reads_the_built_module():
    """CI runs the check itself (.ci/run); here: it finds CUDA functions in the module at all."""
    cuobjdump = check_kernel_resources.find_cuobjdump(None)
    if cuobjdump is None:
        pytest.skip("no cuobjdump (pip install nvidia-cuda-cuobjdump)")
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", _C.__file__], capture_output=True, text=True).stdout
    usages = check_kernel_resources.parse(dump)
    assert usages and all("REG" in u.resources for u in usages)


# ---------------------------------------------------------------------------------------------
# scripts/pytest_cuda_cases.py: the tests stage of gpu_check.sh


def collect(*args):
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(SCRIPTS)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_cuda_selection_is_every_cuda_case_and_nothing_else():
    files = ["tests/test_optim.py", "tests/test_batch_norm.py", "tests/test_dropout.py"]
    everything = collect(*files)
    selected = collect(*files, "-p", "pytest_cuda_cases")
    cuda_params = {t for t in everything if re.search(r"[\[-]cuda[\]-]", t)}
    assert cuda_params and cuda_params <= selected
    # The rest are CUDA-only tests (helpers.devices.requires_cuda), which compare the CPU with the GPU.
    assert all("cuda" in t.lower() for t in selected - cuda_params), selected - cuda_params
    assert not {t for t in selected if re.search(r"[\[-]cpu[\]-]", t) and t not in cuda_params}


# ---------------------------------------------------------------------------------------------
# scripts/cuda_kernel_driver.py on the CPU kernels


def test_kernel_driver_runs_on_the_cpu(capsys):
    assert cuda_kernel_driver.main(["--device", "cpu", "--dtypes", "float16"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and re.search(r"on cpu: (\d+) of \1 cases ok, 0 failed", out)


def test_kernel_driver_lists_every_kernel_family():
    cases = [name for family in cuda_kernel_driver.FAMILIES.values()
             for name, _ in family(torch.device("cpu"), True, list(cuda_kernel_driver.DTYPES.values()))]
    for needle in ("optim Adam(", "optim AdamW(amsgrad=True)", "optim SGD(momentum=0.9,nesterov=True", "centered=True",
                   "optim Adagrad(", "grad-scaler", "tensor-lr", "batch_norm NHWC", "batch_norm NCHW",
                   "+residual eval", "dropout_add 33x129 +bias", "dropout non-dense", "dropout no-grad"):
        assert any(needle in name for name in cases), needle
    for activation in ("identity", "relu", "leaky_relu", "elu", "silu", "sigmoid", "tanh"):
        assert sum(f" {activation}" in name and "NHWC" in name for name in cases) == 4 * 2 * 2


def test_kernel_driver_reports_a_wrong_element():
    ref = torch.randn(1000)
    ours = ref.clone()
    cuda_kernel_driver.check_close("y", ours, ref, torch.float32)
    ours[517] += 0.5
    with pytest.raises(cuda_kernel_driver.Mismatch, match="element 517 of 1000"):
        cuda_kernel_driver.check_close("y", ours, ref, torch.float32)
    ours[517] = float("nan")
    with pytest.raises(cuda_kernel_driver.Mismatch, match="non-finite"):
        cuda_kernel_driver.check_close("y", ours, ref, torch.float32)


def test_misaligned_copies_values_and_layout_one_element_late():
    t = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    m = cuda_kernel_driver.misaligned(t)
    assert torch.equal(m, t) and m.stride() == t.stride() and m.storage_offset() == 1


# ---------------------------------------------------------------------------------------------
# scripts/gpu_check.sh, dry run without a GPU


def test_gpu_check_dry_run_writes_its_summary_in_outdir_only(tmp_path):
    out = tmp_path / "out"
    before = set(subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                                text=True).stdout.splitlines())
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--cpu", str(out), "tests"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run_cpu"] and summary["passed"]
    assert {name: s["status"] for name, s in summary["stages"].items()} == {"check": "pass", "tests": "pass"}
    assert "tests collected" in summary["stages"]["tests"]["detail"]
    assert summary["torch"] == torch.__version__ and summary["danlu"]["version"] == danlu.__version__
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "summary.json", "tests.log"]
    after = set(subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                               text=True).stdout.splitlines())
    assert after == before


def test_gpu_check_without_cuda_stops_with_a_clear_message(tmp_path):
    if torch.cuda.is_available() and danlu.cuda_available():
        pytest.skip("CUDA runs here")
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path), "sanitizer"],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "CUDA cannot run here" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["check"]["status"] == "fail"
    assert summary["stages"]["sanitizer"]["status"] == "skipped" and not summary["passed"]


def test_require_cuda_without_cuda_is_an_error_not_a_skip():
    """DANLU_REQUIRE_CUDA=1 (gpu_check.sh's tests stage) on a machine where CUDA cannot run stops pytest at once."""
    if torch.cuda.is_available() and danlu.cuda_available():
        pytest.skip("CUDA runs here")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dropout.py"],
                            cwd=REPO, env={**os.environ, "DANLU_REQUIRE_CUDA": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "DANLU_REQUIRE_CUDA=1, but CUDA cannot run here" in result.stderr
