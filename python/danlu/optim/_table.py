"""The tensor table of one fused call, in the layout of csrc/common/multi_tensor.h (its row numbers and flags
come from danlu._C)."""

from __future__ import annotations

import numpy as np
import torch

from danlu import _C

ROWS = _C.table_rows  # {"param": 0, "grad": 1, "state": 2, "step": 5, "numel": 6, "offset": 7, "flags": 8}
NUM_ROWS = _C.table_num_rows
MAX_STATES = _C.table_max_states
FIRST_STEP = _C.table_first_step_flag  # a fresh SGD momentum buffer: the kernel copies the grad into it
# Rows [0, POINTER_ROWS) hold data pointers: the ones a step may have to refresh.
POINTER_ROWS = ROWS["numel"]
BLOCK_ELEMS = _C.table_block_elems  # the virtual elements of one block of the CUDA step kernel


def block_first_tensor(offsets: np.ndarray, num_blocks: int) -> np.ndarray:
    """For each block of the CUDA step kernel, the first tensor whose padded range reaches into the block: the
    last one that starts at or before the block (empty tensors start where the next one does, and are passed)."""
    block_starts = np.arange(num_blocks, dtype=np.int64) * BLOCK_ELEMS
    return np.searchsorted(offsets, block_starts, side="right") - 1


class TensorTable:
    """Pointers, sizes and flags of a bucket's tensors, on the host and (for CUDA) in device memory.

    Sizes and flags are fixed when the table is made; pointers are written by set_pointers before every
    step that finds them moved. Each tensor's length in the virtual index space is padded to the 16-byte
    vector width, so that a vector-aligned virtual index is vector-aligned inside its tensor as well. The
    kernels clear FIRST_STEP flags in place once the step they belong to has run. A CUDA table is followed
    by its block map: for each block of the step kernel, the first tensor of its virtual range.
    """

    def __init__(self, numel: np.ndarray, itemsize: int, flags: np.ndarray, device: torch.device):
        n = len(numel)
        width = 16 // itemsize
        padded = -(-numel // width) * width
        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(padded[:-1], out=offsets[1:])
        self.num_tensors = n
        self.total = int(padded.sum())
        # At least one block, so that the steps of empty tensors are still counted.
        self.num_blocks = 0 if device.type == "cpu" else max(1, -(-self.total // BLOCK_ELEMS))
        buffer = torch.zeros(NUM_ROWS * n + self.num_blocks, dtype=torch.int64)
        self.host = buffer[:NUM_ROWS * n].view(NUM_ROWS, n)
        rows = self.host.numpy()
        rows[ROWS["numel"]], rows[ROWS["offset"]], rows[ROWS["flags"]] = numel, offsets, flags
        buffer.numpy()[NUM_ROWS * n:] = block_first_tensor(offsets, self.num_blocks)
        if device.type == "cpu":
            self.device_rows, self.block_map_ptr = self.host, 0
        else:
            on_device = buffer.to(device)
            self.device_rows = on_device[:NUM_ROWS * n].view(NUM_ROWS, n)
            self.block_map_ptr = on_device.data_ptr() + NUM_ROWS * n * on_device.itemsize

    @property
    def ptr(self) -> int:
        return self.device_rows.data_ptr()

    def set_pointers(self, pointers: np.ndarray) -> None:
        """pointers: [POINTER_ROWS, n]. A CUDA table gets them with a copy from pageable host memory, which
        returns once the host rows have been read, so the next step may rewrite them."""
        self.host.numpy()[:POINTER_ROWS] = pointers
        if self.device_rows is not self.host:
            self.device_rows[:POINTER_ROWS].copy_(self.host[:POINTER_ROWS], non_blocking=True)

    def carry_flags(self, old: TensorTable, new_index: list, old_index: list) -> None:
        """Flags of tensors that the old table held (an SGD buffer still waiting for its first step),
        copied where they are (device to device: the host never waits for a step)."""
        if new_index:
            self.device_rows[ROWS["flags"], new_index] = old.device_rows[ROWS["flags"], old_index]
