"""python -m benchmarks [--device cpu|cuda] [--quick] [--only optim,batchnorm,dropout] [--out DIR]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks import harness, report
from benchmarks.bandwidth import copy_bandwidth


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time danlu's kernels against PyTorch's implementations and the device's copy bandwidth.")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where to run (default: cuda when torch and danlu can use it, else cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller cases (still beyond the caches), fewer optimizers and BatchNorm cases: "
                           "minutes, not tens")
    size.add_argument("--smoke", action="store_true",
                      help="tiny cases and timings, for the test suite: the numbers mean nothing")
    parser.add_argument("--only", type=_families, default=list(harness.FAMILIES),
                        metavar="FAMILY[,FAMILY...]",
                        help=f"families to run, of {', '.join(harness.FAMILIES)} (default: all)")
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
    families = args.only
    mode = harness.MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    copy_gbps, copy_bytes = copy_bandwidth(device, mode)
    meta = report.metadata(device, copy_gbps, copy_bytes, mode.name)
    cases = [case for family in families for case in harness.family_cases(family, device, mode)]
    n_impls = sum(len(case.impls) for case in cases)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s; timing {n_impls} implementations of {len(cases)} cases "
          f"on {device} ({mode.name} mode, {torch.get_num_threads()} threads)", flush=True)

    rows, skipped = [], []
    with report.progress(n_impls) as bar:
        for case in cases:
            case_rows, case_skipped = harness.run_case(case, device, mode, copy_gbps, bar)
            rows += case_rows
            skipped += case_skipped

    report.print_table(rows, skipped, meta)
    for path in report.write_results(args.out, rows, skipped, meta):
        print(f"wrote {path}")
    failed = [s for s in skipped if s.failed]
    if failed:
        print(f"benchmarks: {len(failed)} implementation(s) failed; see FAILED above.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
