import torch

from danlu import _C
from danlu.optim._base import FusedOptimizer, fused_doc


class Adam(FusedOptimizer, torch.optim.Adam):
    __doc__ = fused_doc("Adam", "Adam with every option of torch's: amsgrad, maximize, weight decay (L2 or "
                        "decoupled), tensor lr.")

    _kind = _C.optim_kinds["Adam"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        self._reject_differentiable(differentiable)
        extra = {"decoupled_weight_decay": True} if decoupled_weight_decay else {}
        torch.optim.Adam.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                                  maximize=maximize, capturable=capturable, fused=fused, **extra)

    def _decoupled(self, group):
        return bool(group.get("decoupled_weight_decay", False))

    def _state_names(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]), "amsgrad": bool(group["amsgrad"]),
                "maximize": bool(group["maximize"]), "decoupled_weight_decay": self._decoupled(group)}


class AdamW(Adam, torch.optim.AdamW):
    __doc__ = fused_doc("AdamW", "AdamW: Adam with decoupled weight decay, every option of torch's.")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        self._reject_differentiable(differentiable)
        torch.optim.AdamW.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                                   foreach=foreach, capturable=capturable, fused=fused)

    def _decoupled(self, group):
        return True
