"""What every benchmark family shares: run modes, cases, the registry of families, and one function
that times any implementation.

A family is a module with ``cases(device, mode) -> list[Case]``. Each case is one piece of work (an
optimizer step over a parameter list, a BatchNorm forward, ...) with a bytes-moved model and the
implementations that do it: danlu's and every PyTorch one. All implementations of a case are held to
the same model, because the model counts the work, not what an implementation happens to do.
"""

from __future__ import annotations

import gc
import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.benchmark import Measurement, Timer

# Family name -> module that defines ``cases(device, mode)``.
FAMILIES: dict[str, str] = {
    "optim": "benchmarks.optim",
    "batchnorm": "benchmarks.batchnorm",
    "dropout": "benchmarks.dropout",
}


def family_cases(family: str, device: torch.device, mode: Mode) -> list[Case]:
    return importlib.import_module(FAMILIES[family]).cases(device, mode)


@dataclass(frozen=True)
class Mode:
    """How big the cases are and how long each implementation is timed.

    Timing uses ``Timer.adaptive_autorange``: blocks of runs until at least 4 blocks and
    ``min_run_time`` have passed and the IQR is under ``threshold`` of the median, or until
    ``max_run_time``."""

    name: str  # "full", "quick" or "smoke" (tiny, for the test suite: the numbers mean nothing)
    min_run_time: float
    max_run_time: float
    threshold: float = 0.1


MODES = {
    "full": Mode("full", min_run_time=1.0, max_run_time=10.0),
    "quick": Mode("quick", min_run_time=0.2, max_run_time=1.5),
    "smoke": Mode("smoke", min_run_time=0.001, max_run_time=0.02),
}


class Unavailable(Exception):
    """This implementation does not exist for this case on this device (e.g. torch has no fused RMSprop)."""


@dataclass
class Impl:
    """One implementation of a case. ``build`` allocates its inputs, runs it once (so lazy state and
    caches are made outside the timing) and returns the statement to time; dropping that statement
    frees everything, so only one implementation's tensors are alive at a time."""

    name: str  # "danlu", "torch-forloop", "torch-foreach", "torch-fused", ...
    build: Callable[[], Callable[[], object]]


@dataclass
class Case:
    family: str
    name: str
    dtype: torch.dtype
    numel: int
    n_tensors: int
    bytes_moved: int  # bytes read + written by the minimal fused implementation, per call
    impls: list[Impl] = field(default_factory=list)


@dataclass
class Row:
    family: str
    case: str
    impl: str
    dtype: str
    numel: int
    n_tensors: int
    ms: float  # median per call
    iqr_ms: float  # spread of the timed blocks: large on a busy machine
    bytes_moved: int
    gbps: float  # model bytes / median time
    fraction: float  # gbps / copy bandwidth
    speedup: Optional[float]  # fastest torch ms / this ms: on danlu's row, danlu's speedup over torch's best
    peak_mem_mib: Optional[float]  # CUDA: memory allocated during one call beyond what was live before


@dataclass
class Skipped:
    case: str
    impl: str
    reason: str
    failed: bool = False  # it raised (a bug, out of memory), rather than not existing here


def time_call(fn: Callable[[], object], mode: Mode) -> Measurement:
    """Times calls of ``fn`` (``.median``, ``.iqr`` in seconds per call). The Timer synchronises CUDA;
    it runs with torch's current thread count (its own default would be 1 thread)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.adaptive_autorange(threshold=mode.threshold, min_run_time=mode.min_run_time,
                                    max_run_time=mode.max_run_time)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory one call allocates beyond what is already live (its temporaries), CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def release_memory(device: torch.device) -> None:
    gc.collect()  # optimizers hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


class NoProgress:
    def start(self, label: str) -> None:
        pass

    def advance(self) -> None:
        pass


SILENT = NoProgress()


def run_case(case: Case, device: torch.device, mode: Mode, copy_gbps: float,
             progress=SILENT) -> tuple[list[Row], list[Skipped]]:
    """Times every implementation of ``case``, one at a time, and turns the times into rows."""
    times: dict[str, tuple[Measurement, Optional[float]]] = {}
    skipped = []
    for impl in case.impls:
        progress.start(f"{case.name} {impl.name}")
        fn = None
        try:
            fn = impl.build()
            times[impl.name] = (time_call(fn, mode), peak_memory_mib(fn, device))
        except Unavailable as why:
            skipped.append(Skipped(case.name, impl.name, str(why)))
        except Exception as why:  # one broken implementation must not cost a long run its other results
            skipped.append(Skipped(case.name, impl.name, f"{type(why).__name__}: {why}", failed=True))
        fn = None
        release_memory(device)
        progress.advance()
    torch_times = [m.median for name, (m, _) in times.items() if name.startswith("torch")]
    best_torch = min(torch_times) if torch_times else None
    rows = []
    for name, (m, peak) in times.items():
        gbps = case.bytes_moved / m.median / 1e9
        rows.append(Row(case.family, case.name, name, str(case.dtype).removeprefix("torch."), case.numel,
                        case.n_tensors, m.median * 1e3, m.iqr * 1e3, case.bytes_moved, gbps, gbps / copy_gbps,
                        best_torch / m.median if best_torch else None, peak))
    return rows, skipped
