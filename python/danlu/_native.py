"""What the Python side needs to know about danlu._C: dtype codes and tensor checks done before a
pointer crosses the boundary (docs/design.md principle 1)."""

import torch

from danlu import _C

# The dtype codes of csrc/common/dtype.h.
DTYPE_CODES = {getattr(torch, name): code for name, code in _C.dtype_codes.items()}
# Complex tensors are updated through their real view, as torch's optimizers do.
REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory in some order of dimensions."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def has_strides(t: torch.Tensor, strides) -> bool:
    """t's strides are `strides` over the dimensions that have more than one element (the others' do not
    matter)."""
    return all(st == s for st, s, n in zip(t.stride(), strides, t.shape) if n != 1)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides over the dimensions that have more than one element."""
    return a.shape == b.shape and has_strides(a, b.stride())


def check_dtype(x: torch.Tensor, who: str) -> None:
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{who}: input dtype {x.dtype} is not supported (float32, float64, float16, bfloat16)")


def check_cuda_built(device: torch.device) -> None:
    if device.type == "cuda" and not _C.built_with_cuda:
        raise RuntimeError(
            "danlu was built without CUDA kernels (no nvcc at build time, or DANLU_CUDA=OFF); "
            f"cannot run on {device}. Reinstall danlu on a machine with the CUDA toolkit."
        )
