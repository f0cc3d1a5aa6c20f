"""BatchNorm modules: torch's classes (same constructor, buffers and state_dict) with danlu's forward."""

import torch

from danlu._batch_norm import ACTIVATIONS, LOCAL, check_args, run_batch_norm


class _DanluBatchNorm:
    """forward() of torch's _BatchNorm, word for word in its decisions, on danlu's kernels; every argument is
    validated before num_batches_tracked counts the batch (torch counts it even when its batch_norm then raises).
    SyncBatchNorm overrides _statistics."""

    activation = "identity"
    act_param = None

    def _statistics(self):
        """How training reduces the batch statistics (danlu._batch_norm.Statistics)."""
        return LOCAL

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        training, momentum = self.training, self.momentum
        running_mean, running_var, batches = self.running_mean, self.running_var, self.num_batches_tracked
        weight, bias, activation = self.weight, self.bias, self.activation
        counts = training and self.track_running_stats and batches is not None
        if momentum is not None:
            factor = momentum
        else:  # the cumulative average over the batches counted so far, this one included
            factor = 1.0 / (float(batches) + 1.0) if counts else 0.0
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        statistics = self._statistics() if use_batch_stats else LOCAL
        input, residual, factor, eps = check_args(input, running_mean, running_var, weight, bias, use_batch_stats,
                                                  factor, self.eps, activation, residual, statistics)
        if counts:
            batches.add_(1)
        return run_batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, factor, eps,
                              activation, self.act_param, residual, statistics)


class BatchNorm1d(_DanluBatchNorm, torch.nn.BatchNorm1d):
    """A drop-in ``torch.nn.BatchNorm1d`` on danlu's kernels: the same constructor, buffers, state_dict and
    train/eval semantics (``isinstance(m, torch.nn.BatchNorm1d)`` holds; checkpoints load both ways).

    What differs: ``forward(input, residual=None)`` can add a residual after the normalisation in the same pass
    (BatchNormAct1d adds an activation); statistics are blocked and merged in a fixed tree in float64, so
    they are as accurate as float64 math up to huge counts and bitwise the same for every run, thread count,
    CPU ISA and (for the batch statistics) on CUDA; the backward keeps only the input and per-channel
    statistics; every argument is checked before ``num_batches_tracked`` counts the batch, so a call that raises
    changes nothing (torch counts first). NCHW and channels_last inputs are read in place; 16-bit inputs take
    float32 or same-dtype parameters, as torch's.
    """


class BatchNorm2d(_DanluBatchNorm, torch.nn.BatchNorm2d):
    """A drop-in ``torch.nn.BatchNorm2d`` on danlu's kernels: the same constructor, buffers, state_dict and
    train/eval semantics (``isinstance(m, torch.nn.BatchNorm2d)`` holds; checkpoints load both ways).

    What differs: ``forward(input, residual=None)`` can add a residual after the normalisation in the same pass
    (BatchNormAct2d adds an activation); statistics are blocked and merged in a fixed tree in float64, so
    they are as accurate as float64 math up to huge counts and bitwise the same for every run, thread count,
    CPU ISA and (for the batch statistics) on CUDA; the backward keeps only the input and per-channel
    statistics; every argument is checked before ``num_batches_tracked`` counts the batch, so a call that raises
    changes nothing (torch counts first). NCHW and channels_last inputs are read in place; 16-bit inputs take
    float32 or same-dtype parameters, as torch's.
    """


class BatchNorm3d(_DanluBatchNorm, torch.nn.BatchNorm3d):
    """A drop-in ``torch.nn.BatchNorm3d`` on danlu's kernels: the same constructor, buffers, state_dict and
    train/eval semantics (``isinstance(m, torch.nn.BatchNorm3d)`` holds; checkpoints load both ways).

    What differs: ``forward(input, residual=None)`` can add a residual after the normalisation in the same pass
    (BatchNormAct3d adds an activation); statistics are blocked and merged in a fixed tree in float64, so
    they are as accurate as float64 math up to huge counts and bitwise the same for every run, thread count,
    CPU ISA and (for the batch statistics) on CUDA; the backward keeps only the input and per-channel
    statistics; every argument is checked before ``num_batches_tracked`` counts the batch, so a call that raises
    changes nothing (torch counts first). NCHW and channels_last inputs are read in place; 16-bit inputs take
    float32 or same-dtype parameters, as torch's.
    """


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
    """``act(BatchNorm1d(x) + residual)`` in one pass forward and one backward: ``forward(x, residual=None)``.

    The constructor is BatchNorm1d's plus ``activation`` ("relu" by default; "leaky_relu" with
    ``negative_slope``, "elu" with ``alpha``, "silu", "sigmoid", "tanh", "identity"). The state_dict is
    BatchNorm1d's, so a BatchNorm checkpoint loads. The backward recomputes the pre-activation from the input
    and the per-channel statistics: no output, mask or pre-activation is saved. exp-based activations use
    danlu's own exp (within 2.5 ulp, the same bits on CPU and GPU), not libm's.
    """


class BatchNormAct2d(_Act, BatchNorm2d):
    """``act(BatchNorm2d(x) + residual)`` in one pass forward and one backward: ``forward(x, residual=None)``.

    The constructor is BatchNorm2d's plus ``activation`` ("relu" by default; "leaky_relu" with
    ``negative_slope``, "elu" with ``alpha``, "silu", "sigmoid", "tanh", "identity"). The state_dict is
    BatchNorm2d's, so a BatchNorm checkpoint loads. The backward recomputes the pre-activation from the input
    and the per-channel statistics: no output, mask or pre-activation is saved. exp-based activations use
    danlu's own exp (within 2.5 ulp, the same bits on CPU and GPU), not libm's.
    """


class BatchNormAct3d(_Act, BatchNorm3d):
    """``act(BatchNorm3d(x) + residual)`` in one pass forward and one backward: ``forward(x, residual=None)``.

    The constructor is BatchNorm3d's plus ``activation`` ("relu" by default; "leaky_relu" with
    ``negative_slope``, "elu" with ``alpha``, "silu", "sigmoid", "tanh", "identity"). The state_dict is
    BatchNorm3d's, so a BatchNorm checkpoint loads. The backward recomputes the pre-activation from the input
    and the per-channel statistics: no output, mask or pre-activation is saved. exp-based activations use
    danlu's own exp (within 2.5 ulp, the same bits on CPU and GPU), not libm's.
    """
