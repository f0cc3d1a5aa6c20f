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


def config() -> dict:
    """What this danlu is and can do here: the build (danlu._C.build_info(): version, commit, compiler, CPU
    kernel variants, CUDA version and architectures, sanitizers), the CPU variant in use, whether CUDA kernels
    can run and on how many GPUs, and the torch beside it."""
    return {**_C.build_info(), "cpu_isa_in_use": _C.cpu_isa(), "cuda_available": cuda_available(),
            "cuda_devices": _C.cuda_device_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}


def show_config() -> None:
    """Prints config(), one item a line: what to paste into a bug report."""
    for key, value in config().items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"{key:>16}: {value}")


__all__ = ["config", "cuda_available", "functional", "nn", "optim", "show_config", "__version__"]
