"""The ``"numba"`` backend: our CPU kernels for float32/float64 tensors in any dense layout.

Files show the seams:

* :mod:`.backend` — :class:`NumbaBackend`, the protocol (:mod:`batchnorm.kernels.backend`) on top of the
  kernels, with the fork/thread guards of :mod:`batchnorm.kernels.safety`, and :func:`warm_up`, which
  compiles (or loads from numba's on-disk cache) the kernels a program needs;
* :mod:`.loops` — the njit loops of reduce, apply and backward (two loop strategies, parallel segments);
* :mod:`.fused` — plain batch norm's one-call sequences and their per-feature kernels (constants, the
  running update): numba twins of rules written once in torch in :mod:`batchnorm.functional`;
* :mod:`.plans` — plans and views: any dense layout as an ``(A, C)`` / ``(A, C, B)`` array, outputs;
* :mod:`.calls` — the Python entry points (tensors in, kernels, tensors out);
* :mod:`.ops` — the same kernels registered as ``torch.library`` custom ops for ``torch.compile`` /
  ``torch.export`` (the one place where the settings record is unpacked into primitives).

Importing this package imports numba (about half a second); :mod:`batchnorm.kernels.dispatch` does it
lazily, in a background thread, so the first call of a program never waits for it.
"""

from .backend import NUMBA, NumbaBackend, warm_up

__all__ = ["NUMBA", "NumbaBackend", "warm_up"]
