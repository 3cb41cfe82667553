"""Which backend runs a call: :func:`select` is the one place that decides.

Backends (protocol: :mod:`batchnorm.kernels.backend`):

* ``"numba"`` (:mod:`batchnorm.kernels.numba`) — our CPU kernels: float32/float64, any dense layout,
  masks, ghost groups, every combine, fused activations, ``memory="save"``;
* ``"composite"`` (:mod:`batchnorm.kernels.composite`; alias ``"torch"``) — plain torch ops, anything;
* ``"native"`` (:mod:`batchnorm.kernels.native`) — ATen's batch norm (CPU kernel, cuDNN, MIOpen):
  plain batch norm only (no mask, no ghost groups, plain combine, ``memory="default"``), feature axis
  1 or the last axis of a contiguous tensor, parameters in ATen's dtype rule.

Rule of ``"auto"`` (the default), per call:

1. not on the CPU (:func:`device_type`; CUDA, MPS, XPU, meta ...), the *GPU route*: plain batch norm without
   a fused activation goes to native (cuDNN / MIOpen) unless :data:`GPU_PLAIN` names triton for this GPU
   model (the hook for a measured choice); every variant (mask, ghost groups, renorm and sync combines,
   ``memory="save"`` in training, a fused activation) goes to triton where it can serve the call; otherwise
   native if it can, else composite (:func:`_gpu_select`). ``memory="save"`` in eval is plain eval;
2. on the CPU: among the backends that can serve the call, the cheapest by the cost model below.
   The numba kernels cost about a fixed overhead plus bandwidth; ATen's CPU kernel costs less per
   call but more per byte. So: native below :data:`CROSSOVER_BYTES` (bytes of ``x``, per
   ``(mode, layout)``), numba at or above it; calls native cannot serve (masks, ghost groups, renorm
   and sync combines, ``memory="save"``, other feature axes) go to numba, or to composite where numba
   cannot take the tensor (half precision, odd strides);
3. **no cold start**: until the numba kernels are compiled (or loaded from numba's disk cache) the
   numba backend is not a candidate; the first call starts the warm-up (:mod:`batchnorm.kernels.warmup`:
   by default one low-priority child process per cache directory compiles the kernels into numba's
   disk cache, then a background thread of this process loads them; :func:`warm_up_status`,
   :func:`wait_ready`). Meanwhile plain calls run native and the others composite; numba takes over
   once ready;
4. a process forked where numba's parallel kernels are unsafe (:func:`batchnorm.kernels.safety.numba_usable`)
   never selects numba; under ``torch.compile`` native is not a candidate for training calls
   (its non-finite guard reads values), so compiled graphs see the numba custom ops or torch ops.

Forcing: the ``backend=`` argument of layers/functions, or the ``BATCHNORM_BACKEND`` environment
variable (the argument wins), ``"numba" | "composite" | "torch" | "native" | "triton" | "auto"``. A forced
backend that cannot serve a call falls back to composite (which serves everything), silently — the
forced name says "this one when possible", as before. A forced ``"numba"`` compiles synchronously
(no background warm-up).

The cost table (:data:`CROSSOVER_BYTES`) has one row per ``(mode, layout)``: ``mode`` is ``"train"``
(training step: forward + backward) or ``"eval"`` (forward without autograd); ``layout`` is
``"inner"`` when the feature axis is innermost in memory (``(N, C)``, ``axis=-1``: ``x.stride(axis) == 1``),
``"cl"`` for the same with the feature axis at 1 of a 3-D or larger tensor (channels-last ``(N, C, H, W)``
and ``(N, C, D, H, W)``, ATen's channels-last kernel), ``"short"`` for features outer in memory with rows of fewer
than :data:`SHORT_ROWS` values (NCHW maps of 5×5 and smaller) and ``"outer"`` otherwise (NCHW). The value is the size of ``x`` in bytes at
which numba becomes cheaper than native. The values below are the fallback, measured on the development
machine; in the default warm-up mode the crossovers are measured on the machine that runs them, at its
thread counts, once, in a low-priority background process, stored beside numba's cache and adopted in
place (:mod:`batchnorm.kernels.calibrate`; :func:`batchnorm.kernels.warmup.table_version` then changes,
and with it :func:`decision_state`). ``batchnorm bench --calibrate`` re-measures them on demand.

Shape: not applicable (decides per tensor).

Example::

    >>> import torch
    >>> from batchnorm.kernels import dispatch
    >>> from batchnorm.kernels.backend import Settings
    >>> dispatch.select(torch.randn(8, 16), Settings(axis=1)).name    # small plain call: ATen
    'native'
    >>> dispatch.select(torch.randn(8, 16), Settings(axis=1), backend="torch").name
    'composite'
"""

from __future__ import annotations

import math
import os

import torch

# safety is imported here, not with the numba backend: its fork hook must be registered before any fork, also
# when this process never ran a numba kernel (safety never imports numba itself)
from . import safety as _safety
from . import warmup as _warmup
from .backend import Backend, Settings
from .composite import COMPOSITE
from .native import NATIVE, params_ok, viewable
from .triton import TRITON
from .triton import available as _triton_available

BACKENDS = ("auto", "numba", "composite", "native", "torch", "triton")
_ALIASES = {"torch": "composite"}

#: The fallback table (until crossovers measured on this machine are adopted: kernels/calibrate.py). It holds the
#: table in use: kernels/warmup.py updates it in place. Measured with ``batchnorm bench --calibrate`` on the 2-core
#: development VM, 2026-12-02 (torch 2.13.0+cpu,
#: 2 threads, OMP_WAIT_POLICY=PASSIVE; benchmarks/calibration-2026-12-02.json): forced native vs forced numba,
#: training steps and eval forwards on a 4 KB-64 MB ladder, medians smoothed over neighbouring sizes. The machine
#: was busy (load 7-13), so treat each value as within a factor of 2.
#: (Eval, outer: ATen's eval is one fused pass, and numba's eval forward only won from 32 MB up in that run.)
#: Train, outer moved from 512 KB to 768 KB after a side-by-side check on 2026-12-02 05:18 (load ~1, 2 threads,
#: 15 alternating rounds): (32, 64, 8, 8) = 512 KB native 1.00x torch, numba 1.28x; (64, 64, 8, 8) = 1 MB native
#: 1.03x, numba 0.77x — the crossover lies between, and 512 KB itself is an issue-11 target row.
#: Channels-last ("cl", its own class since 2026-12-04): in five sweeps on the development VM (2026-12-02 to
#: 2026-12-04, 1 and 2 threads) numba lost to ATen's channels-last kernel at 2-12 MB, by 1.04-1.57x, on shapes
#: where a dense (N, C) input of the same bytes went to numba with a gain, and won from 49 MB (0.34-0.60x).
#: Short rows ("short", since 2026-12-06): NCHW with maps of 2x2 to 5x5, where numba's per-row loop gains least;
#: at 1 thread on the development VM numba lost at 0.5-2.2 MB ((32, 256, 4, 4) 1.25x, (64, 256, 4, 4) 1.14x,
#: (128, 512, 3, 3) 1.08-1.12x) under an "outer" crossover of 512 KB measured on rows of 64, and won from 4 MB.
CROSSOVER_BYTES: dict[tuple[str, str], int] = {
    ("train", "inner"): 2 << 20,
    ("train", "outer"): 768 << 10,
    ("train", "short"): 4 << 20,
    ("train", "cl"): 32 << 20,
    ("eval", "inner"): 2 << 20,
    ("eval", "outer"): 32 << 20,
    ("eval", "short"): 32 << 20,
    ("eval", "cl"): 32 << 20,
}
#: rows (values per feature and sample, the product of the dims after the feature axis) shorter than this make a
#: features-outer tensor "short" in the cost table
SHORT_ROWS = 32
FALLBACK_CROSSOVER_BYTES = dict(CROSSOVER_BYTES)  # the built-in values, unchanged when measured ones are adopted

_HAS_NUMBA = _warmup.HAS_NUMBA
WARMUP_MODES = _warmup.WARMUP_MODES
warm_up_status = _warmup.warm_up_status
wait_ready = _warmup.wait_ready


def available() -> list[str]:
    """The backends that can run here (the tests run every one of them)."""
    # triton: installed, and a CUDA device or its CPU interpreter (TRITON_INTERPRET=1) can run the kernels
    return (["numba"] if _HAS_NUMBA else []) + ["composite", "native"] + (["triton"] if _triton_available() else [])


def device_type(x: torch.Tensor) -> str:
    """``x``'s device type: the one device check of the package. Every device-dependent branch asks it (:func:`select`,
    the native backend's CPU/GPU calls, the non-finite guard and its warning, the mask-count checks, memory="save"),
    so tests that patch it to answer ``"cuda"`` run CPU tensors through the GPU route."""
    return x.device.type


def layout(x: torch.Tensor, axis: int) -> str:
    """The cost table's layout class of ``x``: ``"cl"`` when the feature axis is 1 of a 3-D or larger tensor and
    innermost in memory (channels-last), ``"inner"`` when it is innermost otherwise (``(N, C)``, ``axis=-1``),
    else ``"short"`` when its rows (the dims after the feature axis) hold fewer than :data:`SHORT_ROWS` values and
    ``"outer"`` for longer ones. Example: ``layout(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last),
    1)`` is ``"cl"``, ``layout(torch.zeros(2, 3, 4, 4), 1)`` is ``"short"``, ``layout(torch.zeros(2, 3, 8, 8), 1)``
    is ``"outer"``."""
    if x.stride(axis) == 1 or x.shape[axis] == x.numel():
        return "cl" if axis == 1 and x.dim() > 2 and x.shape[axis] != x.numel() else "inner"
    return "short" if math.prod(x.shape[axis + 1:]) < SHORT_ROWS else "outer"


def _canonical(backend: str | None) -> str:
    choice = backend or os.environ.get("BATCHNORM_BACKEND") or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS}, got {choice!r}. Pass backend='auto' (default: the cheapest backend "
            "per call), 'numba', 'native', 'triton' or 'composite' ('torch' is an alias), as an argument or through the "
            "BATCHNORM_BACKEND environment variable."
        )
    return _ALIASES.get(choice, choice)


def _numba_for(x: torch.Tensor, forced: bool) -> Backend | None:
    """The numba backend if it can take ``x`` now (auto: only once warm), else None (:mod:`.warmup`)."""
    return _warmup.numba_for(x, forced)


def select(
    x: torch.Tensor,
    s: Settings | None = None,
    *,
    plain: bool = True,
    masked: bool = False,
    training: bool = True,
    backend: str | None = None,
    params: tuple = (),
) -> Backend:
    """The backend that runs this call (see the module docstring for the rule and the cost table).

    ``s``: the call's settings (None: reduce/apply only, e.g. :func:`batchnorm.batch_stats`); ``plain``:
    the plain combine; ``masked``: a mask is given; ``training``: batch statistics (else the running ones);
    ``backend``: forced name or None (``BATCHNORM_BACKEND``, then ``"auto"``); ``params``: weight, bias and
    running buffers (native follows ATen's dtype rule for them).
    """
    choice = _canonical(backend)
    if choice == "composite":
        return COMPOSITE
    native_ok = (  # memory="save" changes only what a training step keeps: eval is plain eval
        s is not None and plain and not masked and s.group_size is None and not (s.save and training)
        and x.numel() > 0 and viewable(x, s.axis) and params_ok(x, *params)
        and not (training and torch.compiler.is_compiling())
        and not (training and _half_count_too_large(x, s))
    )
    if choice == "native":
        return NATIVE if native_ok else COMPOSITE
    if choice == "triton":  # CUDA tensors (CPU ones under TRITON_INTERPRET=1); not inside a torch.compile graph
        tr = _triton_for(x, s)
        return tr if tr is not None else COMPOSITE
    on_cpu = device_type(x) == "cpu"
    if choice == "numba":
        nb = _numba_for(x, True) if on_cpu else None
        return nb if nb is not None else COMPOSITE
    if not on_cpu:
        return _gpu_select(x, s, native_ok)
    nb = _numba_for(x, False)
    if native_ok and (nb is None or _bytes(x) < CROSSOVER_BYTES[("train" if training else "eval", layout(x, s.axis))]):
        return NATIVE
    return nb if nb is not None else COMPOSITE


#: The plain-BN backend per GPU model (``torch.cuda.get_device_name``, e.g. ``"NVIDIA H100 80GB HBM3"``): ``"native"``
#: (cuDNN, the default for a GPU not listed) or ``"triton"``. The hook for a measured choice: ``batchnorm bench
#: --device cuda`` times both on the GPU at hand; put the faster one here with :func:`set_gpu_plain` (or edit this
#: table with the figures). Variants never consult it: they go to triton wherever it can serve them.
GPU_PLAIN: dict[str, str] = {}


def set_gpu_plain(device_name: str, backend: str) -> None:
    """Choose the plain-BN backend of one GPU model (``"native"`` or ``"triton"``), e.g. from a bench measurement.

    Example: ``set_gpu_plain(torch.cuda.get_device_name(), "triton")``. Shape: not applicable.
    """
    if backend not in ("native", "triton"):
        raise ValueError(f"set_gpu_plain expected backend 'native' or 'triton', got {backend!r}.")
    GPU_PLAIN[device_name] = backend


_names: dict = {}


def device_name(x: torch.Tensor) -> str:
    """The key of :data:`GPU_PLAIN` for ``x``'s device: the CUDA device's name (cached per index), else the type."""
    dev = x.device
    key = (dev.type, dev.index)
    name = _names.get(key)
    if name is None:
        name = dev.type
        if dev.type == "cuda":
            try:
                name = torch.cuda.get_device_name(dev)
            except Exception:  # noqa: BLE001 - no name, no measured choice: the default applies
                name = "cuda"
        _names[key] = name
    return name


def _triton_for(x: torch.Tensor, s: Settings | None) -> Backend | None:
    """The triton backend when it can serve this call (a CUDA tensor; the interpreter's CPU ones), outside compile."""
    return TRITON if not torch.compiler.is_compiling() and TRITON.supports(x, s) else None


def may_take_triton(x: torch.Tensor, backend: str | None) -> bool:
    """False when :func:`select` cannot answer triton for ``x``: a CPU tensor (:func:`device_type`) without
    ``"triton"`` forced by ``backend`` or ``BATCHNORM_BACKEND``. A cheap test for a layer's triton-only route.

    Shape: not applicable. Example: ``may_take_triton(torch.zeros(2, 3), None)`` is False (unless the variable
    forces triton)."""
    if device_type(x) != "cpu":
        return True
    choice = backend if backend is not None else _forced_env()
    return choice == "triton" or choice == b"triton"


def _gpu_select(x: torch.Tensor, s: Settings | None, native_ok: bool) -> Backend:
    """The automatic rule off the CPU (one decision per call; the layer's CPU fast path never reaches it).

    Plain batch norm without a fused activation: native (cuDNN / MIOpen; :data:`GPU_PLAIN` may name triton for a
    GPU where it was measured faster). Everything else — masks, ghost groups, the renorm and sync combines,
    ``memory="save"``, a fused activation (native would run it as a second pass over the output): triton where
    :meth:`~batchnorm.kernels.triton.TritonBackend.supports` the call; else native if it can serve it (the
    activation as a second op), else composite.
    """
    if native_ok and (s.activation is None or s.activation == "identity") and \
            GPU_PLAIN.get(device_name(x), "native") != "triton":
        return NATIVE
    tr = _triton_for(x, s)
    if tr is not None:
        return tr
    return NATIVE if native_ok else COMPOSITE


_HALF = (torch.float16, torch.bfloat16)


def _half_count_too_large(x: torch.Tensor, s: Settings) -> bool:
    """True for a float16/bfloat16 CPU batch with more than 2**24 values per feature.

    Why: ATen's CPU batch norm counts such inputs in float32, which stops counting at 2**24: for float16 input
    ``(1, 1, 4097, 4097)`` of mean 50 its batch mean is 0.65 off and the output 0.55 off (measured, torch 2.13).
    Those calls go to the numba or composite backends, which accumulate correctly at any count.
    """
    if x.dtype not in _HALF or device_type(x) != "cpu":
        return False
    c = x.shape[s.axis] if x.dim() > s.axis else 1
    return x.numel() // max(c, 1) > 1 << 24


def _env_reader():
    """A cheap read of ``BATCHNORM_BACKEND`` (``os.environ.get`` costs ~1 µs; its backing dict ~20 ns)."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and encode is not None:
        key = encode("BATCHNORM_BACKEND")
        return lambda: data.get(key)
    return lambda: os.environ.get("BATCHNORM_BACKEND")


_forced_env = _env_reader()


def decision_state() -> tuple:
    """What :func:`select` reads besides its arguments; a cached choice stays valid while this tuple is equal.

    The forced-backend variable, the numba warm-up status, the version of the cost table
    (:func:`batchnorm.kernels.warmup.table_version`: it changes when crossovers measured on this machine replace
    the built-in ones), :func:`batchnorm.kernels.safety.numba_usable`, and the function objects :func:`select` and
    :func:`device_type` themselves (tests and tools patch them: a patched one never matches a cache built before).
    Layers key their fast path on it (``BatchNorm.forward``); a layer keeps its choice for a shape until this
    state, its settings or its tensors change.

    Shape: not applicable. Example: ``dispatch.decision_state() == dispatch.decision_state()`` is True.
    """
    return (_forced_env(), _warmup._status, _warmup._table_version, _safety.numba_usable(), select, device_type)


def _bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def chosen(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """The name of the backend ``layer(x, mask)`` would run on now, by the rule of :func:`select`.

    Shape: ``x`` (and ``mask``) as the layer takes them. Example::

        >>> from batchnorm import BatchNorm
        >>> chosen(BatchNorm(16), torch.randn(8, 16))           # 512 B: below every crossover
        'native'
        >>> chosen(BatchNorm(16, backend="composite"), torch.randn(8, 16))
        'composite'
    """
    from .. import functional

    return functional.backend_for(layer, x, mask).name
