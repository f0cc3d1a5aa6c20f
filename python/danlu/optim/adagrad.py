import torch

from danlu import _C
from danlu.optim._base import FusedOptimizer, fused_doc


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    __doc__ = fused_doc("Adagrad", "Adagrad with lr_decay, weight decay, initial accumulator and maximize. "
                        "Dense grads only: a sparse grad raises RuntimeError.")

    _kind = _C.optim_kinds["Adagrad"]

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None):
        self._reject_differentiable(differentiable)
        torch.optim.Adagrad.__init__(self, params, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
                                     foreach, maximize=maximize, fused=fused)

    def _state_names(self, group):
        return ("sum", None, None)

    def _init_state(self, p, group):
        # torch's Adagrad fills this in its constructor; for params added later it takes the value from
        # the optimizer's defaults, not from the new group, and so do we.
        value = self.defaults["initial_accumulator_value"]
        state = self.state[p]
        if state.get("sum") is None:
            state["sum"] = torch.full_like(p, complex(value, value) if p.is_complex() else value,
                                           memory_format=torch.preserve_format)
        super()._init_state(p, group)

    def _hyper(self, group):
        return {"lr_decay": float(group["lr_decay"]), "weight_decay": float(group["weight_decay"]),
                "eps": float(group["eps"]), "maximize": bool(group["maximize"])}
