"""batchnorm: batch normalization done completely, on PyTorch.

Reduce → combine → apply: :mod:`batchnorm.functional` holds the math, :mod:`batchnorm.kernels`
the reduce/apply kernels, :mod:`batchnorm.layers` the modules, :mod:`batchnorm.reference` the
NumPy oracle.
"""

from . import diagnostics, functional, reference
from .functional import batch_norm, batch_stats
from .layers import (
    AffineOnly,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    ProcessGroupMismatchError,
    Standardizer,
    SyncBatchNorm,
)
from .tools import (
    FoldRecord,
    FuseRecord,
    adapt,
    convert,
    fold,
    freeze,
    prediction_time_bn,
    recalibrate,
    unfreeze,
)

__version__ = "0.2.0"

__all__ = [
    "AffineOnly",
    "BatchRenorm",
    "GhostBatchNorm",
    "ProcessGroupMismatchError",
    "Standardizer",
    "SyncBatchNorm",
    "FoldRecord",
    "FuseRecord",
    "adapt",
    "convert",
    "fold",
    "freeze",
    "prediction_time_bn",
    "recalibrate",
    "unfreeze",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "batch_norm",
    "batch_stats",
    "diagnostics",
    "functional",
    "reference",
]
