"""pytest plugin (`-p pytest_cuda_cases`, with scripts/ on PYTHONPATH): keeps only the suite's CUDA cases.

A CUDA case is a test parametrised with a CUDA device (tests/helpers/devices.py DEVICES: the "cuda" param), or
one that is skipped without CUDA (helpers.devices.requires_cuda, whose reason names CUDA): the CPU twins of
parametrised tests are left out, since CI runs them. scripts/gpu_check.sh runs the selection on the GPU machine
with DANLU_REQUIRE_CUDA=1, where tests/conftest.py turns a CUDA case that skips into a failure.
"""

from __future__ import annotations


def _names_cuda(value) -> bool:
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return getattr(value, "type", None) == "cuda"  # a torch.device


def is_cuda_case(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_names_cuda(v) for v in callspec.params.values()):
        return True
    return any(mark.name == "skipif" and "cuda" in str(mark.kwargs.get("reason", "")).lower()
               for mark in item.iter_markers())


def pytest_collection_modifyitems(config, items):
    selected = [item for item in items if is_cuda_case(item)]
    deselected = [item for item in items if not is_cuda_case(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
