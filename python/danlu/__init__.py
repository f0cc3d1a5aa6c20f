"""danlu: fused training kernels for PyTorch (optimizers, BatchNorm, dropout) on CPU and CUDA."""

from danlu import _C
from danlu import optim

__version__ = "0.1.0"


def cuda_available() -> bool:
    """Whether danlu's CUDA kernels can run here: built with CUDA, and a driver and a GPU are present."""
    return bool(_C.built_with_cuda) and _C.cuda_device_count() > 0


__all__ = ["cuda_available", "optim", "__version__"]
