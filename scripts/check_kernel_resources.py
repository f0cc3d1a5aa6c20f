"""Fails when a CUDA kernel of the built module has a stack frame or uses local memory.

A nonzero stack frame means registers spilled or an array went to local memory: each access is then a round
trip to memory in the middle of a memory-bound kernel (issue 11). Every danlu kernel is written to need none, so
this check allows none. It reads the resource usage that ptxas recorded in the module's embedded cubins with
`cuobjdump --dump-resource-usage`, which needs no GPU: CI runs it after the DANLU_CUDA=ON build.

usage: python scripts/check_kernel_resources.py [MODULE.so ...] [--cuobjdump PATH]
(default: the installed danlu._C). cuobjdump is looked for on PATH, in the CUDA toolkit and in the
nvidia-cuda-cuobjdump wheel (.ci/run installs that one).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FORBIDDEN = ("STACK", "LOCAL")  # bytes per thread of stack frame (spills included) and of other local memory


@dataclass
class Usage:
    arch: str
    name: str
    resources: dict[str, int]

    def problems(self) -> list[str]:
        return [f"{key} {self.resources[key]} bytes" for key in FORBIDDEN if self.resources.get(key, 0)]


def find_cuobjdump(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "cuobjdump"))
    nvidia = importlib.util.find_spec("nvidia")  # the namespace package of NVIDIA's wheels
    for root in (nvidia.submodule_search_locations or []) if nvidia else []:
        candidates.extend(str(p) for p in sorted(Path(root).glob("*/bin/cuobjdump")))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def installed_module() -> str:
    spec = importlib.util.find_spec("danlu._C")
    if spec is None or not spec.origin:
        sys.exit("check_kernel_resources: danlu._C is not installed; give the module's path")
    return spec.origin


def parse(dump: str) -> list[Usage]:
    """The functions of `cuobjdump --dump-resource-usage` output: an `arch = sm_XX` line per cubin, then a
    `Function NAME:` line per function, followed by its `KEY:VALUE ...` line."""
    usages, arch, name = [], "?", None
    for line in dump.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            name = line[len("Function "):-1]
        elif name is not None:
            pairs = re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)
            usages.append(Usage(arch, name, {key: int(value) for key, value in pairs}))
            name = None
    return usages


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    readable = [re.sub(r"\(anonymous namespace\)::", "", line) for line in out.splitlines()]
    return dict(zip(names, readable)) if len(readable) == len(names) else {n: n for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="shared objects or cubins (default: the installed danlu._C)")
    parser.add_argument("--cuobjdump", help="path of cuobjdump")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every function, not only failures")
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump(args.cuobjdump)
    if cuobjdump is None:
        print("check_kernel_resources: cuobjdump not found (PATH, CUDA_HOME, /usr/local/cuda, the "
              "nvidia-cuda-cuobjdump wheel)", file=sys.stderr)
        return 2
    failed = 0
    for module in args.modules or [installed_module()]:
        result = subprocess.run([cuobjdump, "--dump-resource-usage", module], capture_output=True, text=True)
        usages = parse(result.stdout)
        if result.returncode != 0 or not usages:
            print(f"check_kernel_resources: no CUDA functions in {module} (was it built with DANLU_CUDA=ON?)\n"
                  f"{result.stderr.strip()}", file=sys.stderr)
            return 2
        names = demangle(sorted({u.name for u in usages}))
        bad = [u for u in usages if u.problems()]
        for u in usages if args.verbose else bad:
            verdict = "; ".join(u.problems()) or "ok"
            print(f"{u.arch:8} REG {u.resources.get('REG', 0):3}  {verdict:30}  {names[u.name]}")
        archs = ", ".join(sorted({u.arch for u in usages}))
        print(f"{module}: {len({u.name for u in usages})} functions for {archs}: {len({u.name for u in bad})} "
              f"functions ({len(bad)} function builds) with a stack frame or local memory")
        failed += bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
