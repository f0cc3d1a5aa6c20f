import torch

from danlu import _C
from danlu.optim._base import FusedOptimizer, fused_doc
from danlu.optim._table import FIRST_STEP


class SGD(FusedOptimizer, torch.optim.SGD):
    __doc__ = fused_doc("SGD", "SGD with momentum, dampening, Nesterov, weight decay and maximize.")

    _kind = _C.optim_kinds["SGD"]
    _counts_steps = False  # torch's SGD keeps no step
    _optional_state = ("momentum_buffer",)  # torch starts a missing buffer from the grad

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        self._reject_differentiable(differentiable)
        torch.optim.SGD.__init__(self, params, lr, momentum, dampening, weight_decay, nesterov,
                                 maximize=maximize, foreach=foreach, fused=fused)

    def _state_names(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None)

    def _fresh_flags(self, group):
        # torch starts the buffer as a copy of the first grad; the kernel makes that copy when the step runs.
        return FIRST_STEP if group["momentum"] != 0 else 0

    def _hyper(self, group):
        return {"momentum": float(group["momentum"]), "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"]), "nesterov": bool(group["nesterov"]),
                "maximize": bool(group["maximize"])}
