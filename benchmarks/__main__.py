"""python -m benchmarks [--device cpu|cuda] [--quick|--smoke] [--only FAMILY,...] [--threads N,...] [--out DIR]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness, peers, report
from benchmarks.bandwidth import copy_bandwidth, last_level_cache_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time danlu's kernels against PyTorch's (and other libraries') implementations and the "
                    "device's copy bandwidth, interleaved in rounds.")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where to run (default: cuda when torch and danlu can use it, else cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller cases (still beyond the caches), fewer of them, a time budget: under 3 minutes "
                           "per thread count on 2 cores")
    size.add_argument("--smoke", action="store_true",
                      help="tiny cases and timings, for the test suite: the numbers mean nothing")
    parser.add_argument("--only", type=_families, default=list(harness.FAMILIES),
                        metavar="FAMILY[,FAMILY...]",
                        help=f"families to run, of {', '.join(harness.FAMILIES)} (default: all)")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N[,N...]",
                        help="run everything at each of these thread counts (torch.set_num_threads), e.g. 1,2 "
                             "(default: torch's current count)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="folder for results.json, results.md and charts (default: bench-out/)")
    return parser.parse_args(argv)


def _families(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in harness.FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown family {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"known: {', '.join(harness.FAMILIES)}")
    return list(dict.fromkeys(names))


def _threads(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2; got {text!r}")
    return list(dict.fromkeys(counts))


def _device(requested) -> tuple[torch.device | None, str]:
    """The device to run on, or None and why it cannot be used."""
    import danlu

    usable = torch.cuda.is_available() and danlu.cuda_available()
    if requested is None:
        return torch.device("cuda" if usable else "cpu"), ""
    if requested == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return None, f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device."
    if requested == "cuda" and not danlu.cuda_available():
        return None, ("--device cuda: danlu cannot run CUDA kernels here (built without CUDA, or no driver "
                      "or GPU visible to it). Reinstall danlu with nvcc on PATH: pip install .")
    return torch.device(requested), ""


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        import danlu  # noqa: F401
    except ImportError as why:
        print(f"benchmarks: cannot import danlu ({why}). Install it first: pip install .", file=sys.stderr)
        return 1
    device, why = _device(args.device)
    if device is None:
        print(f"benchmarks: {why}", file=sys.stderr)
        return 1
    mode = harness.MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    thread_counts = args.threads or [torch.get_num_threads()]
    cases = [case for family in args.only for case in harness.family_cases(family, device, mode)]
    if device.type == "cpu":
        peers.prepare_deepspeed({name for case in cases for name in _deepspeed_classes(case)},
                                lambda line: print(line, flush=True))
    llc = last_level_cache_bytes(device)

    rows, skipped, copy, clocks = [], [], {}, {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        copy[threads] = copy_bandwidth(device, mode)
        clocks[threads] = harness.stopwatch(device).name
        n_impls = sum(len(case.impls) for case in cases)
        budget = f", budget {mode.budget_s:.0f} s" if mode.budget_s else ""
        print(f"{threads} thread(s), {clocks[threads]} clock: copy bandwidth {copy[threads][0]:.1f} GB/s; timing "
              f"{n_impls} implementations of {len(cases)} cases on {device} ({mode.name} mode{budget})", flush=True)
        with report.progress(len(cases), threads) as bar:
            thread_rows, thread_skipped = harness.run_cases(cases, device, mode, copy[threads][0], bar, llc)
        rows += thread_rows
        skipped += thread_skipped

    harness.flag_stalls(rows)
    meta = report.metadata(device, copy, clocks, mode.name, thread_counts, time.perf_counter() - started)
    report.print_table(rows, skipped, meta)
    for path in report.write_results(args.out, rows, skipped, meta):
        print(f"wrote {path}")
    failed = [s for s in skipped if s.failed]
    if failed:
        print(f"benchmarks: {len(failed)} implementation(s) failed; see FAILED above.", file=sys.stderr)
    print(f"took {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failed else 0


def _deepspeed_classes(case: harness.Case) -> set[str]:
    """The DeepSpeed optimizer classes a case times (its name starts with the torch optimizer's)."""
    if not any(impl.name == "deepspeed" for impl in case.impls):
        return set()
    return {peers.DEEPSPEED_OPTIMIZERS[case.name.split("/")[0]]}


if __name__ == "__main__":
    sys.exit(main())
