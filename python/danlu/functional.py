"""Functional forms of danlu's kernels, with autograd."""

from danlu._batch_norm import batch_norm_act


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm on danlu's kernels (same signature and semantics)."""
    return batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps)


__all__ = ["batch_norm", "batch_norm_act"]
