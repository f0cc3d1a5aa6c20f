"""Functional forms of danlu's kernels, with autograd."""

from danlu._batch_norm import batch_norm_act
from danlu._dropout import drop_path, dropout, dropout1d, dropout2d, dropout3d, dropout_add


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm on danlu's kernels: the same signature, semantics and errors, with
    danlu's statistics (blocked, merged in float64: accurate at any count, the same bits every run). For the
    fused activation and residual add, see batch_norm_act."""
    return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps)


__all__ = ["batch_norm", "batch_norm_act", "drop_path", "dropout", "dropout1d", "dropout2d", "dropout3d",
           "dropout_add"]
