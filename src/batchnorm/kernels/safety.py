"""When the numba kernels may run: forked children and threading layers that are not thread-safe.

Two process-level hazards sit under numba's parallel kernels (``@njit(parallel=True)``), and neither
can be caught as a Python exception:

* **fork** — GNU OpenMP (``libgomp``) is not fork-safe. A child forked after its parent started an
  OpenMP thread pool hangs (or is terminated by numba) the first time it enters a parallel region.
  The pool need not be numba's: on Linux numba's ``omp`` layer binds to the ``libgomp.so.1`` that
  is already loaded, which for CPU PyTorch wheels is torch's bundled copy, so one multi-threaded
  torch op in the parent (a ``Conv2d`` forward) is enough. Fork-based ``DataLoader`` workers hit
  exactly this.
* **threads** — numba's ``workqueue`` layer (used when neither TBB nor OpenMP is available, or with
  ``NUMBA_THREADING_LAYER=workqueue``) aborts the process ("Concurrent access has been detected")
  when two threads launch parallel kernels at once. ``omp`` and ``tbb`` are thread-safe (numba
  documentation, "Selecting a threading layer for safe parallel execution").

Rules (the kernel dispatch applies them on every call):

* :func:`numba_usable` is ``False`` in a process forked from a parent where entering numba's
  parallel kernels could hang or abort; callers then use another backend. The verdict is taken in
  the parent right before ``fork()`` (``os.register_at_fork``) and inherited by grandchildren:

  - the layer numba uses (or, before its first parallel kernel, could pick) is ``workqueue``:
    fork-safe, the child may use numba;
  - ``tbb``: fork-safe when the fork happens on the main thread;
  - ``omp`` (or not known yet): safe only when the parent had no OpenMP pool thread. A native
    thread that :mod:`threading` does not know counts as one unless it is provably elsewhere: on
    Linux x86-64 an idle libgomp worker waits in a futex system call made from libgomp's own code,
    so the thread's program counter (``/proc/self/task/<tid>/syscall``) names the library, while
    OpenBLAS's idle workers (started by ``import numpy``) sit in libc. A running thread, or any
    native thread on other platforms, counts (conservative: the child then takes another backend);
  - any layer: unsafe when another thread held numba's compiler lock at the fork (the child's copy
    of that lock would never be released).

  A process started with ``spawn``/``forkserver`` is a fresh interpreter: always usable.
* :func:`kernel_guard` returns the context manager to wrap each numba kernel launch in: a
  re-entrant lock while the threading layer is not known to be thread-safe (``workqueue``, or
  before the first parallel kernel has fixed the layer), a no-op object once numba runs on ``omp``
  or ``tbb``. The no-op costs about as much as an uncontended lock (~0.15 µs per ``with`` on the
  benchmark VM), far below one kernel call.

Example::

    >>> from batchnorm.kernels import safety
    >>> safety.numba_usable()          # in an ordinary (not forked) process
    True
    >>> with safety.kernel_guard():    # around each numba kernel call
    ...     pass

Importing this module does not import numba (it only reads numba's state once numba is loaded), so
:mod:`batchnorm.kernels.dispatch` imports it at package import: the fork hook must be registered in
the parent before any fork, also when the parent never ran a batchnorm kernel.

Shape: not applicable (process state only).

Reference: numba documentation, "The Threading Layers" (thread and fork safety of ``tbb``, ``omp``,
``workqueue``); GCC bug 52303 / 60035 (libgomp is not fork-safe); PyTorch ``DataLoader`` workers.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import threading

# numba is never imported here: this module must be cheap to import at package import time, because its
# fork hook has to be registered in the parent *before* the fork, whether or not numba was used yet.


def _numba_module(name: str):
    """``sys.modules[name]`` if numba already imported it, else None (nothing numba-side has started then)."""
    return sys.modules.get(name)


#: Layers that may be entered from several threads at once (numba documentation).
THREAD_SAFE_LAYERS = frozenset({"omp", "tbb"})

_usable = True  # False in a forked child where numba's parallel kernels could hang or abort
_reason = ""  # why not (empty while usable)
_verdict_for_child = ""  # computed in the parent right before fork(); the child inherits it


class _NoGuard:
    """The guard once the threading layer is known to be thread-safe: does nothing, cheaply."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _LockUntilKnown:
    """Serialize calls until numba's first parallel kernel has fixed the threading layer, then switch."""

    __slots__ = ()

    def __enter__(self) -> None:
        _LOCK.acquire()

    def __exit__(self, *exc: object) -> None:
        _LOCK.release()
        _settle_guard()


_LOCK = threading.RLock()  # re-entrant: a guarded fused sequence may call another guarded helper
_NO_GUARD = _NoGuard()
_UNTIL_KNOWN = _LockUntilKnown()
_guard: object = _UNTIL_KNOWN


def threading_layer() -> str | None:
    """The threading layer numba runs its parallel kernels on, or ``None`` before the first one ran."""
    parallel = _numba_module("numba.np.ufunc.parallel")
    return getattr(parallel, "_threading_layer", None)


def _settle_guard() -> None:
    global _guard
    layer = threading_layer()
    if layer is None:
        return  # the guarded call launched no parallel kernel: keep locking until one has
    _guard = _NO_GUARD if layer in THREAD_SAFE_LAYERS else _LOCK


def kernel_guard():
    """The context manager to wrap each numba kernel launch in (see the module docstring).

    A lock while numba's threading layer is not thread-safe (``workqueue``) or not known yet,
    a no-op once it is ``omp`` or ``tbb``. Never hold it while waiting on other threads.

    Example::

        >>> from batchnorm.kernels import safety
        >>> with safety.kernel_guard():
        ...     pass                      # launch the numba kernel here
    """
    return _guard


def numba_usable() -> bool:
    """False in a forked child where entering numba's parallel kernels could hang or abort.

    Rule: see the module docstring (verdict taken in the parent right before ``fork()``).
    Callers route such calls to another backend; :func:`reason` says why.

    Example::

        >>> from batchnorm.kernels import safety
        >>> safety.numba_usable()
        True
    """
    return _usable


def reason() -> str:
    """Why :func:`numba_usable` is False here (empty string while it is True)."""
    return _reason


def status() -> dict[str, object]:
    """``{"numba_usable", "reason", "threading_layer", "guard"}`` for diagnostics and bug reports.

    ``guard`` is ``"none"`` (thread-safe layer), ``"lock"`` (workqueue) or ``"lock until the layer is known"``.
    """
    guard = {id(_NO_GUARD): "none", id(_LOCK): "lock"}.get(id(_guard), "lock until the layer is known")
    return {"numba_usable": _usable, "reason": _reason, "threading_layer": threading_layer(), "guard": guard}


def _possible_layers() -> set[str]:
    """The layers numba uses now, or could pick at its first parallel kernel given its configuration."""
    layer = threading_layer()
    if layer is not None:
        return {layer}
    config = _numba_module("numba.core.config")
    if config is not None:
        wanted = str(config.THREADING_LAYER).lower()
    else:  # numba not imported yet: what it will read from the environment
        wanted = os.environ.get("NUMBA_THREADING_LAYER", "default").lower()
    if wanted in ("tbb", "omp", "workqueue"):
        return {wanted}
    if wanted == "safe":
        return {"tbb"}
    if wanted == "threadsafe":
        return {"tbb", "omp"}
    if wanted == "forksafe":  # omp only where it is not GNU OpenMP, which numba treats as fork-safe
        return {"tbb", "workqueue"} | (set() if sys.platform.startswith("linux") else {"omp-forksafe"})
    return {"tbb", "omp", "workqueue"}  # "default": the first of these that loads


_OPENMP_LIBS = re.compile(r"lib(gomp|iomp5|omp)[-.\w]*\.(so|dylib)")
# Where libgomp's idle workers wait in a futex syscall issued from libgomp's own code (inline `syscall`
# instruction, GCC config/linux/x86/futex.h), so the thread's program counter names the library. Elsewhere
# (generic Linux futex.h calls libc's syscall()) a pool thread cannot be told from any other native thread.
_PC_NAMES_LIBRARY = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64", "i686", "i386")


def _foreign_native_threads() -> list[int] | None:
    """Thread ids of native threads :mod:`threading` does not know (pool threads); None if they cannot be listed."""
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return None
    known = {t.native_id for t in threading.enumerate()}
    return sorted(tids - known)


def _executable_mappings() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "x" in parts[1]:
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16), parts[5].strip()))
    return out


def _openmp_pool_threads() -> tuple[int, str]:
    """``(n, how)``: how many native threads may belong to an OpenMP pool (n > 0: forking now is unsafe for omp).

    A native thread counts unless it is provably elsewhere: blocked in a system call issued from a
    library that is not an OpenMP runtime (OpenBLAS's idle workers sit in libc). A running thread
    (e.g. a libgomp worker still spinning after a parallel region) counts.
    """
    foreign = _foreign_native_threads()
    if foreign is None:
        return -1, "the parent's native threads could not be listed (no /proc/self/task)"
    if not foreign:
        return 0, ""
    if not _PC_NAMES_LIBRARY:
        return len(foreign), "native worker thread(s) that cannot be told apart from an OpenMP pool on this platform"
    try:
        maps = _executable_mappings()
    except OSError:
        return len(foreign), "native worker thread(s) whose library could not be read"
    suspects = 0
    for tid in foreign:
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue  # the thread has exited meanwhile
        if len(fields) < 3:  # "running" (or not readable): could be an OpenMP worker spinning
            suspects += 1
            continue
        pc = int(fields[-1], 16)
        lib = next((name for lo, hi, name in maps if lo <= pc < hi), "")
        if not lib or _OPENMP_LIBS.search(os.path.basename(lib)):
            suspects += 1
    return suspects, "OpenMP pool thread(s) (torch's intra-op threads share numba's libgomp)"


def _compiler_lock_held_elsewhere() -> bool:
    module = _numba_module("numba.core.compiler_lock")
    lock = getattr(getattr(module, "global_compiler_lock", None), "_lock", None)
    if lock is None:
        return False
    if lock.acquire(blocking=False):  # re-entrant: succeeds when free or held by this thread
        lock.release()
        return False
    return True


def fork_verdict() -> str:
    """Why a child forked now could not use numba's parallel kernels (empty string: it could).

    Called in the parent right before ``fork()``; exposed for tests and diagnostics.
    """
    if not _usable:
        return _reason  # a grandchild inherits its parent's hazard
    if _compiler_lock_held_elsewhere():
        return "another thread was compiling numba kernels when the process forked (numba's compiler lock stays held in the child)"
    layers = _possible_layers()
    if "tbb" in layers and threading.current_thread() is not threading.main_thread():
        return "numba's TBB threading layer is not fork-safe when fork() is called from a thread other than the main thread"
    if "omp" in layers:
        n, what = _openmp_pool_threads()
        if n < 0:
            return f"numba may use GNU OpenMP, which is not fork-safe, and {what}"
        if n:
            return (
                f"the parent had {n} {what} when it forked; GNU OpenMP is not fork-safe, "
                "so numba's parallel kernels could hang in this process"
            )
    return ""


def _before_fork() -> None:
    global _verdict_for_child
    try:
        _verdict_for_child = fork_verdict()
    except Exception as exc:  # never break fork() itself; be conservative instead
        _verdict_for_child = f"the fork-safety check failed ({exc!r})"


def _after_fork_in_child() -> None:
    global _usable, _reason, _LOCK, _guard
    if _verdict_for_child:
        _usable, _reason = False, _verdict_for_child
    # a lock held by another parent thread at fork time would stay held forever in the child
    was_lock = _guard is _LOCK
    _LOCK = threading.RLock()
    if was_lock:
        _guard = _LOCK


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
