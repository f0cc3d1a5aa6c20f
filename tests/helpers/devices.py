"""Where the tests run: devices, CPU ISA variants and thread counts."""

from __future__ import annotations

import contextlib

import pytest
import torch

import danlu
from danlu import _C

# danlu's steps run with the thread count torch starts with (big tensors are split between threads);
# torch's own ops run on one thread: their results do not depend on it, and on a busy 2-core machine
# the parallel regions of many small ops mostly wait for each other.
DANLU_THREADS = torch.get_num_threads()

CUDA_OK = danlu.cuda_available() and torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs danlu built with CUDA and a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def supported_isas():
    """The CPU kernel variants this processor runs (set_cpu_isa accepts them). Leaves the best one selected,
    which is the default."""
    names = []
    for isa in ("generic", "avx2", "avx512"):
        try:
            _C.set_cpu_isa(isa)
        except ValueError:
            continue
        assert _C.cpu_isa() == isa
        names.append(isa)
    return names


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
