"""Optional peers: implementations from other libraries that do the same work as a danlu kernel, timed
beside it when they are installed and skipped with a note when they are not.

  deepspeed   DeepSpeedCPUAdam (Adam and AdamW) and DeepSpeedCPUAdagrad: CPU only; its C++ op is built
              with ninja at first use (minutes), which ``prepare_deepspeed`` does before any timing.
  timm        timm.layers.BatchNormAct2d: torch's batch_norm followed by an activation module (ReLU in
              place by default). timm imports torchvision at import time, so it needs a torchvision built
              for the installed torch.

Neither is a dependency of danlu or of the harness: ``pip install --no-deps deepspeed timm`` beside the
installed torch (never let pip replace torch).
"""

from __future__ import annotations

import functools
import os

import torch

from benchmarks.harness import Unavailable

DEEPSPEED_OPTIMIZERS = {"Adam": "DeepSpeedCPUAdam", "AdamW": "DeepSpeedCPUAdam", "Adagrad": "DeepSpeedCPUAdagrad"}


@functools.cache
def _deepspeed_classes() -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips its accelerator probing and the warning it prints
    try:
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as why:  # not installed, or one of its imports fails
        return {"error": f"deepspeed is not importable ({type(why).__name__}: {why})"}
    return {"DeepSpeedCPUAdam": DeepSpeedCPUAdam, "DeepSpeedCPUAdagrad": DeepSpeedCPUAdagrad}


def deepspeed_optimizer(torch_name: str, device: torch.device):
    """The DeepSpeed CPU optimizer class that does torch.optim.<torch_name>'s step, or Unavailable."""
    if torch_name not in DEEPSPEED_OPTIMIZERS:
        raise Unavailable(f"DeepSpeed has no CPU {torch_name}")
    if device.type != "cpu":
        raise Unavailable("DeepSpeed's CPU optimizers run on the CPU only")
    classes = _deepspeed_classes()
    if "error" in classes:
        raise Unavailable(classes["error"])
    return classes[DEEPSPEED_OPTIMIZERS[torch_name]]


def prepare_deepspeed(names: set[str], log) -> None:
    """Makes one of each DeepSpeed optimizer the run needs, which loads its op (and at first use builds
    it), so that no build lands in a timing."""
    classes = _deepspeed_classes()
    for name in sorted(names & classes.keys()):
        log(f"loading {name}'s op (DeepSpeed builds it with ninja at first use: minutes)")
        try:
            classes[name]([torch.zeros(1, requires_grad=True)])
        except Exception as why:
            classes.clear()
            classes["error"] = f"{name}'s op does not build or load ({type(why).__name__}: {why})"
            return


@functools.cache
def _timm_batch_norm_act():
    try:
        from timm.layers import BatchNormAct2d
    except Exception as why:
        return f"timm is not importable ({type(why).__name__}: {why})"
    return BatchNormAct2d


def timm_batch_norm_act():
    """timm.layers.BatchNormAct2d, or Unavailable."""
    found = _timm_batch_norm_act()
    if isinstance(found, str):
        raise Unavailable(found)
    return found
