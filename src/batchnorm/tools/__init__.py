"""Model tools: fold BN into neighbouring layers, recalibrate running statistics (precise BN),
convert between BN classes, freeze and unfreeze. Each returns a new model, except
:func:`recalibrate`, which updates running statistics in place."""

from .convert import bn_axis, convert, freeze, is_bn_like, unfreeze
from .fold import FoldRecord, fold
from .fuse import FuseRecord
from .recalibrate import RecalibrationReport, recalibrate

__all__ = [
    "FoldRecord",
    "FuseRecord",
    "RecalibrationReport",
    "bn_axis",
    "convert",
    "fold",
    "freeze",
    "is_bn_like",
    "recalibrate",
    "unfreeze",
]
