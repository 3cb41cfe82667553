"""The ``"triton"`` backend: batch norm's reduce/apply and fused sequences as Triton kernels (CUDA GPUs).

Files:

* :mod:`.kernels` — the ``@triton.jit`` kernels (imported only when a kernel first runs: ``import batchnorm``
  never imports triton);
* :mod:`.backend` — :class:`TritonBackend`, the protocol of :mod:`batchnorm.kernels.backend` on top of them,
  and the launch counter :func:`launch_count`;
* :mod:`.compile` — ahead-of-time compilation of every specialization for given GPU architectures, with
  registers, spills and shared memory per kernel: ``python -m batchnorm.kernels.triton compile --arch sm_80 sm_90``.

Without a GPU, ``TRITON_INTERPRET=1`` (in the environment before triton is imported) runs the kernels on CPU
tensors in Triton's interpreter; forced with ``backend="triton"`` or ``BATCHNORM_BACKEND=triton``.

Shape: as :mod:`batchnorm.kernels.backend`.

Example::

    >>> from batchnorm.kernels.triton import TRITON, available
    >>> TRITON.name
    'triton'
    >>> available() in (True, False)
    True

Reference: docs/gpu.md.
"""

from .backend import TRITON, TritonBackend, available, interpreting, launch_count

__all__ = ["TRITON", "TritonBackend", "available", "interpreting", "launch_count"]
