"""Dropout modules on Philox masks: torch's classes (same constructor, attributes and checks) with danlu's
forward, plus DropPath (stochastic depth) and DropConnect (dropout on a Linear's weights)."""

import torch

from danlu import _dropout
from danlu._dropout import probability


def _doc(torch_name: str, what: str) -> str:
    """The docstring of a dropout module: what it drops, then what differs from torch's class."""
    return f"""A drop-in ``torch.nn.{torch_name}`` (same constructor, attributes and checks) on counter-based masks.
    {what} are dropped with probability ``p``; kept ones are exactly ``x / (1 - p)`` (one rounding).

    What differs: masks come from Philox4x32-10 keyed by (seed, element index), the seed drawn from torch's default
    CPU generator, so ``torch.manual_seed`` reproduces a run and gives the same mask on the CPU (every ISA and
    thread count) and on every GPU; the backward keeps a 1-bit mask (numel / 8 bytes); ``p`` may be a 0-d tensor.
    For a generator of your own or a fused residual add, use ``danlu.functional.dropout`` / ``dropout_add``.
    """


class Dropout(torch.nn.Dropout):
    __doc__ = _doc("Dropout", "Elements")

    def forward(self, input):
        return _dropout.dropout(input, self.p, self.training, self.inplace)


class Dropout1d(torch.nn.Dropout1d):
    __doc__ = _doc("Dropout1d", "Whole channels of (N, C, L) or (C, L) inputs")

    def forward(self, input):
        return _dropout.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    __doc__ = _doc("Dropout2d", "Whole channels of (N, C, H, W) inputs (3-D ones read as (N, C, L), as torch does)")

    def forward(self, input):
        return _dropout.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(torch.nn.Dropout3d):
    __doc__ = _doc("Dropout3d", "Whole channels of (N, C, D, H, W) or (C, D, H, W) inputs")

    def forward(self, input):
        return _dropout.dropout3d(input, self.p, self.training, self.inplace)


class DropPath(torch.nn.Module):
    """Stochastic depth with timm's semantics: in training each sample of the batch is dropped whole with
    probability p, and kept ones are scaled by 1 / (1 - p) when scale_by_keep; identity in eval."""

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        probability(p, "drop_path")  # (validated here, read again at every forward, as torch.nn.Dropout does)
        self.p, self.scale_by_keep = p, scale_by_keep

    @property
    def drop_prob(self) -> float:  # timm's name for p
        return self.p

    def forward(self, x):
        return _dropout.drop_path(x, self.p, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"p={self.p}, scale_by_keep={self.scale_by_keep}"


class DropConnect(torch.nn.Linear):
    """nn.Linear whose weight gets a fresh Bernoulli mask every training forward (kept weights scaled by
    1 / (1 - p)); the full weight in eval. The bias is not dropped. Same parameters and state_dict as
    nn.Linear, so a Linear checkpoint loads as it is."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5, device=None,
                 dtype=None):
        probability(p, "DropConnect")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.p = p

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, p: float = 0.5) -> "DropConnect":
        """A DropConnect that shares linear's weight and bias."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, p, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, input):
        weight = _dropout.dropout(self.weight, self.p, self.training)
        return torch.nn.functional.linear(input, weight, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, p={self.p}"
