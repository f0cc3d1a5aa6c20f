"""danlu: fused training kernels for PyTorch (optimizers, BatchNorm, dropout) on CPU and CUDA."""

# torch first: its bundled libgomp.so.1 is then the one OpenMP runtime that both torch and danlu._C
# use, so the two share one thread pool instead of fighting over the cores.
import torch  # noqa: F401

from danlu import (
    _C,
    _ops,  # noqa: F401  (registers the custom ops that torch.compile traces)
    functional,
    nn,
    optim,
)

__version__ = _C.build_info()["version"]


def cuda_available() -> bool:
    """Whether danlu's CUDA kernels can run here: built with CUDA, and a driver and a GPU are present."""
    return bool(_C.built_with_cuda) and _C.cuda_device_count() > 0


__all__ = ["cuda_available", "functional", "nn", "optim", "__version__"]
