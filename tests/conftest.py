"""Fixtures for every test module, the hypothesis profiles and DANLU_REQUIRE_CUDA. The helpers the test
modules share live in the package tests/helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from danlu import _C
from helpers.devices import CUDA_OK

# CI runs the "ci" profile: derandomised (the same examples on every run) and without an example database, so
# an example found once cannot fail every later run. Local runs ("dev") draw fresh examples and keep the
# database, so they go on exploring.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("DANLU_HYPOTHESIS_PROFILE", "dev"))

# On a GPU machine DANLU_REQUIRE_CUDA=1 makes a missing CUDA an error instead of a skip of every CUDA case.
REQUIRE_CUDA = os.environ.get("DANLU_REQUIRE_CUDA") == "1"


def pytest_sessionstart(session):
    if REQUIRE_CUDA and not CUDA_OK:
        raise pytest.UsageError(
            "DANLU_REQUIRE_CUDA=1, but CUDA cannot run here: "
            f"danlu built with CUDA: {bool(_C.built_with_cuda)}, torch.cuda.is_available(): "
            f"{torch.cuda.is_available()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With DANLU_REQUIRE_CUDA=1 a test that skips for lack of CUDA fails instead."""
    outcome = yield
    report = outcome.get_result()
    # A skip's longrepr is (path, line, reason): the reason alone, since a path may contain "cuda" too.
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if REQUIRE_CUDA and report.skipped and "cuda" in reason.lower():
        report.outcome = "failed"
        report.longrepr = f"skipped although DANLU_REQUIRE_CUDA=1: {report.longrepr}"


@pytest.fixture(autouse=True)
def torch_on_one_thread():
    original = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(original)


@pytest.fixture
def restore_cpu_isa():
    original = _C.cpu_isa()
    yield original
    _C.set_cpu_isa(original)


@pytest.fixture
def restore_num_threads():
    original = torch.get_num_threads()
    yield original
    torch.set_num_threads(original)


@pytest.fixture
def poisoned_empty_like(monkeypatch):
    """torch.empty_like returns NaN-filled (or max-valued) tensors, so a read of memory nobody wrote shows."""
    real = torch.empty_like

    def empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        out.fill_(float("nan") if (out.is_floating_point() or out.is_complex()) else 127)
        return out

    monkeypatch.setattr(torch, "empty_like", empty_like)
