"""The ``"numba"`` backend: our CPU kernels for float32/float64 tensors in any dense layout.

Files show the seams:

* :mod:`.backend` — :class:`NumbaBackend`, the protocol (:mod:`batchnorm.kernels.backend`) on top of the
  kernels, with the fork/thread guards of :mod:`batchnorm.kernels.safety`, and :func:`warm_up`, which
  compiles (or loads from numba's on-disk cache) the kernels a program needs;
* :mod:`batchnorm.kernels.cpu` — the njit loops (reduce, apply, backward, per-feature constants,
  the running update), the plans/views that map any dense layout onto ``(A, C)`` / ``(A, C, B)``
  arrays, and plain batch norm's one-call sequences;
* :mod:`batchnorm.kernels.ops` — the same kernels registered as ``torch.library`` custom ops for
  ``torch.compile`` / ``torch.export`` (the one place where settings are unpacked into primitives).

Importing this package imports numba (about half a second); :mod:`batchnorm.kernels.dispatch` does it
lazily, in a background thread, so the first call of a program never waits for it.
"""

from .backend import NUMBA, NumbaBackend, warm_up

__all__ = ["NUMBA", "NumbaBackend", "warm_up"]
