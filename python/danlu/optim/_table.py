"""The tensor table of one fused call, in the layout of csrc/common/multi_tensor.h."""

import numpy as np
import torch

# Rows of csrc/common/multi_tensor.h.
PARAM, GRAD, STATE, STEP, NUMEL, OFFSET, FLAGS, NUM_ROWS = 0, 1, 2, 5, 6, 7, 8, 9
MAX_STATES = 3
FIRST_STEP = 1  # a fresh SGD momentum buffer: the kernel copies the grad into it, then clears the flag


class TensorTable:
    """Pointers, sizes and flags of a bucket's tensors, on the host and (for CUDA) in device memory.

    Each tensor's length in the virtual index space is padded to the 16-byte vector width, so that a
    vector-aligned virtual index is vector-aligned inside its tensor as well.
    """

    def __init__(self, params, grads, states, steps, flags, itemsize, device):
        n = len(params)
        numel = np.array([p.numel() for p in params], dtype=np.int64)
        width = 16 // itemsize
        padded = -(-numel // width) * width
        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(padded[:-1], out=offsets[1:])
        rows = np.zeros((NUM_ROWS, n), dtype=np.int64)
        rows[PARAM] = [p.data_ptr() for p in params]
        rows[GRAD] = [g.data_ptr() for g in grads]
        for k in range(MAX_STATES):
            rows[STATE + k] = [s[k].data_ptr() if s[k] is not None else 0 for s in states]
        rows[STEP] = [s.data_ptr() if s is not None else 0 for s in steps]
        rows[NUMEL] = numel
        rows[OFFSET] = offsets
        rows[FLAGS] = flags
        self.num_tensors = n
        self.total = int(padded.sum())
        self.host = torch.from_numpy(rows)
        self.device_rows = self.host if device.type == "cpu" else self.host.to(device)

    @property
    def ptr(self) -> int:
        return self.device_rows.data_ptr()

    def set_grads(self, grads) -> None:
        ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
        self.host[GRAD].copy_(ptrs)
        if self.device_rows is not self.host:
            self.device_rows[GRAD].copy_(ptrs, non_blocking=True)

    def flags(self) -> list:
        """The flags as the last step left them (the kernel clears FIRST_STEP once it has run)."""
        return self.device_rows[FLAGS].tolist()
