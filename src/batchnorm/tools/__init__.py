"""Model tools: fold BN into neighbouring layers, recalibrate running statistics (precise BN),
adapt them to shifted test data (and prediction-time BN), convert between BN classes, freeze and
unfreeze. Each returns a new model, except :func:`recalibrate` and :func:`adapt`, which update running
statistics in place."""

from .adapt import AdaptRecord, AdaptReport, adapt, prediction_time_bn
from .convert import bn_axis, bn_kind, convert, freeze, is_bn_like, unfreeze
from .fold import FoldRecord, fold
from .fuse import FuseRecord
from .recalibrate import RecalibrationReport, recalibrate

__all__ = [
    "AdaptRecord",
    "AdaptReport",
    "FoldRecord",
    "FuseRecord",
    "RecalibrationReport",
    "adapt",
    "bn_axis",
    "bn_kind",
    "convert",
    "fold",
    "freeze",
    "is_bn_like",
    "prediction_time_bn",
    "recalibrate",
    "unfreeze",
]
