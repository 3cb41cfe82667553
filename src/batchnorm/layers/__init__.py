"""Layers: parameters, buffers and the choice of statistics; the math is in batchnorm.functional."""

from . import interop
from .affine import AffineOnly
from .base import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm
from .ghost import GhostBatchNorm
from .renorm import BatchRenorm
from .standardizer import Standardizer
from .sync import ProcessGroupMismatchError, SyncBatchNorm

interop.install()  # torch's convert_sync_batchnorm / fuse_*_bn_eval / fuse_modules: exact for ours (docs/ecosystem.md)

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm",
    "AffineOnly", "BatchRenorm", "GhostBatchNorm", "Standardizer", "SyncBatchNorm", "ProcessGroupMismatchError",
]
