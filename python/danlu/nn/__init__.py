"""Drop-in torch.nn modules on danlu's kernels."""

from danlu.nn.batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)
from danlu.nn.dropout import DropConnect, Dropout, Dropout1d, Dropout2d, Dropout3d, DropPath
from danlu.nn.sync_batch_norm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "DropConnect", "DropPath", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "SyncBatchNorm"]
