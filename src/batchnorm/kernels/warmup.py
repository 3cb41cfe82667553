"""Getting the numba kernels ready without making a call wait: the background warm-up.

:mod:`batchnorm.kernels.dispatch` asks :func:`numba_for` on each call; until the kernels are compiled (or
loaded from numba's disk cache) "auto" does not pick numba, and the first such call starts the warm-up.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch

from . import safety as _safety
from .backend import Backend

HAS_NUMBA = importlib.util.find_spec("numba") is not None
_lock = threading.Lock()
_status = "cold" if HAS_NUMBA else "absent"  # cold → warming → ready (or failed / absent)
_numba: Backend | None = None  # the numba backend object once imported
_ready = threading.Event()
_error: BaseException | None = None


def _load_numba() -> Backend:
    global _numba
    if _numba is None:
        from .numba import NUMBA

        _numba = NUMBA
    return _numba


#: How the numba kernels get compiled without blocking a call (``BATCHNORM_WARMUP``): ``"process"`` (default:
#: a child Python process compiles them into numba's disk cache, then a thread here loads them — the compiler
#: holds the GIL for long stretches, so compiling in a thread of this process would stall its calls),
#: ``"thread"`` (compile in a thread here), ``"off"`` (no warm-up: auto uses numba at once and its first
#: call compiles synchronously, the behaviour before this design; the test suite uses it).
WARMUP_MODES = ("process", "thread", "off")
_CHILD_CODE = "from batchnorm.kernels.numba import warm_up; warm_up()"
_child = None  # the compiling child process (subprocess.Popen) while it runs


def _warm(mode: str) -> None:
    global _status, _error, _child
    try:
        if mode == "process":
            import subprocess
            import sys

            _child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            _child.wait()  # compiled into the disk cache (or failed: the load below then compiles here)
            _child = None
        from .numba import warm_up

        _load_numba()
        warm_up()  # process mode: loads the cached kernels (short); thread mode: compiles them
        _status = "ready"
    except BaseException as e:  # noqa: BLE001 - reported through warm_up_status(); auto keeps the others
        _error = e
        _status = "failed"
    finally:
        _ready.set()


def _warmup_mode() -> str:
    mode = os.environ.get("BATCHNORM_WARMUP", "process") or "process"
    if mode not in WARMUP_MODES:
        raise ValueError(
            f"BATCHNORM_WARMUP must be one of {WARMUP_MODES}, got {mode!r}. Unset it for the default 'process' "
            "(compile the numba kernels in a child process while ATen serves calls)."
        )
    return mode


def _start_warm_up() -> None:
    global _status
    mode = _warmup_mode()
    with _lock:
        if _status != "cold":
            return
        if mode == "off":
            _load_numba()
            _status = "ready"
            _ready.set()
            return
        _status = "warming"
    threading.Thread(target=_warm, args=(mode,), name="batchnorm-numba-warm-up", daemon=True).start()


def warm_up_status() -> str:
    """``"cold"`` (not started), ``"warming"``, ``"ready"``, ``"failed"`` or ``"absent"`` (numba not installed)."""
    return _status


def wait_ready(timeout: float | None = None) -> bool:
    """Start the numba warm-up if needed and wait up to ``timeout`` seconds; True when numba is ready.

    Rule: "auto" never picks numba before the warm-up finishes (native/composite serve meanwhile); call this
    before timing "auto" (benchmarks do), or to make a process use numba from its first step.

    Shape: not applicable. Example::

        >>> wait_ready(600) in (True, False)       # False only where numba is absent or unusable here
        True
    """
    if _status == "absent":
        return False
    _start_warm_up()
    _ready.wait(timeout)
    return _status == "ready"


def numba_for(x: torch.Tensor, forced: bool) -> Backend | None:
    """The numba backend if it can take ``x`` now (auto: only once warm), else None."""
    if _status == "cold" and not forced:  # auto never waits: numba joins once the background warm-up is done
        _start_warm_up()  # (BATCHNORM_WARMUP=off: ready at once)
    if _status == "ready" or (forced and _status != "absent"):
        nb = _numba if _numba is not None else _load_numba()  # forced: imports numba here, compiles on first call
        return nb if _safety.numba_usable() and nb.supports(x) else None
    return None


