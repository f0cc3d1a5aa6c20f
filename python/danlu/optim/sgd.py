import torch

from danlu.optim._base import FusedOptimizer
from danlu.optim._table import FIRST_STEP

_SGD = 1  # OptimKind::Sgd


class SGD(FusedOptimizer, torch.optim.SGD):
    """torch.optim.SGD with momentum, dampening, Nesterov, weight decay and maximize, fused."""

    _kind = _SGD
    _counts_steps = False  # torch's SGD keeps no step

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        self._reject_differentiable(differentiable)
        torch.optim.SGD.__init__(self, params, lr, momentum, dampening, weight_decay, nesterov,
                                 maximize=maximize, foreach=foreach, fused=fused)

    def _state_names(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None)

    def _init_state(self, p, group):
        # torch starts the buffer as a copy of the first grad; the kernel does that copy when it runs.
        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return FIRST_STEP

    def _hyper(self, group):
        return {"momentum": float(group["momentum"]), "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"]), "nesterov": bool(group["nesterov"]),
                "maximize": bool(group["maximize"])}
