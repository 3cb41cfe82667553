"""Backends for reduce and apply (numba, composite, native) and the dispatch that picks one per call."""

from .dispatch import available, chosen, select

__all__ = ["available", "chosen", "select"]
