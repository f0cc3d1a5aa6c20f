"""What every benchmark family shares: run modes, cases, the registry of families, and the timing engine.

A family is a module with ``cases(device, mode) -> list[Case]``. Each case is one piece of work (an
optimizer step over a parameter list, a BatchNorm forward, a training step of a model, ...) with a
bytes-moved model and the implementations that do it: danlu's and its peers (every PyTorch one, and
DeepSpeed's or timm's where installed).

Timing is built to be honest on a shared machine (see benchmarks/README.md, "How a case is timed"):

- every implementation of a case is built first and stays alive, then they are timed in rounds, one
  block of calls each, A B C A B C ..., the order rotated every round, so that a slow spell of the
  machine hits every implementation of the case alike;
- the calls per block are calibrated first so that a block lasts about ``Mode.block_s``;
- a row reports the median time per call over the rounds and, against the fastest peer of the case,
  the median and quartiles of the per-round ratios (peer time / this time in the same round);
- a row is unstable when those ratios spread widely or when its fraction of the copy bandwidth is
  more than memory can deliver; unstable cases are timed again, a bounded number of times, and the
  attempt with the narrowest spread is kept.
"""

from __future__ import annotations

import gc
import importlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

# Family name -> module that defines ``cases(device, mode)``.
FAMILIES: dict[str, str] = {
    "optim": "benchmarks.optim",
    "batchnorm": "benchmarks.batchnorm",
    "dropout": "benchmarks.dropout",
    "e2e": "benchmarks.e2e",
}

REFERENCE = "danlu"
STALL_FACTOR = 1.5  # the implementation every peer is compared with; also the anchor of paired timing
# Fraction of the copy bandwidth above which a row is more than memory can deliver. On a CPU the copy
# pays a read-for-ownership of every destination line (3 transfers for the 2 it is credited with) that
# an in-place update does not, so in-place kernels legitimately reach 1.5-1.7x; 2x leaves room for the
# copy's own noise. On a GPU neither applies.
FRACTION_CEILING = {"cpu": 2.0, "cuda": 1.25}


def family_cases(family: str, device: torch.device, mode: Mode) -> list[Case]:
    return importlib.import_module(FAMILIES[family]).cases(device, mode)


@dataclass(frozen=True)
class Mode:
    """How big the cases are and how long they are timed.

    A case is timed in rounds of one block per implementation, each block about ``block_s`` long, until
    at least ``min_rounds`` rounds and ``case_s`` seconds have passed (at most ``max_rounds``). With a
    ``budget_s`` (seconds per thread count for the whole run), ``case_s`` shrinks to what the budget
    still allows, down to ``floor_rounds`` rounds once it is spent."""

    name: str  # "full", "quick" or "smoke" (tiny, for the test suite: the numbers mean nothing)
    block_s: float
    min_rounds: int
    max_rounds: int
    case_s: float
    budget_s: Optional[float] = None
    floor_rounds: int = 3
    spread_limit: float = 0.15  # interquartile range of the per-round ratios / their median
    reruns: int = 2


MODES = {
    "full": Mode("full", block_s=0.05, min_rounds=10, max_rounds=60, case_s=4.0),
    "quick": Mode("quick", block_s=0.02, min_rounds=5, max_rounds=30, case_s=1.5, budget_s=140.0),
    "smoke": Mode("smoke", block_s=0.0005, min_rounds=3, max_rounds=3, case_s=0.0, reruns=0),
}


class Unavailable(Exception):
    """This implementation does not exist for this case here (torch has no fused RMSprop, DeepSpeed is not
    installed, ...)."""


@dataclass
class Impl:
    """One implementation of a case. ``build`` allocates its inputs, runs it once (so lazy state and
    caches are made outside the timing) and returns the statement to time; dropping that statement frees
    everything. A statement with a ``profile()`` method is asked for it after the timing (its dict lands
    in the row's ``extra``)."""

    name: str  # "danlu", "torch-forloop", "torch-foreach", "torch-fused", "deepspeed", "timm", ...
    build: Callable[[], Callable[[], object]]

    @property
    def is_peer(self) -> bool:
        return not self.name.startswith(REFERENCE)


@dataclass
class Case:
    family: str
    name: str
    dtype: torch.dtype
    numel: int
    n_tensors: int
    bytes_moved: Optional[int]  # bytes read + written by the minimal fused implementation per call (None: no model)
    footprint_bytes: int  # memory one implementation holds (inputs, outputs, state): decides what fits together
    impls: list[Impl] = field(default_factory=list)


@dataclass
class Row:
    family: str
    case: str
    impl: str
    threads: int
    dtype: str
    numel: int
    n_tensors: int
    ms: float  # median time per call over the rounds
    ms_q25: float
    ms_q75: float
    bytes_moved: Optional[int]
    gbps: Optional[float]  # model bytes / median time
    fraction: Optional[float]  # gbps / copy bandwidth at this thread count
    best_peer: Optional[str]  # the peer with the lowest median time in the case
    speedup: Optional[float]  # median over rounds of best peer's time / this time, in the same round
    speedup_q25: Optional[float]
    speedup_q75: Optional[float]
    spread: Optional[float]  # (q75 - q25) / median of those ratios
    rounds: int
    calls_per_block: int
    attempts: int  # 1 + reruns of this case
    flags: list[str]  # noisy, above-limit, in-cache, paired (see FLAG_NOTES)
    unstable: bool
    peak_mem_mib: Optional[float]  # CUDA: memory allocated during one call beyond what was live before
    extra: dict = field(default_factory=dict)  # family-specific results (e2e: the profile)


FLAG_NOTES = {
    "noisy": "the per-round ratios spread more than the limit (interquartile range / median)",
    "above-limit": "faster than memory can deliver: the fraction of copy bandwidth is above the ceiling and the "
                   "case does not fit the last-level cache (a timing artefact)",
    "in-cache": "above the copy-bandwidth ceiling, but the case fits the last-level cache: cache speed, not a "
                "memory-bandwidth figure",
    "stalled": f"with more threads over {STALL_FACTOR}x the time of the same implementation at one thread: its time "
               "is mostly waiting (for a preempted thread at a barrier, or for a core), not work",
    "paired": "too large to keep every implementation alive at once: timed in pairs with danlu, ratios to "
              "the best peer go through danlu's times",
}


@dataclass
class Skipped:
    case: str
    impl: str
    reason: str
    failed: bool = False  # it raised (a bug, out of memory), rather than not existing here
    threads: int = 0


# ------------------------------------------------------------------------------------------------ timing

@dataclass(frozen=True)
class Stopwatch:
    """How a block is timed: ``sync`` waits for the device (CUDA) at both ends, ``clock`` reads the time.

    On the CPU at one thread the clock is the process's CPU time (``time.process_time``), which does not
    advance while another process holds the core: a single-threaded call's CPU time is its undisturbed wall
    time, memory stalls and page faults included. With more threads, or on CUDA, it is the wall clock: a
    parallel region's time includes the wait for its slowest thread, and that is part of its cost."""

    sync: Callable[[], None]
    clock: Callable[[], float]
    name: str  # "cpu" or "wall"


def stopwatch(device: torch.device) -> Stopwatch:
    if device.type == "cuda":
        return Stopwatch(lambda: torch.cuda.synchronize(device), time.perf_counter, "wall")
    if torch.get_num_threads() == 1:
        return Stopwatch(lambda: None, time.process_time, "cpu")
    return Stopwatch(lambda: None, time.perf_counter, "wall")


def time_block(fn: Callable[[], object], calls: int, watch: Stopwatch) -> float:
    """Seconds per call of ``calls`` back-to-back calls (synchronised at both ends)."""
    watch.sync()
    start = watch.clock()
    for _ in range(calls):
        fn()
    watch.sync()
    return (watch.clock() - start) / calls


def calls_per_block(fn: Callable[[], object], block_s: float, watch: Stopwatch) -> int:
    once = time_block(fn, 1, watch)
    if once < block_s:  # cheap calls: the second timing is the steadier one
        once = min(once, time_block(fn, 1, watch))
    return max(1, min(100_000, round(block_s / max(once, 1e-9))))


def time_rounds(fns: dict[str, Callable[[], object]], calls: dict[str, int], min_rounds: int, max_rounds: int,
                seconds: float, watch: Stopwatch, peers: set[str] = frozenset(),
                prune_after: int = 3) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Rounds of one block per implementation, in an order rotated every round. Returns the seconds per call
    of each implementation in each round, and the implementations that raised (dropped from every round).

    After ``prune_after`` rounds, an implementation more than ``PRUNE_FACTOR`` times slower than the fastest
    one sits out the later rounds, unless it is danlu or the fastest peer: its ratio is far from any decision,
    and on a busy machine one call of it can take seconds."""
    names, failed = list(fns), {}
    rounds: list[dict[str, float]] = []
    start = time.perf_counter()
    while names and len(rounds) < max_rounds:
        turn = len(rounds) % len(names)
        times = {}
        for name in names[turn:] + names[:turn]:
            try:
                times[name] = time_block(fns[name], calls[name], watch)
            except Exception as why:  # one broken implementation must not cost the others their results
                failed[name] = f"{type(why).__name__}: {why}"
        if failed.keys() & set(names):
            names = [n for n in names if n not in failed]
            rounds = [{n: t for n, t in r.items() if n not in failed} for r in rounds]
            continue
        rounds.append(times)
        if len(rounds) == prune_after:
            names = _keep_after_pruning(names, rounds, peers)
        if len(rounds) >= min_rounds and time.perf_counter() - start >= seconds:
            break
    return rounds, failed


PRUNE_FACTOR = 4.0


def _keep_after_pruning(names: list[str], rounds: list[dict[str, float]], peers: set[str]) -> list[str]:
    median = {name: float(np.median([r[name] for r in rounds])) for name in names}
    fastest = min(median.values())
    fastest_peer = min((n for n in names if n in peers), key=median.get, default=None)
    return [n for n in names if n in (REFERENCE, fastest_peer) or median[n] <= PRUNE_FACTOR * fastest]


def quartiles(values) -> tuple[float, float, float]:
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q25), float(q50), float(q75)


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


def release_memory(device: torch.device, nbytes: int) -> None:
    """Frees what a case held before the next one allocates: optimizers hold reference cycles, which only a
    full collection (a tenth of a second) frees at once; small cases leave them to the next automatic one."""
    if nbytes >= 64 << 20:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated: MemAvailable on the CPU, free plus torch's cached memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62  # unknown: assume it fits


def groups_that_fit(case: Case, device: torch.device) -> list[list[Impl]]:
    """All implementations together when they fit (with room for temporaries), else danlu with one peer at
    a time (each group then holds the anchor, so every ratio can go through it)."""
    need = 1.5 * case.footprint_bytes * len(case.impls)
    anchor = [i for i in case.impls if i.name == REFERENCE]
    others = [i for i in case.impls if i.name != REFERENCE]
    if need <= 0.8 * available_memory(device) or not anchor or len(others) < 2:
        return [case.impls]
    return [anchor + [other] for other in others]


# ------------------------------------------------------------------------------------------------ budget

class Budget:
    """Seconds of rounds each case may take, so that a run with a budget (``--quick``) ends on time even
    when the machine is busy: the budget left is shared by the cases left, net of the time builds took
    so far; once it is spent, cases run their floor of rounds and unstable ones are not timed again."""

    def __init__(self, mode: Mode, n_cases: int):
        self.mode, self.cases_left = mode, n_cases
        self.start = time.perf_counter()
        self.overhead_s = 0.0  # building, calibrating, profiling: what the rounds do not include
        self.cases_done = 0

    def left(self) -> float:
        if self.mode.budget_s is None:
            return math.inf
        return self.mode.budget_s - (time.perf_counter() - self.start)

    def plan(self) -> tuple[int, float]:
        """(min rounds, seconds of rounds) for the next case."""
        if self.mode.budget_s is None:
            return self.mode.min_rounds, self.mode.case_s
        per_case_overhead = self.overhead_s / self.cases_done if self.cases_done else 0.5
        share = self.left() / max(1, self.cases_left) - per_case_overhead
        if share <= 0:
            return self.mode.floor_rounds, 0.0
        return self.mode.min_rounds, min(self.mode.case_s, share)

    def can_rerun(self, seconds: float) -> bool:
        return self.left() - seconds > 0 if self.mode.budget_s is not None else True

    def case_done(self, overhead_s: float) -> None:
        self.cases_left -= 1
        self.cases_done += 1
        self.overhead_s += overhead_s


# -------------------------------------------------------------------------------------------------- runs

class NoProgress:
    def start(self, label: str) -> None:
        pass

    def done(self, label: str, rows: list[Row], skipped: list[Skipped], seconds: float) -> None:
        pass


SILENT = NoProgress()


@dataclass
class Attempt:
    rows: list[Row]
    skipped: list[Skipped]
    seconds: float  # wall time of the attempt, building included

    @property
    def deciding_rows(self) -> list[Row]:
        """danlu's rows and the best peer's: the ones a reader decides on (the others may stay unstable)."""
        return [r for r in self.rows if r.impl.startswith(REFERENCE) or r.impl == r.best_peer]

    @property
    def worst_spread(self) -> float:
        return max((r.spread for r in self.deciding_rows if r.spread is not None), default=0.0)

    @property
    def unstable(self) -> bool:
        return any(r.unstable for r in self.deciding_rows)


def run_case(case: Case, device: torch.device, mode: Mode, copy_gbps: float, progress=SILENT,
             budget: Optional[Budget] = None, llc_bytes: int = 0) -> tuple[list[Row], list[Skipped]]:
    """Times every implementation of ``case`` (one attempt; see ``run_cases`` for reruns)."""
    budget = budget or Budget(mode, 1)
    progress.start(case.name)
    attempt = _attempt(case, device, mode, copy_gbps, budget, llc_bytes)
    progress.done(case.name, attempt.rows, attempt.skipped, attempt.seconds)
    return attempt.rows, attempt.skipped


def run_cases(cases: list[Case], device: torch.device, mode: Mode, copy_gbps: float, progress=SILENT,
              llc_bytes: int = 0) -> tuple[list[Row], list[Skipped]]:
    """Times every case, then times the unstable ones again (at most ``mode.reruns`` more times each, while
    the budget lasts), keeping for each case the attempt whose ratios spread least."""
    budget = Budget(mode, len(cases))
    attempts: list[list[Attempt]] = []
    for case in cases:
        progress.start(case.name)
        attempt = _attempt(case, device, mode, copy_gbps, budget, llc_bytes)
        attempts.append([attempt])
        progress.done(case.name, attempt.rows, attempt.skipped, attempt.seconds)
    for _ in range(mode.reruns):
        again = [i for i, tries in enumerate(attempts) if min(tries, key=_stability).unstable]
        for i in again:
            if not budget.can_rerun(attempts[i][-1].seconds):
                break
            budget.cases_left += 1
            progress.start(f"{cases[i].name} (again: unstable)")
            attempt = _attempt(cases[i], device, mode, copy_gbps, budget, llc_bytes)
            attempts[i].append(attempt)
            progress.done(f"{cases[i].name} (again)", attempt.rows, attempt.skipped, attempt.seconds)
    rows, skipped = [], []
    for tries in attempts:
        kept = min(tries, key=_stability)
        for row in kept.rows:
            row.attempts = len(tries)
            if len(tries) > 1:
                row.extra["attempt_speedups"] = [next((r.speedup for r in t.rows if r.impl == row.impl), None)
                                                 for t in tries]
        rows += kept.rows
        skipped += kept.skipped
    return rows, skipped


def _stability(attempt: Attempt) -> tuple[bool, float]:
    return attempt.unstable, attempt.worst_spread


def _attempt(case: Case, device: torch.device, mode: Mode, copy_gbps: float, budget: Budget,
             llc_bytes: int) -> Attempt:
    started = time.perf_counter()
    threads = torch.get_num_threads()
    skipped: list[Skipped] = []
    groups = groups_that_fit(case, device)
    min_rounds, seconds = budget.plan()
    timed = _Timed()
    for group in groups:
        _time_group(group, case, device, mode, min_rounds, seconds / len(groups), skipped, threads, timed)
        release_memory(device, case.footprint_bytes * len(group))
    rows = _rows(case, timed, copy_gbps, mode, device, threads, llc_bytes, paired=len(groups) > 1)
    elapsed = time.perf_counter() - started
    budget.case_done(elapsed - timed.rounds_s)
    return Attempt(rows, skipped, elapsed)


@dataclass
class _Timed:
    """What the groups of one attempt measured."""

    group_rounds: list[list[dict[str, float]]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, Optional[float]] = field(default_factory=dict)
    extras: dict[str, dict] = field(default_factory=dict)
    rounds_s: float = 0.0


def _time_group(group: list[Impl], case: Case, device: torch.device, mode: Mode, min_rounds: int, seconds: float,
                skipped: list[Skipped], threads: int, timed: _Timed) -> None:
    """Builds the group's implementations (all alive at once), times them in rounds, then asks each for its
    peak memory and profile. Everything built here is freed when this returns."""
    watch = stopwatch(device)
    fns = {}
    for impl in group:
        if any(s.impl == impl.name for s in skipped):
            continue  # the anchor of paired timing failed in an earlier group
        fn = _build(impl, case, skipped, threads)
        if fn is not None:
            fns[impl.name] = fn
    for name, fn in fns.items():
        timed.calls.setdefault(name, calls_per_block(fn, mode.block_s, watch))
    tic = time.perf_counter()
    peers = {impl.name for impl in group if impl.is_peer}
    rounds, failed = time_rounds(fns, timed.calls, min_rounds, mode.max_rounds, seconds, watch, peers,
                                 mode.floor_rounds)
    timed.rounds_s += time.perf_counter() - tic
    skipped += [Skipped(case.name, name, why, failed=True, threads=threads) for name, why in failed.items()]
    timed.group_rounds.append(rounds)
    for name, fn in fns.items():
        if name in failed:
            continue
        timed.peaks.setdefault(name, peak_memory_mib(fn, device))
        profile = getattr(fn, "profile", None)
        if profile is not None and name not in timed.extras:
            timed.extras[name] = profile()


def _build(impl: Impl, case: Case, skipped: list[Skipped], threads: int):
    try:
        return impl.build()
    except Unavailable as why:
        skipped.append(Skipped(case.name, impl.name, str(why), threads=threads))
    except Exception as why:  # one broken implementation must not cost a long run its other results
        skipped.append(Skipped(case.name, impl.name, f"{type(why).__name__}: {why}", failed=True, threads=threads))
    return None


def _series(group_rounds: list[list[dict[str, float]]], name: str) -> list[float]:
    return [r[name] for rounds in group_rounds for r in rounds if name in r]


def _ratios(group_rounds: list[list[dict[str, float]]], best: str, name: str) -> list[float]:
    """best's time / name's time per round: within one round where both ran, else through the anchor
    (best/anchor, as a median over best's rounds, times anchor/name in name's rounds)."""
    for rounds in group_rounds:
        both = [r for r in rounds if best in r and name in r]
        if both:
            return [r[best] / r[name] for r in both]
    through = [r[best] / r[REFERENCE] for rounds in group_rounds for r in rounds if best in r and REFERENCE in r]
    if not through:
        return []
    via = np.median(through)
    return [via * r[REFERENCE] / r[name] for rounds in group_rounds for r in rounds
            if name in r and REFERENCE in r]


def _rows(case: Case, timed: _Timed, copy_gbps: float, mode: Mode, device: torch.device, threads: int,
          llc_bytes: int, paired: bool) -> list[Row]:
    names = [impl.name for impl in case.impls if _series(timed.group_rounds, impl.name)]
    medians = {name: quartiles(_series(timed.group_rounds, name)) for name in names}
    peers = [impl.name for impl in case.impls if impl.is_peer and impl.name in medians]
    best = min(peers, key=lambda n: medians[n][1]) if peers else None
    ceiling = FRACTION_CEILING.get(device.type, 2.0)
    rows = []
    for name in names:
        q25, median, q75 = medians[name]
        gbps = case.bytes_moved / median / 1e9 if case.bytes_moved else None
        fraction = gbps / copy_gbps if gbps is not None and copy_gbps > 0 else None
        speedup = lo = hi = spread = None
        ratios = _ratios(timed.group_rounds, best, name) if best is not None else []
        if ratios:
            lo, speedup, hi = quartiles(ratios)
            spread = (hi - lo) / speedup
        flags = []
        if spread is not None and spread > mode.spread_limit:
            flags.append("noisy")
        if fraction is not None and fraction > ceiling:
            flags.append("in-cache" if case.footprint_bytes <= llc_bytes else "above-limit")
        if paired:
            flags.append("paired")
        rows.append(Row(case.family, case.name, name, threads, str(case.dtype).removeprefix("torch."), case.numel,
                        case.n_tensors, median * 1e3, q25 * 1e3, q75 * 1e3, case.bytes_moved, gbps, fraction, best,
                        speedup, lo, hi, spread, len(_series(timed.group_rounds, name)), timed.calls[name], 1, flags,
                        unstable=bool({"noisy", "above-limit"} & set(flags)), peak_mem_mib=timed.peaks.get(name),
                        extra=dict(timed.extras.get(name) or {})))
    return rows


def flag_stalls(rows: list[Row]) -> None:
    """Marks the rows of a multi-thread run that took longer than ``STALL_FACTOR`` times the same case and
    implementation at one thread (when the run had one): more threads never legitimately make a call slower
    by that much, so the time is barrier waits on a busy machine (see benchmarks/README.md, "Threads")."""
    single = {(r.case, r.impl): r.ms for r in rows if r.threads == 1}
    for row in rows:
        one = single.get((row.case, row.impl))
        if row.threads > 1 and one is not None and row.ms > STALL_FACTOR * one:
            row.flags.append("stalled")
            row.unstable = True
