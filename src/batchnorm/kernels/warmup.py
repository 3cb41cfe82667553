"""Getting the numba kernels ready without making a call wait, and without slowing anything else down.

:mod:`batchnorm.kernels.dispatch` asks :func:`numba_for` on each call; until the kernels are compiled (or
loaded from numba's disk cache) ``"auto"`` does not pick numba, and the first such call starts the
warm-up in a background thread. Meanwhile plain calls run native and the others composite.

Rules of the default mode (``BATCHNORM_WARMUP=process``):

1. **A complete cache is loaded, not recompiled.** The cache directory is the one numba's own locator
   picks for the kernel files (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the sources, else the
   user cache directory). The compiler writes ``batchnorm-kernels.json`` last: numba and Python
   versions, CPU, a hash of the kernel sources, the kernel set, and the size of every cache file. When
   it matches, the background thread loads the kernels (a few seconds, no other process).
2. **One compile per cache directory, across processes.** Otherwise a child process compiles; it
   takes ``fcntl.flock`` on ``batchnorm-kernels.lock`` in the cache directory first, so of several
   processes started together one compiles and the others' children wait on the lock (asleep, before
   importing torch), find the cache complete and exit. The lock dies with its holder: no stale lock.
3. **The compile never competes.** The child runs under ``SCHED_IDLE`` (else ``nice 19``) with one
   thread (``NUMBA_NUM_THREADS=OMP_NUM_THREADS=1``, ``OMP_WAIT_POLICY=PASSIVE``) and dies with the
   process that started it (``PR_SET_PDEATHSIG`` on Linux, a pipe watchdog everywhere, same process
   group). A killed compile resumes next time from what numba saved (it saves each kernel as it goes).
4. **The cache heals.** Before compiling, every cache entry of the kernels is read back; truncated or
   unreadable ``.nbi``/``.nbc`` files are removed and recompiled, with one warning naming the directory.
   A cache whose manifest matches but whose files no longer load is healed the same way.
5. **No writable cache anywhere** (read-only source tree, cache directory and home, as in containers):
   the kernels are compiled uncached in a thread of this process (as ``"thread"`` mode), with one
   warning that says to set ``NUMBA_CACHE_DIR``.
6. **Crossovers measured here.** Once the kernels are ready, a second low-priority child times native
   against numba at this process's thread counts (:mod:`batchnorm.kernels.calibrate`) and stores the
   crossovers beside the cache; this process then adopts them (:data:`dispatch.CROSSOVER_BYTES` is
   updated in place and :func:`table_version` changes, so cached choices are re-made). Until then,
   and in the other modes, the built-in table holds.

:func:`warm_up_status` gives the state (``"cold"``, ``"warming"``, ``"ready"``, ``"failed"``,
``"absent"``); ``warm_up_status(detail=True)`` a dict that also says why (``batchnorm doctor`` prints it).

Shape: not applicable (process state).

Example::

    >>> from batchnorm.kernels import warmup
    >>> warmup.warm_up_status() in ("cold", "warming", "ready", "failed", "absent")
    True
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import platform
import sys
import threading
import time
import warnings

import torch

from . import safety as _safety
from .backend import Backend

HAS_NUMBA = importlib.util.find_spec("numba") is not None

#: How the numba kernels get compiled without blocking a call (``BATCHNORM_WARMUP``): ``"process"`` (default:
#: a child process compiles them into numba's disk cache, then a thread here loads them — the compiler holds
#: the GIL for long stretches, so compiling in a thread of this process would stall its calls), ``"thread"``
#: (compile in a thread here), ``"off"`` (no warm-up: auto uses numba at once and its first call compiles
#: synchronously; the test suite uses it).
WARMUP_MODES = ("process", "thread", "off")
MANIFEST = "batchnorm-kernels.json"
_KERNEL_FILES = ("loops", "fused")  # the modules with @njit(cache=...) kernels: their cache entries are ours

_lock = threading.Lock()
_status = "cold" if HAS_NUMBA else "absent"  # cold → warming → ready (or failed / absent)
_reason = ("not started: the first call numba could serve starts it" if HAS_NUMBA
           else "numba is not installed (pip install numba)")
_info: dict = {}  # cache_dir, locator, mode, child, healed, crossovers ... (warm_up_status(detail=True))
_numba: Backend | None = None  # the numba backend object once imported
_ready = threading.Event()
_calibrated = threading.Event()
_error: BaseException | None = None
_child = None  # the background child process (subprocess.Popen) while it runs
_in_child_wait = False  # the warm-up thread is waiting for a child (a fork may restart the warm-up)
_table_version = 0  # bumped whenever dispatch.CROSSOVER_BYTES changes (dispatch.decision_state reads it)
_warned: set[str] = set()


def _set(status: str, reason: str) -> None:
    global _status, _reason
    _reason = reason
    _status = status


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _load_numba() -> Backend:
    global _numba
    if _numba is None:
        from .numba import NUMBA

        _numba = NUMBA
    return _numba


# ------------------------------------------------------------------------------------------ the cache
def _kernel_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "numba")


_location: tuple[str | None, str] | None = None


def cache_location() -> tuple[str | None, str]:
    """``(directory, locator)`` where numba caches our kernels, or ``(None, why)`` when no place is writable.

    Asks numba's own locator chain (so ``NUMBA_CACHE_DIR`` and ``NUMBA_CACHE_LOCATOR_CLASSES`` count) with a
    probe function that claims to live in ``kernels/numba/loops.py``. Imports numba (not the kernels).
    """
    global _location
    if _location is None:
        from numba.core import caching

        path = os.path.join(_kernel_dir(), "loops.py")
        namespace: dict = {}
        exec(compile("def _probe():\n    pass\n", path, "exec"), namespace)  # noqa: S102 - a file name only
        try:
            impl = caching.CompileResultCacheImpl(namespace["_probe"])
            loc = impl.locator
            _location = (loc.get_cache_path(), type(loc).__name__)
        except RuntimeError as e:  # "cannot cache function ...: no locator available"
            _location = (None, str(e))
            _warn_once("nocache", "batchnorm: numba found no writable place for its kernel cache (read-only source "
                                  "tree, cache directory and home), so the numba kernels compile in each process (in "
                                  "the background) and are not kept. Set NUMBA_CACHE_DIR to a writable directory to "
                                  f"compile them once. (numba: {e})")
    return _location


def kernel_set() -> str:
    """Which kernels the warm-up builds: ``"all"`` (default) or ``"smoke"`` (float32 2-D training forward only,
    ``BATCHNORM_WARMUP_KERNELS=smoke``: the tests use it to pay for a small compile)."""
    value = os.environ.get("BATCHNORM_WARMUP_KERNELS", "all") or "all"
    if value not in ("all", "smoke"):
        raise ValueError(f"BATCHNORM_WARMUP_KERNELS must be 'all' or 'smoke', got {value!r}. Unset it for 'all'.")
    return value


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(_kernel_dir(), "*.py"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _expected() -> dict:
    import numba

    return {"numba": numba.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}{sys.abiflags}"
            if hasattr(sys, "abiflags") else platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu(), "source": _source_hash(), "kernels": kernel_set()}


def cache_files(directory: str) -> dict[str, int]:
    """``{file name: size}`` of the numba cache entries (``.nbi`` index, ``.nbc`` data) of our kernels."""
    out = {}
    for mod in _KERNEL_FILES:
        for path in glob.glob(os.path.join(glob.escape(directory), f"{mod}.*.nb[ic]")):
            try:
                out[os.path.basename(path)] = os.stat(path).st_size
            except OSError:
                pass
    return out


def cache_complete(directory: str) -> tuple[bool, str]:
    """``(True, "")`` when the manifest matches this installation and every file it lists is there with its
    size (an index may have grown by signatures compiled later), else ``(False, why)``. Cheap: one small
    JSON file and a directory listing."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return False, "no complete cache yet"
    except (OSError, ValueError) as e:
        return False, f"unreadable manifest ({e})"
    expected = _expected()
    for key, value in expected.items():
        if key == "kernels" and manifest.get(key) == "all":
            continue  # a full cache serves a smoke warm-up too
        if manifest.get(key) != value:
            return False, f"cache built for another {key} ({manifest.get(key)!r}, here {value!r})"
    files = cache_files(directory)
    for name, size in manifest.get("files", {}).items():
        here = files.get(name)
        # an index (.nbi) grows when a later process compiles a signature the warm-up did not (numba appends
        # it and writes a new .nbc): the warm-up's entries are still there, so that is no reason to recompile.
        # A data file (.nbc) is written once; a missing, shrunk or resized one is a partial cache.
        if here is None or here < size or (here != size and not name.endswith(".nbi")):
            return False, f"cache file {name} changed since it was compiled"
    return True, ""


def write_manifest(directory: str) -> None:
    """Write the manifest (last step of a compile), atomically."""
    manifest = {**_expected(), "files": cache_files(directory), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = os.path.join(directory, f"{MANIFEST}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(directory, MANIFEST))


def _entry_ok(path: str) -> bool:
    import pickle

    try:
        with open(path, "rb") as f:
            if path.endswith(".nbi"):
                pickle.load(f)  # numba's version
                stamp, overloads = pickle.loads(f.read())
                return isinstance(overloads, dict)
            pickle.loads(f.read())
            return True
    except FileNotFoundError:
        return True  # removed meanwhile: nothing to heal
    except Exception:  # noqa: BLE001 - any failure to read back is a corrupt entry
        return False


def heal(directory: str) -> list[str]:
    """Remove the cache entries of our kernels that do not read back (truncated, corrupt) and the manifest;
    return their names. One warning per process names the directory. Leftover temporary files of a killed
    writer older than ten minutes go too."""
    bad = [name for name in sorted(cache_files(directory)) if not _entry_ok(os.path.join(directory, name))]
    for name in bad:
        stem = name.split(".nbi")[0] if name.endswith(".nbi") else None
        victims = [name] + ([os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), f"{stem}.*.nbc"))]
                            if stem else [])
        for v in victims:
            try:
                os.unlink(os.path.join(directory, v))
            except OSError:
                pass
    for tmp in glob.glob(os.path.join(glob.escape(directory), "*.tmp.*")):
        try:
            if time.time() - os.stat(tmp).st_mtime > 600:
                os.unlink(tmp)
        except OSError:
            pass
    if bad:
        try:
            os.unlink(os.path.join(directory, MANIFEST))
        except OSError:
            pass
    return bad


def _report_healed(directory: str, names: list[str]) -> None:
    if names:
        _info["healed"] = names
        _warn_once("healed", f"batchnorm: removed {len(names)} corrupt numba cache file(s) in {directory} "
                             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); those kernels were "
                             "recompiled in the background.")


# ------------------------------------------------------------------------------------------ the child
_CHILD_LOADER = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('_bn_warmup_child', "
                 "sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main())")


def _run_child(job: str, directory: str, env_extra: dict[str, str]) -> dict:
    """Run the child for ``job`` and wait; its JSON report (raises RuntimeError with its stderr on failure)."""
    global _child, _in_child_wait
    import subprocess

    r, w = os.pipe()  # the child's watchdog sees end of file when this process is gone (w closes with it)
    env = {**os.environ, "BATCHNORM_WARMUP_JOB": job, "BATCHNORM_WARMUP_DIR": directory,
           "BATCHNORM_WARMUP_PARENT": str(os.getpid()), "BATCHNORM_WARMUP_PIPE": str(r), **env_extra}
    if job != "calibrate":
        # a compile's threads never spin; the calibration times the kernels in the user's own OpenMP setting
        # (under PASSIVE every barrier sleeps: ATen measured up to 10x slower on small inputs than in the user's
        # process, which moved the crossover down to sizes where numba loses)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.pop("BATCHNORM_BACKEND", None)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_warmup_child.py")
    try:
        _child = subprocess.Popen([sys.executable, "-c", _CHILD_LOADER, path], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=(r,))
    finally:
        os.close(r)
    _info["child"] = _child.pid
    _in_child_wait = True
    try:
        out, err = _child.communicate()
    finally:
        _in_child_wait = False
        os.close(w)
        code, _child = _child.returncode, None
        _info["child"] = None
    if code != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"the {job} process exited with status {code}: {' | '.join(tail) or 'no message'}")
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {"output": lines[-1]}


def _compile_env() -> dict[str, str]:
    one = {k: "1" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {**one, "BATCHNORM_WARMUP_THREADS": "1"}


#: set at interpreter exit: the warm-up thread stops before its next kernel (:func:`_at_exit`)
_exiting = threading.Event()
#: held by the warm-up thread while it runs numba's kernels in this process (loading or compiling them)
_in_kernels = threading.Lock()
#: the longest the interpreter's exit waits for the kernel that thread is in (a cached load takes well under a
#: second; an uncached compile of one kernel a few seconds)
EXIT_WAIT_S = 30.0


class _Exiting(RuntimeError):
    """The interpreter is exiting: the warm-up stopped between two kernels."""


def _load_here() -> None:
    """Load (or compile) the kernels in this process's warm-up thread, stopping between two kernels when the
    interpreter exits: the exit then waits for the kernel in progress (:func:`_at_exit`) instead of tearing the
    process down under a thread that is inside numba's and OpenMP's native code (which aborted a script that
    ended during the load: ``terminate called without an active exception``, exit status -6)."""
    from .numba import warm_up

    with _in_kernels:
        if _exiting.is_set():
            raise _Exiting("the interpreter is exiting")
        _load_numba()
        if not warm_up(kernel_set(), stop=_exiting.is_set):
            raise _Exiting("the interpreter is exiting")


def _at_exit() -> None:
    """``atexit``: ask the warm-up thread to stop before its next kernel and wait (at most :data:`EXIT_WAIT_S`)
    for the one it is in. A thread waiting for the compile process holds nothing, so the exit does not wait for
    the compile (that process dies with this one)."""
    _exiting.set()
    if _in_kernels.acquire(timeout=EXIT_WAIT_S):
        _in_kernels.release()


_caller_numba_threads: int | None = None  # numba's thread count in the thread that started the warm-up


def _numba_threads() -> int:
    """numba's thread count where the calls run: numba keeps it per thread, so read in the thread that started
    the warm-up (when it had imported numba; else numba's default, which this thread reports too)."""
    if _caller_numba_threads is not None:
        return _caller_numba_threads
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # noqa: BLE001
        return torch.get_num_threads()


def _warm_process() -> None:
    directory, locator = cache_location()
    _info.update(cache_dir=directory, locator=locator)
    if directory is None:
        _info["mode"] = "thread (uncached: no writable cache directory)"
        _set("warming", "compiling in a thread of this process, uncached: no writable cache directory")
        _load_here()
        _set("ready", "compiled in this process (uncached: no writable cache directory; set NUMBA_CACHE_DIR)")
        return
    for _attempt in range(4):
        done, why = cache_complete(directory)
        if done:
            _set("warming", f"loading the compiled kernels from {directory}")
            try:
                _load_here()
            except Exception as e:  # noqa: BLE001 - a cache entry that does not load: heal, recompile
                _info["load_error"] = repr(e)
                _report_healed(directory, heal(directory) or _drop_manifest(directory))
                continue
            _set("ready", f"loaded from the cache in {directory}")
            return
        _set("warming", f"compiling in a background process ({why}); cache {directory}")
        report = _run_child("compile", directory, _compile_env())
        _info["compile"] = report
        _report_healed(directory, report.get("healed", []))
    raise RuntimeError(f"the numba cache in {directory} did not become usable after 4 attempts ({_info.get('load_error')})")


def _drop_manifest(directory: str) -> list[str]:
    """A load failed but every file reads back: drop the manifest so the next round recompiles what is missing."""
    try:
        os.unlink(os.path.join(directory, MANIFEST))
    except OSError:
        pass
    return []


def _calibrate_process() -> None:
    """Adopt the crossovers stored for this machine and thread counts, measuring them first if needed."""
    from . import calibrate

    directory = _info.get("cache_dir")
    threads = (torch.get_num_threads(), _numba_threads())
    table = calibrate.load(directory, threads) if directory else None
    if table is None and directory and os.environ.get("BATCHNORM_CALIBRATE", "1") != "0":
        _info["crossovers"] = f"measuring in a background process (threads {threads[0]}/{threads[1]})"
        report = _run_child("calibrate", directory, {"BATCHNORM_WARMUP_THREADS": str(threads[0]),
                                                      "BATCHNORM_WARMUP_NUMBA_THREADS": str(threads[1])})
        _info["calibrate"] = report
        table = calibrate.load(directory, threads)
    if table is not None:
        adopt(table, f"measured on this machine at {threads[0]} torch / {threads[1]} numba threads, malloc "
                     f"{calibrate.allocator()} ({calibrate.path(directory)})")
    else:
        result = str((_info.get("calibrate") or {}).get("result", ""))
        _info["crossovers"] = ("built-in table (measurement " + result.split(";")[0] + ")" if result.startswith("deferred")
                               else "built-in table (not measured here)")


def adopt(table: dict, source: str) -> None:
    """Make ``table`` (``{(mode, layout): bytes}``) the crossovers :func:`dispatch.select` reads."""
    global _table_version
    from . import dispatch

    dispatch.CROSSOVER_BYTES.update({k: int(v) for k, v in table.items() if k in dispatch.CROSSOVER_BYTES})
    _info["crossovers"] = source
    _table_version += 1


def table_version() -> int:
    """Changes whenever the crossover table in use changes (part of ``dispatch.decision_state()``)."""
    return _table_version


def _warm(mode: str) -> None:
    global _error
    try:
        _info["mode"] = mode
        if mode == "process":
            _warm_process()
        else:
            _set("warming", "compiling in a thread of this process (BATCHNORM_WARMUP=thread)")
            _load_here()
            _set("ready", "compiled in a thread of this process (BATCHNORM_WARMUP=thread)")
    except BaseException as e:  # noqa: BLE001 - reported through warm_up_status(); auto keeps the others
        _error = e
        _set("failed", f"{type(e).__name__}: {e}")
    finally:
        _ready.set()
    try:
        if mode == "process" and _status == "ready":
            _calibrate_process()
        else:
            _info.setdefault("crossovers", "built-in table (not measured here)")
    except Exception as e:  # noqa: BLE001 - the built-in table stays
        _info["crossovers"] = f"built-in table (measuring failed: {type(e).__name__}: {e})"
    finally:
        _calibrated.set()


def _warmup_mode() -> str:
    mode = os.environ.get("BATCHNORM_WARMUP", "process") or "process"
    if mode not in WARMUP_MODES:
        raise ValueError(
            f"BATCHNORM_WARMUP must be one of {WARMUP_MODES}, got {mode!r}. Unset it for the default 'process' "
            "(compile the numba kernels in a child process while ATen serves calls)."
        )
    return mode


def _start_warm_up() -> None:
    global _caller_numba_threads
    mode = _warmup_mode()
    with _lock:
        if _status != "cold":
            return
        # numba's count without launching its pool (that would start OpenMP threads here: safety.py's fork rule);
        # numba.set_num_threads launches it, so an unlaunched pool means numba's default
        parallel = sys.modules.get("numba.np.ufunc.parallel")
        if parallel is not None and getattr(parallel, "_is_initialized", False):
            try:
                _caller_numba_threads = int(parallel._get_num_threads())
            except Exception:  # noqa: BLE001 - not readable: numba's default holds
                _caller_numba_threads = None
        if mode == "off":
            _load_numba()
            _info.update(mode="off", crossovers="built-in table (not measured here)")
            _set("ready", "BATCHNORM_WARMUP=off: each kernel compiles (or loads from the cache) on its first call")
            _ready.set()
            _calibrated.set()
            return
        _set("warming", "starting")
    import atexit

    atexit.register(_at_exit)
    threading.Thread(target=_warm, args=(mode,), name="batchnorm-numba-warm-up", daemon=True).start()


def warm_up_status(detail: bool = False):
    """The numba kernels' state: ``"cold"`` (not started), ``"warming"``, ``"ready"``, ``"failed"`` or ``"absent"``
    (numba not installed).

    ``detail=True``: a dict with ``state``, ``reason`` (why, in words), ``mode``, ``cache_dir``, ``locator``,
    ``child`` (pid of a running background process, or None), ``crossovers`` (where the table in use comes
    from) and ``table`` (the table), plus ``healed`` / ``compile`` / ``calibrate`` reports when they happened.

    Shape: not applicable. Example: ``warm_up_status(detail=True)["reason"]``.
    """
    if not detail:
        return _status
    from . import dispatch

    out = {"state": _status, "reason": _reason, "mode": _info.get("mode"), "cache_dir": _info.get("cache_dir"),
           "locator": _info.get("locator"), "child": _info.get("child"),
           "crossovers": _info.get("crossovers", "built-in table (not measured here)"),
           "table": {f"{m},{lay}": v for (m, lay), v in dispatch.CROSSOVER_BYTES.items()},
           "numba_usable": _safety.numba_usable(), "numba_unusable_reason": _safety.reason()}
    out.update({k: _info[k] for k in ("healed", "compile", "calibrate", "load_error") if k in _info})
    return out


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


def wait_calibrated(timeout: float | None = None) -> bool:
    """:func:`wait_ready`, then wait until the crossover table is settled (measured and adopted, or the built-in
    one kept); True when it is. Benchmarks call it so "auto" is timed with the choice it will keep."""
    if not wait_ready(timeout):
        return False
    return _calibrated.wait(timeout)


def numba_for(x: torch.Tensor, forced: bool) -> Backend | None:
    """The numba backend if it can take ``x`` now (auto: only once warm), else None."""
    # auto never waits: numba joins once the background warm-up is done (BATCHNORM_WARMUP=off: ready at once);
    # never started while torch.compile traces (its lock and thread would break the graph): the next eager call starts it
    if _status == "cold" and not forced and not torch.compiler.is_compiling():
        _start_warm_up()
    if _status == "ready" or (forced and _status != "absent"):
        nb = _numba if _numba is not None else _load_forced()  # forced: imports numba here, compiles on first call
        return nb if _safety.numba_usable() and nb.supports(x) else None
    return None


def _load_forced() -> Backend:
    """A forced ``"numba"`` before the warm-up: heal a corrupt cache first (numba would raise on it)."""
    nb = _load_numba()
    try:
        directory, _ = cache_location()
        if directory is not None and not cache_complete(directory)[0]:
            _report_healed(directory, heal(directory))
    except Exception:  # noqa: BLE001 - healing is best effort; numba reports what remains
        pass
    return nb


def _after_fork_in_child() -> None:
    """A fork while the warm-up thread waited for a background process: the copy here has no thread, start over."""
    global _ready, _calibrated, _child, _in_child_wait, _status
    if _in_child_wait and _status == "warming":
        _status, _child, _in_child_wait = "cold", None, False
        _ready, _calibrated = threading.Event(), threading.Event()
        _info.pop("child", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
