"""What a run leaves behind: the terminal table, results.json, results.md, bar charts, and the
progress indicator while it runs. rich, tqdm and matplotlib are used when importable, never required."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.bandwidth import last_level_cache_bytes
from benchmarks.harness import NoProgress, Row, Skipped

COLUMNS = ["case", "impl", "dtype", "numel", "tensors", "ms", "GB/s", "of copy", "×best torch", "peak MiB"]
SHORT_DTYPES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}
SPEEDUP_NOTE = ("×best torch = fastest torch ms / this ms: on the danlu row, danlu's speedup over PyTorch's "
                "best implementation of the case; the fastest torch row reads 1.00×. "
                "GB/s = bytes-moved model / median ms; of copy = GB/s / copy bandwidth. "
                "peak MiB: CUDA memory allocated during one call beyond what was live before it.")


# ---------------------------------------------------------------------------------------------- metadata

def metadata(device: torch.device, copy_gbps: float, copy_bytes: int, mode_name: str) -> dict:
    import danlu

    return {
        "device": device.type,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "danlu": danlu.__version__,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
        "copy_bytes": copy_bytes,
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "threads": torch.get_num_threads(),
        "mode": mode_name,
        "quick": mode_name == "quick",
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str):
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ------------------------------------------------------------------------------------------------- cells

def _cells(row: Row) -> list[str]:
    return [row.case, row.impl, SHORT_DTYPES.get(row.dtype, row.dtype), _count(row.numel), str(row.n_tensors),
            _ms(row.ms), f"{row.gbps:.1f}", f"{row.fraction:.0%}", "" if row.speedup is None else f"{row.speedup:.2f}×",
            "" if row.peak_mem_mib is None else f"{row.peak_mem_mib:.1f}"]


def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _header_lines(meta: dict) -> list[str]:
    commit = (meta["commit"] or "unknown")[:12] + (" (dirty)" if meta["dirty"] else "")
    return [f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads), {meta['date']}",
            f"commit {commit}, torch {meta['torch']}, danlu {meta['danlu']}, mode {meta['mode']}",
            f"copy bandwidth {meta['copy_gbps']:.1f} GB/s (dst.copy_(src), {meta['copy_bytes'] >> 20} MiB each; "
            f"last-level cache {meta['last_level_cache_bytes'] >> 20} MiB)"]


# ---------------------------------------------------------------------------------------------- terminal

def print_table(rows: list[Row], skipped: list[Skipped], meta: dict) -> None:
    cells = [_cells(r) for r in rows]
    for previous, current in zip(reversed(cells[:-1]), reversed(cells)):  # name each case once
        if previous[0] == current[0]:
            current[0] = ""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _print_plain(cells, meta)
    else:
        table = Table(title="\n".join(_header_lines(meta)), caption=SPEEDUP_NOTE)
        for i, name in enumerate(COLUMNS):
            table.add_column(name, justify="left" if i < 3 else "right")
        for row_cells in cells:
            if row_cells[0]:
                table.add_section()
            table.add_row(*row_cells)
        # Never truncate a cell to fit a narrow terminal (or rich's 80 columns off one).
        natural = sum(_widths(cells)) + 3 * len(COLUMNS) + 1
        console = Console()
        console.width = max(console.width, natural)
        console.print(table)
    for s in skipped:
        print(f"{'FAILED' if s.failed else 'not run'}: {s.case} {s.impl}: {s.reason}")


def _widths(cells: list[list[str]]) -> list[int]:
    return [max(len(c) for c in column) for column in zip(COLUMNS, *cells)]


def _print_plain(cells: list[list[str]], meta: dict) -> None:
    widths = _widths(cells)

    def line(values):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    print("\n".join(_header_lines(meta)))
    print(line(COLUMNS))
    print("  ".join("-" * w for w in widths))
    for row_cells in cells:
        print(line(row_cells))
    print(SPEEDUP_NOTE)


# ------------------------------------------------------------------------------------------------- files

def write_results(out: Path, rows: list[Row], skipped: list[Skipped], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps({"metadata": meta, "rows": [asdict(r) for r in rows],
                                     "skipped": [asdict(s) for s in skipped]}, indent=2) + "\n")
    md_path.write_text(_markdown(rows, skipped, meta))
    return [json_path, md_path] + _charts(out, rows)


def _markdown(rows: list[Row], skipped: list[Skipped], meta: dict) -> str:
    lines = ["# danlu benchmarks", ""] + [f"- {h}" for h in _header_lines(meta)] + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|")
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", SPEEDUP_NOTE]
    if skipped:
        lines += ["", "Not run:", ""] + [f"- {s.case} {s.impl}: {'**failed** ' if s.failed else ''}{s.reason}"
                                         for s in skipped]
    return "\n".join(lines) + "\n"


def _charts(out: Path, rows: list[Row]) -> list[Path]:
    """Per family: danlu's speedup over torch's best, and every impl's fraction of copy bandwidth."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for family in dict.fromkeys(r.family for r in rows):
        family_rows = [r for r in rows if r.family == family]
        cases = list(dict.fromkeys(r.case for r in family_rows))
        impls = list(dict.fromkeys(r.impl for r in family_rows))
        value = {(r.case, r.impl): r for r in family_rows}
        height = 1.5 + 0.35 * len(cases)

        fig, ax = plt.subplots(figsize=(8, height))
        danlu_rows = [value.get((c, "danlu")) for c in cases]
        speedups = [r.speedup if r is not None and r.speedup is not None else 0 for r in danlu_rows]
        ax.bar_label(ax.barh(cases, speedups), fmt="%.2f×", padding=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        if max(speedups, default=0) > 20:  # tiny cases can reach 100×; keep the 1-3× ones readable
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("danlu speedup over the fastest torch implementation (×)")
        paths.append(_save(fig, out / f"{family}-speedup.png"))

        fig, ax = plt.subplots(figsize=(8, height * max(1, len(impls) / 2.5)))
        bar = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            positions = [k + i * bar for k in range(len(cases))]
            ax.barh(positions, [value[(c, impl)].fraction if (c, impl) in value else 0 for c in cases],
                    height=bar, label=impl)
        ax.set_yticks([k + 0.4 - bar / 2 for k in range(len(cases))], cases)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("fraction of copy bandwidth (bytes-moved model / time / copy GB/s)")
        ax.legend(loc="lower right", fontsize="small")
        paths.append(_save(fig, out / f"{family}-fraction.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- progress

@contextlib.contextmanager
def progress(total: int):
    """A progress bar over ``total`` steps when stdout is a terminal and rich or tqdm is importable."""
    if not sys.stdout.isatty():
        yield NoProgress()
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        pass
    else:
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True) as bar:
            yield _RichProgress(bar, bar.add_task("", total=total))
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield NoProgress()
        return
    with tqdm(total=total, leave=False, file=sys.stdout) as bar:
        yield _TqdmProgress(bar)


class _RichProgress:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def start(self, label: str) -> None:
        self.bar.update(self.task, description=label)

    def advance(self) -> None:
        self.bar.advance(self.task)


class _TqdmProgress:
    def __init__(self, bar):
        self.bar = bar

    def start(self, label: str) -> None:
        self.bar.set_description_str(label)

    def advance(self) -> None:
        self.bar.update()
