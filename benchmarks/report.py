"""What a run leaves behind: the terminal tables, results.json, results.md, charts, and progress while it
runs. rich, tqdm and matplotlib are used when importable, never required."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.bandwidth import last_level_cache_bytes
from benchmarks.harness import FLAG_NOTES, FRACTION_CEILING, MODES, NoProgress, Row, Skipped

CLOCKS = {"cpu": "process CPU time (a preemption does not count)", "wall": "wall time"}
SHORT_DTYPES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}
KERNEL_COLUMNS = ["case", "impl", "thr", "ms", "GB/s", "of copy", "×best peer", "IQR", "rounds", "flags"]
E2E_COLUMNS = ["case", "impl", "thr", "step ms", "×best peer", "IQR", "BN+act ms", "dropout ms", "optim ms",
               "replaced", "rounds", "flags"]
NOTES = ["ms: median time per call over the rounds. ×best peer: the median over rounds of (fastest peer's time / "
         "this time) in the same round; the fastest peer reads 1.00×. IQR: the quartiles of those per-round ratios.",
         "GB/s = bytes-moved model / ms; of copy = GB/s / copy bandwidth at the same thread count.",
         "Step (end to end): BN+act, dropout and optim ms are the profiled time per step of the work danlu replaces "
         "(forward and backward) and of optimizer.step(); replaced = their share of the step's profiled op time.",
         "A row marked ! is unstable: " + "; ".join(f"{flag}: {FLAG_NOTES[flag]}" for flag in ("noisy", "above-limit",
                                                                                            "stalled"))
         + f". in-cache: {FLAG_NOTES['in-cache']}. paired: {FLAG_NOTES['paired']}."]


# ---------------------------------------------------------------------------------------------- metadata

def metadata(device: torch.device, copy: dict[int, tuple[float, int]], clocks: dict[int, str], mode_name: str,
             threads: list[int], seconds: float) -> dict:
    import danlu

    return {
        "device": device.type,
        "device_name": _device_name(device),
        "cpu_isa": getattr(danlu._C, "cpu_isa", lambda: None)(),
        "torch": torch.__version__,
        "danlu": danlu.__version__,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": {str(n): gbps for n, (gbps, _) in copy.items()},
        "copy_bytes": next(iter(copy.values()))[1],
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "threads": threads,
        "clocks": {str(n): clock for n, clock in clocks.items()},  # cpu: process CPU time (1 thread); wall
        "cores": _cores(),
        "load_average": _load_average(),
        "mode": mode_name,
        "quick": mode_name == "quick",
        "spread_limit": MODES[mode_name].spread_limit,
        "fraction_ceiling": FRACTION_CEILING.get(device.type),
        "seconds": seconds,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _load_average():
    import os

    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _git(*args: str):
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit(meta: dict) -> str:
    return (meta["commit"] or "unknown")[:12] + (" (dirty)" if meta["dirty"] else "")


def _header_lines(meta: dict) -> list[str]:
    copy = ", ".join(f"{gbps:.1f} GB/s at {n} thread{'s' * (n != '1')}" for n, gbps in meta["copy_gbps"].items())
    clocks = ", ".join(f"{n} thread{'s' * (n != '1')}: {CLOCKS[clock]}" for n, clock in meta["clocks"].items())
    load = f", load average {meta['load_average'][0]} at the end" if meta.get("load_average") else ""
    return [f"{meta['device_name']} ({meta['device']}, {meta['cores']} cores{load}), {meta['date']}",
            f"commit {_commit(meta)}, torch {meta['torch']}, danlu {meta['danlu']}, mode {meta['mode']}, "
            f"{meta['seconds']:.0f} s",
            f"copy bandwidth {copy} (dst.copy_(src), {meta['copy_bytes'] >> 20} MiB each; last-level cache "
            f"{meta['last_level_cache_bytes'] >> 20} MiB)",
            f"clock: {clocks}"]


def chart_title(meta: dict) -> str:
    return (f"{meta['device_name']} ({meta['device']}), {meta['date'][:10]}, torch {meta['torch']}, "
            f"danlu {_commit(meta)}")


# ------------------------------------------------------------------------------------------------- cells

def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}×"


def _iqr(row: Row) -> str:
    return "" if row.speedup_q25 is None else f"{row.speedup_q25:.2f}–{row.speedup_q75:.2f}"


def _flags(row: Row) -> str:
    return ("! " if row.unstable else "") + " ".join(row.flags)


def _kernel_cells(row: Row) -> list[str]:
    return [row.case, row.impl, str(row.threads), _ms(row.ms), "" if row.gbps is None else f"{row.gbps:.1f}",
            "" if row.fraction is None else f"{row.fraction:.0%}", _ratio(row.speedup), _iqr(row), str(row.rounds),
            _flags(row)]


def _e2e_cells(row: Row) -> list[str]:
    prof = row.extra.get("profile") or {}

    def ms(key):
        return "" if key not in prof else f"{prof[key]:.1f}"

    share = prof.get("replaced_share")
    return [row.case, row.impl, str(row.threads), _ms(row.ms), _ratio(row.speedup), _iqr(row), ms("batchnorm_ms"),
            ms("dropout_ms"), ms("optimizer_ms"), "" if share is None else f"{share:.0%}", str(row.rounds),
            _flags(row)]


def _tables(rows: list[Row]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, cells) of the end-to-end table (first) and the kernel table."""
    e2e = [r for r in rows if r.family == "e2e"]
    kernels = [r for r in rows if r.family != "e2e"]
    tables = []
    if e2e:
        tables.append(("Training step, end to end", E2E_COLUMNS, _dedupe([_e2e_cells(r) for r in e2e])))
    if kernels:
        tables.append(("Kernels", KERNEL_COLUMNS, _dedupe([_kernel_cells(r) for r in kernels])))
    return tables


def _dedupe(cells: list[list[str]]) -> list[list[str]]:
    for previous, current in zip(reversed(cells[:-1]), reversed(cells)):  # name each case once
        if previous[0] == current[0]:
            current[0] = ""
    return cells


# ---------------------------------------------------------------------------------------------- terminal

def print_table(rows: list[Row], skipped: list[Skipped], meta: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    print("\n".join(_header_lines(meta)))
    for title, columns, cells in _tables(rows):
        if Console is None or not sys.stdout.isatty():
            _print_plain(title, columns, cells)
            continue
        table = Table(title=title)
        for i, name in enumerate(columns):
            table.add_column(name, justify="left" if i < 2 else "right")
        for row_cells in cells:
            if row_cells[0]:
                table.add_section()
            table.add_row(*row_cells)
        console = Console()  # never truncate a cell to fit a narrow terminal
        console.width = max(console.width, sum(_widths(columns, cells)) + 3 * len(columns) + 1)
        console.print(table)
    print("\n".join(NOTES))
    for s in skipped:
        print(f"{'FAILED' if s.failed else 'not run'}: {s.case} {s.impl} ({s.threads} thr): {s.reason}")


def _widths(columns: list[str], cells: list[list[str]]) -> list[int]:
    return [max(len(c) for c in column) for column in zip(columns, *cells)]


def _print_plain(title: str, columns: list[str], cells: list[list[str]]) -> None:
    widths = _widths(columns, cells)

    def line(values):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    print(f"\n{title}")
    print(line(columns))
    print("  ".join("-" * w for w in widths))
    for row_cells in cells:
        print(line(row_cells))


# ------------------------------------------------------------------------------------------------- files

def write_results(out: Path, rows: list[Row], skipped: list[Skipped], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps({"metadata": meta, "rows": [asdict(r) for r in rows],
                                     "skipped": [asdict(s) for s in skipped]}, indent=2) + "\n")
    md_path.write_text(markdown(rows, skipped, meta))
    return [json_path, md_path] + charts(out, rows, meta)


def markdown(rows: list[Row], skipped: list[Skipped], meta: dict) -> str:
    lines = ["# danlu benchmarks", ""] + [f"- {h}" for h in _header_lines(meta)]
    for title, columns, cells in _tables(rows):
        lines += ["", f"## {title}", "", "| " + " | ".join(columns) + " |",
                  "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells) + " |" for row_cells in cells]
    lines += [""] + NOTES
    if skipped:
        lines += ["", "Not run:", ""] + [f"- {s.case} {s.impl} ({s.threads} thr): {'**failed** ' if s.failed else ''}"
                                         f"{s.reason}" for s in skipped]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ charts

SPEEDUP_LIMITS = (0.25, 8.0)  # the x range of every speedup chart, log scale; bars beyond it are clipped


def charts(out: Path, rows: list[Row], meta: dict) -> list[Path]:
    """Per family: danlu's speedup over the best peer (median and IQR of the per-round ratios), and every
    implementation's fraction of the copy bandwidth; both on one x scale for every family. Values beyond
    the scale are drawn to its edge and labelled with their value."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError:
        return []
    ceiling = meta.get("fraction_ceiling") or 2.0
    paths = []
    for family in dict.fromkeys(r.family for r in rows):
        family_rows = [r for r in rows if r.family == family]
        if any(r.speedup is not None for r in family_rows if not r.impl.startswith("torch")):
            paths.append(_speedup_chart(out / f"{family}-speedup.png", family, family_rows, meta))
        if any(r.fraction is not None for r in family_rows):
            paths.append(_fraction_chart(out / f"{family}-fraction.png", family, family_rows, meta,
                                         (0.0, 1.25 * ceiling), ceiling))
    return paths


def _speedup_chart(path: Path, family: str, rows: list[Row], meta: dict) -> Path:
    """One bar per (case, danlu implementation, thread count)."""
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r.impl.startswith("danlu") and r.speedup is not None]
    labels = [r.case + ("" if r.impl == "danlu" else f" {r.impl}")
              + (f" ({r.threads} thr)" if len(meta["threads"]) > 1 else "") for r in ours]
    lo, hi = SPEEDUP_LIMITS
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.28 * len(ours)))
    for y, row in enumerate(ours):
        value, q25, q75 = (min(max(v, lo), hi) for v in (row.speedup, row.speedup_q25, row.speedup_q75))
        color = "tab:gray" if row.unstable else ("tab:green" if row.speedup >= 1 else "tab:red")
        ax.barh(y, abs(value - 1), left=min(value, 1), color=color, hatch="//" if row.unstable else None,
                edgecolor="white")
        ax.errorbar(value, y, xerr=[[max(value - q25, 0)], [max(q75 - value, 0)]], fmt="none", ecolor="black",
                    capsize=2, linewidth=0.8)
        clipped = row.speedup > hi or row.speedup < lo
        text = f"{row.speedup:.2f}×" + (" (clipped)" if clipped else "") + (" !" if row.unstable else "")
        _speedup_label(ax, y, text, row.speedup >= 1, q25, q75, lo, hi)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_xticks([0.25, 0.5, 1, 2, 4, 8], ["0.25×", "0.5×", "1×", "2×", "4×", "8×"])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(ours)), labels, fontsize="small")
    ax.set_ylim(len(ours) - 0.5, -0.5)
    ax.set_xlabel("danlu's speedup over the fastest peer: median of per-round ratios, whiskers IQR; "
                  "grey: unstable", fontsize="small")
    ax.set_title(f"{family}: danlu vs the fastest peer\n{chart_title(meta)}", fontsize="medium")
    return _save(fig, path)


def _fraction_chart(path: Path, family: str, rows: list[Row], meta: dict, limits: tuple[float, float],
                    ceiling: float) -> Path:
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r.case, r.threads) for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    value = {(r.case, r.threads, r.impl): r for r in rows}
    lo, hi = limits
    bar = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.16 * len(keys) * len(impls) + 0.1 * len(keys)))
    for i, impl in enumerate(impls):
        ys, widths = [], []
        for k, key in enumerate(keys):
            row = value.get((*key, impl))
            if row is None or row.fraction is None:
                continue
            ys.append(k + i * bar)
            widths.append(min(row.fraction, hi))
            if row.fraction > hi:
                _inside_label(ax, hi, k + i * bar, f"{row.fraction:.0%} (clipped)", lo, hi)
        ax.barh(ys, widths, height=bar, label=impl)
    ax.set_xlim(lo, hi)
    ax.set_yticks([k + 0.4 - bar / 2 for k in range(len(keys))],
                  [case + (f" ({threads} thr)" if len(meta["threads"]) > 1 else "") for case, threads in keys],
                  fontsize="small")
    ax.set_ylim(len(keys) - 0.1, -0.2 - bar / 2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(ceiling, color="tab:red", linewidth=0.8, linestyle="--")
    ax.text(ceiling, 0.995, f" ceiling {ceiling:g}×", color="tab:red", fontsize="x-small", va="top",
            transform=ax.get_xaxis_transform())
    ax.set_xlabel("fraction of copy bandwidth (bytes-moved model / median time / copy GB/s)", fontsize="small")
    ax.legend(loc="lower right", fontsize="x-small", framealpha=0.9)
    ax.set_title(f"{family}: fraction of copy bandwidth\n{chart_title(meta)}", fontsize="medium")
    return _save(fig, path)


def _speedup_label(ax, y: float, text: str, above_one: bool, q25: float, q75: float, lo: float, hi: float) -> None:
    """The value of a speedup bar, inside the frame and clear of the bar and its whisker: beyond the whisker
    when there is room, else on the other side of the 1x line (log axis)."""
    room_right, room_left = math.log(hi / q75) / math.log(hi / lo), math.log(q25 / lo) / math.log(hi / lo)
    if above_one and room_right > 0.2:
        ax.text(q75 * 1.04, y, text, va="center", ha="left", fontsize="x-small")
    elif not above_one and room_left > 0.2:
        ax.text(q25 / 1.04, y, text, va="center", ha="right", fontsize="x-small")
    else:
        ax.text(1 / 1.04 if above_one else 1.04, y, text, va="center", ha="right" if above_one else "left",
                fontsize="x-small")


def _inside_label(ax, x: float, y: float, text: str, lo: float, hi: float) -> None:
    """A value label at the end of a bar clipped at the right edge: inside the bar, in white."""
    ax.text(x - 0.01 * (hi - lo), y, text, va="center", ha="right", fontsize="x-small", color="white",
            fontweight="bold")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- progress

@contextlib.contextmanager
def progress(total: int, threads: int):
    """A progress bar over ``total`` cases when stdout is a terminal and rich or tqdm is importable; else one
    plain line per case (logs and CI see the run advance)."""
    if not sys.stdout.isatty():
        yield PlainProgress(total, threads)
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        pass
    else:
        with Progress(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(f"{threads} thread(s)", total=total)
            yield _BarProgress(lambda label: bar.update(task, description=label), lambda: bar.advance(task))
            return
    try:
        from tqdm import tqdm
    except ImportError:
        yield PlainProgress(total, threads)
        return
    with tqdm(total=total, leave=False, file=sys.stdout) as bar:
        yield _BarProgress(bar.set_description_str, bar.update)


def summary(rows: list[Row], skipped: list[Skipped]) -> str:
    """One line on a finished case: danlu's time and speedup over the best peer, or why nothing ran."""
    ours = [r for r in rows if r.impl.startswith("danlu")] or rows
    parts = []
    for r in ours:
        ratio = "" if r.speedup is None else f" {r.speedup:.2f}× {r.best_peer} [IQR {_iqr(r)}]"
        parts.append(f"{r.impl} {_ms(r.ms)} ms{ratio}{' UNSTABLE ' + ','.join(r.flags) if r.unstable else ''}")
    rounds = f", {rows[0].rounds} rounds" if rows else ""
    failed = [s.impl for s in skipped if s.failed]
    return "; ".join(parts) + rounds + (f"; FAILED: {', '.join(failed)}" if failed else "")


class PlainProgress(NoProgress):
    def __init__(self, total: int, threads: int):
        self.total, self.threads, self.count = total, threads, 0
        self.start_time = time.perf_counter()

    def done(self, label: str, rows: list[Row], skipped: list[Skipped], seconds: float) -> None:
        self.count += 1 if not label.endswith("(again)") else 0
        elapsed = int(time.perf_counter() - self.start_time)
        print(f"[{self.count:>3}/{self.total} {elapsed // 60}:{elapsed % 60:02d} {self.threads}thr] {label}: "
              f"{summary(rows, skipped)} ({seconds:.1f} s)", flush=True)


class _BarProgress(NoProgress):
    def __init__(self, describe, advance):
        self.describe, self.advance = describe, advance

    def start(self, label: str) -> None:
        self.describe(label)

    def done(self, label: str, rows: list[Row], skipped: list[Skipped], seconds: float) -> None:
        if not label.endswith("(again)"):
            self.advance()
