import torch

from danlu import _C
from danlu.optim._base import FusedOptimizer, fused_doc


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    __doc__ = fused_doc("RMSprop", "RMSprop with momentum, centered, weight decay and maximize (torch has no "
                        "fused RMSprop: this is one kernel where torch runs one per op).")

    _kind = _C.optim_kinds["RMSprop"]

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        self._reject_differentiable(differentiable)
        torch.optim.RMSprop.__init__(self, params, lr, alpha, eps, weight_decay, momentum, centered,
                                     capturable=capturable, foreach=foreach, maximize=maximize)

    def _state_names(self, group):
        return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    def _hyper(self, group):
        return {"alpha": float(group["alpha"]), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]), "momentum": float(group["momentum"]),
                "centered": bool(group["centered"]), "maximize": bool(group["maximize"])}
