"""BatchNorm modules: torch's classes (same constructor, buffers and state_dict) with danlu's forward."""

import torch

from danlu._batch_norm import ACTIVATIONS, batch_norm_act


class _DanluBatchNorm:
    """forward() of torch's _BatchNorm, word for word in its decisions, on danlu's kernels."""

    activation = "identity"
    act_param = None

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm_act(input, self.running_mean if track else None, self.running_var if track else None,
                              self.weight, self.bias, use_batch_stats, factor, self.eps, self.activation,
                              self.act_param, residual)


class BatchNorm1d(_DanluBatchNorm, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_DanluBatchNorm, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_DanluBatchNorm, torch.nn.BatchNorm3d):
    pass


class _Act:
    """BatchNorm followed by an activation, with an optional residual added before it, in one pass:
    ``forward(x, residual=None) = act(bn(x) + residual)``. Same state_dict as the plain BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, activation="relu", negative_slope=0.01, alpha=1.0, *, bias=True):
        extra = {} if bias else {"bias": False}  # torch's BatchNorm takes `bias` since 2.6
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **extra)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.act_param = {"leaky_relu": negative_slope, "elu": alpha}.get(activation)

    def extra_repr(self):
        param = f", act_param={self.act_param}" if self.act_param is not None else ""
        return f"{super().extra_repr()}, activation={self.activation}{param}"


class BatchNormAct1d(_Act, BatchNorm1d):
    pass


class BatchNormAct2d(_Act, BatchNorm2d):
    pass


class BatchNormAct3d(_Act, BatchNorm3d):
    pass
