"""Layers: parameters, buffers and the choice of statistics; the math is in batchnorm.functional."""

from .base import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm"]
