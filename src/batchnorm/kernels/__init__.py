"""Reduce and apply kernels: a device-agnostic torch path and (where available) fast CPU paths."""

from .dispatch import select

__all__ = ["select"]
