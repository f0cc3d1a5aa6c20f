"""The device's copy bandwidth, measured in the same run as the kernels: the limit they are held to
(docs/design.md principle 7).

``dst.copy_(src)`` over buffers far larger than the last-level cache reads every byte of ``src`` once
and writes every byte of ``dst`` once, so copy_gbps = 2 * nbytes / time (GB = 1e9 bytes), the STREAM
convention. Two reasons a kernel can show more than 100% of it:

- part of its data stayed in a cache between calls (small cases, or a large last-level cache);
- on CPUs the copy also pays a read-for-ownership of each ``dst`` line it writes, which an in-place
  update (every optimizer step) does not, so in-place kernels can reach up to about 1.5-1.7x copy_gbps.

It is measured at each thread count the run uses: a kernel at one thread is held to the copy at one
thread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.harness import Mode, calls_per_block, stopwatch, time_block

# Bytes of each of src and dst, by (device type, mode); raised to twice the last-level cache.
COPY_BYTES = {
    ("cpu", "full"): 256 << 20,
    ("cpu", "quick"): 128 << 20,
    ("cpu", "smoke"): 8 << 20,
    ("cuda", "full"): 1 << 30,
    ("cuda", "quick"): 512 << 20,
    ("cuda", "smoke"): 8 << 20,
}


def copy_bandwidth(device: torch.device, mode: Mode) -> tuple[float, int]:
    """(GB/s, bytes of each buffer) of dst.copy_(src) on ``device``: the fastest of 7 blocks of calls. The limit
    is what the machine does undisturbed: on a busy machine the median copy is slowed by the same stalls as
    the kernels, and would make every kernel look closer to the limit than it is."""
    nbytes = COPY_BYTES[(device.type, mode.name)]
    if mode.name != "smoke":
        nbytes = max(nbytes, 2 * last_level_cache_bytes(device))
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # written once here so page faults stay out of the timing
    copy, watch = (lambda: dst.copy_(src)), stopwatch(device)
    calls = calls_per_block(copy, mode.block_s, watch)
    seconds = min(time_block(copy, calls, watch) for _ in range(7))
    return 2 * nbytes / seconds / 1e9, nbytes


def last_level_cache_bytes(device: torch.device) -> int:
    """The largest cache of the device (0 if unknown): CUDA's L2, or the CPU's largest data cache."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() != "Instruction":
                sizes.append(_parse_size((index / "size").read_text().strip()))
        except (OSError, ValueError):
            pass
    return max(sizes)


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
