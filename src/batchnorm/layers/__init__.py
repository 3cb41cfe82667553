"""Layers: parameters, buffers and the choice of statistics; the math is in batchnorm.functional."""

from .affine import AffineOnly
from .base import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm
from .ghost import GhostBatchNorm
from .renorm import BatchRenorm
from .standardizer import Standardizer
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm",
    "AffineOnly", "BatchRenorm", "GhostBatchNorm", "Standardizer", "SyncBatchNorm",
]
