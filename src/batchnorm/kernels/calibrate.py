"""The crossovers of :data:`batchnorm.kernels.dispatch.CROSSOVER_BYTES`, measured on the machine that runs them.

Cost model: per call, numba's kernels cost a fixed overhead plus bandwidth, ATen's CPU kernel less per call
but more per byte, so per ``(mode, layout)`` there is one size of ``x`` (bytes) from which numba is the
cheaper. :func:`measure` finds it: forced ``backend="native"`` against ``backend="numba"`` layers, timed
side by side (alternating short turns, medians: :func:`batchnorm.bench.side_by_side`) on the ladder
:data:`LADDER` (inputs from :func:`calibration_shape`), for ``mode`` ``"train"`` (forward + backward) and
``"eval"`` (forward without autograd), then :func:`crossover` of the medians.

:mod:`batchnorm.kernels.warmup` runs it once per machine and thread count, in a low-priority background
process after the kernels are compiled, and stores the result beside numba's cache (:func:`store`,
``batchnorm-crossovers.json``, keyed by :func:`key`: CPU, torch/numba versions, kernel sources, torch
and numba thread counts); every later process with the same key adopts it (:func:`load`). Deterministic
once stored: no timing on the hot path. ``BATCHNORM_CALIBRATE=0`` keeps the built-in table.

Only on an idle machine, at normal priority: the compile runs at the lowest priority, but a measurement at
``SCHED_IDLE`` / ``nice 19`` is not a fair race (every passing task preempts it, and ATen's OpenMP team waits
at its barriers for a preempted thread far longer than numba's kernels do: native measured up to 4× slower
than in a normal process, which moved the crossover down to sizes where numba loses). So the calibration
process keeps its normal priority and measures only while nothing else runs: before each ``(mode, layout)``
ladder it samples the machine for :data:`IDLE_PROBE_S` and, during the ladder, after every size; the moment
other processes use more than :data:`BUSY` of the CPU it stops, stores nothing (the built-in table stays) and
a later process tries again. Beside a user's own work it therefore competes for at most one ladder point.

Shape: not applicable.

Example::

    >>> from batchnorm.kernels import calibrate
    >>> calibrate.crossover([1, 2, 4, 8], [1.0, 1.0, 1.0, 1.0], [2.0, 1.5, 0.5, 0.7])
    4
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

FILE = "batchnorm-crossovers.json"
#: sizes of ``x`` (bytes) timed by :func:`measure`: 64 KB to 32 MB, factor 2
LADDER = tuple(64 << 10 << i for i in range(10))
NEVER = 1 << 62  # numba never won on the ladder: native at every size
#: version of a stored table; :func:`load` ignores other versions (2: the "cl" layout class; 3: MARGIN 0.9;
#: 4: outer ladder (N, 64, 64); 5: cl ladder (N, 512, 4, 4); 6: the "short" layout class; 7: two allocator passes)
VERSION = 7


#: numba must beat native by this factor (ratio numba/native below it, after smoothing) to be chosen: a tie
#: goes to native (torch's own kernel), and a measurement that hovers around 1.0 cannot flip the choice
MARGIN = 0.9
#: a measurement during which other processes used more than this fraction of the machine's CPU time is
#: not stored (its medians measure the neighbours): the built-in table stays, the next process measures again
BUSY = 0.25
#: seconds the machine is watched before each ladder: :func:`measure` starts a ladder only on an idle machine
IDLE_PROBE_S = 0.3
#: seconds of timed rounds per ladder point (at least ``repeats`` rounds; more rounds for cheap sizes)
POINT_S = 0.25


def _smoothed(native_ms: list[float], numba_ms: list[float]) -> list[float]:
    """Ratios numba / native, each the median of itself and its two neighbours on the ladder."""
    ratios = [b / a for a, b in zip(native_ms, numba_ms)]
    return [statistics.median(ratios[max(0, i - 1):i + 2]) for i in range(len(ratios))]


#: glibc's largest dynamic ``mmap`` threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB): with its
#: defaults a block this large is always fresh ``mmap`` memory, so the heap-reuse pass does not apply from here on
GLIBC_MMAP_MAX = 32 << 20


def crossover(sizes: list[int], native_ms: list[float], numba_ms: list[float], margin: float = MARGIN,
              reuse: tuple[list[float], list[float]] | None = None, reuse_below: int = 1 << 62) -> int | None:
    """Smallest ladder size from which numba is faster than native, by at least ``1 / margin``, at that size
    and every larger one.

    The ratios numba / native are first smoothed over each size and its two neighbours on the ladder
    (median of three), so one noisy point does not move the crossover; a smoothed ratio of ``margin`` or
    more counts for native. ``reuse = (native_ms, numba_ms)``: the same ladder measured with heap reuse
    (:func:`heap_reuse`); then a size below ``reuse_below`` counts for numba only where numba is faster by
    ``1 / margin`` in at least one of the two allocator states and not slower (smoothed ratio below 1) in either
    (sizes from ``reuse_below`` on, which the allocator never reuses, go by the first pass). None when native wins
    (or ties) at the largest size measured. Example::

        >>> crossover([1, 2, 4, 8, 16], [1.0, 1.0, 1.0, 1.0, 1.0], [2.0, 1.5, 0.5, 0.8, 0.7])
        4
        >>> crossover([1, 2, 4], [1.0, 1.0, 1.0], [2.0, 1.5, 1.2]) is None
        True
        >>> crossover([1, 2, 4], [1.0, 1.0, 1.0], [0.97, 0.98, 0.97]) is None  # a tie stays on native
        True
        >>> crossover([1, 2, 4], [1.0] * 3, [0.5, 0.5, 0.5], reuse=([1.0] * 3, [1.3, 0.97, 0.97]))  # never slower
        2
        >>> crossover([1, 2, 4], [1.0] * 3, [0.5, 0.5, 0.5], reuse=([1.0] * 3, [1.3, 1.3, 1.3]), reuse_below=4)
        4
    """
    smooth = _smoothed(native_ms, numba_ms)
    other = _smoothed(*reuse) if reuse is not None else smooth
    last_native = -1
    for i, (size, r, q) in enumerate(zip(sizes, smooth, other)):
        q = q if size < reuse_below else r
        if min(r, q) >= margin or max(r, q) >= 1.0:
            last_native = i
    if last_native == len(sizes) - 1:
        return None
    return sizes[last_native + 1]


def heap_reuse() -> bool:
    """Switch this process's glibc ``malloc`` to reusing its heap for every size (``mallopt``: no ``mmap``, no
    trimming), for the second pass of :func:`measure`; False (nothing changed) under any other allocator or glibc
    tunables. Permanent for the process: only the calibration process, which exits after measuring, calls it.

    Why two passes: with glibc's defaults a multi-megabyte block is sometimes fresh, zero-filled memory and
    sometimes reused heap, depending on the process's history (its dynamic ``mmap`` threshold and trimming), and
    ATen's per-call outputs cost up to 2.5× more in the first state (:func:`allocator`). The first pass measures
    whichever state the calibration process is in; the second, the reuse state; :func:`crossover` picks numba
    only where it is not slower in either.
    """
    if allocator() != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def cpu_snapshot() -> tuple[float, float] | None:
    """``(CPU-seconds the whole machine has been busy, CPU-seconds of this process)`` now, from ``/proc/stat``
    and :func:`os.times`; None where ``/proc/stat`` cannot be read (then nothing is judged busy)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]
        hz = float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    t = os.times()
    return (sum(fields) - idle) / hz, t.user + t.system


def others_busy(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float,
                cpus: int | None = None) -> float:
    """Fraction of the machine's CPU time (``wall`` seconds × ``cpus``) that *other* processes used between two
    :func:`cpu_snapshot` calls; 0.0 when either is None. Example: ``others_busy((10, 1), (13, 2), 2.0, 2)``
    is ``0.5`` (3 CPU-seconds busy, 1 of them ours, out of 4)."""
    if before is None or after is None or wall <= 0:
        return 0.0
    machine, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, machine - own) / (wall * (cpus or os.cpu_count() or 1))


def calibration_shape(layout: str, nbytes: int) -> tuple[tuple[int, ...], int]:
    """``(shape, axis)`` of a float32 input of about ``nbytes`` bytes: ``(N, 256)`` for ``"inner"`` (features
    innermost in memory), ``(N, 512, 4, 4)`` for ``"cl"`` (made channels-last by :func:`calibration_input`),
    ``(N, 64, 64)`` for ``"outer"``, ``(N, 512, 2, 4)`` for ``"short"`` (rows of 8 values: numba gains least on
    the shortest rows, so the crossover it gives is the safe one for every map up to 5×5). Example:
    ``calibration_shape("inner", 1 << 20)`` is ``((1024, 256), 1)``."""
    n = nbytes // 4
    if layout == "inner":
        return (max(4, n // 256), 256), 1
    if layout == "cl":
        # 512 features on a 4x4 map: numba lost to ATen's channels-last kernel most on wide late-stage layers
        return ((n // 8192, 512, 4, 4) if n >= 8192 else (1, 128, 2, max(2, n // 256))), 1
    if layout == "outer":  # rows of 64 values (an 8x8 feature map), the shortest of the class
        return ((n // 4096, 64, 64) if n >= 4096 else (1, max(1, n // 64), 64)), 1
    if layout == "short":  # rows of 8 values, 512 features (late-stage layers on tiny maps)
        return ((n // 4096, 512, 2, 4) if n >= 4096 else (1, max(2, n // 8), 2, 4)), 1
    raise ValueError(f"calibration_shape expected layout 'inner', 'cl', 'outer' or 'short', got {layout!r}.")


def calibration_input(layout: str, nbytes: int) -> tuple[torch.Tensor, int]:
    """``(x, axis)``: a random input of :func:`calibration_shape` in ``layout`` (channels-last for ``"cl"``)."""
    shape, axis = calibration_shape(layout, nbytes)
    x = torch.randn(shape)
    return (x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x), axis


def calibration_fns(mode: str, layout: str, nbytes: int) -> dict:
    """``{"native": fn, "numba": fn}``: one training step (``mode="train"``) or eval forward of a layer forced
    onto each backend, on one input of :func:`calibration_input`."""
    from ..layers import BatchNorm

    x, axis = calibration_input(layout, nbytes)
    x.requires_grad_(mode == "train")
    g = torch.randn_like(x)
    fns = {}
    for name in ("native", "numba"):
        layer = BatchNorm(x.shape[axis], axis=axis, backend=name)
        if mode == "train":
            def step(layer=layer):
                x.grad = None
                layer(x).backward(g)
        else:
            layer.eval()

            def step(layer=layer):
                with torch.no_grad():
                    layer(x)
        fns[name] = step
    return fns


def measure(repeats: int = 7, sizes: tuple[int, ...] = LADDER, keys=None, idle_probe: float = IDLE_PROBE_S,
            point_s: float = POINT_S, busy_limit: float = BUSY, reuse_pass: bool = False) -> dict:
    """Time native against numba on the ladder for each ``(mode, layout)``; ``{"table": {key: bytes},
    "ladder": [{mode, layout, bytes, native_ms, numba_ms}, ...], "others_busy": fraction}`` (``NEVER`` where
    numba never won; ``others_busy``: :func:`others_busy` over the measurement, compared with :data:`BUSY`
    before the table is stored).

    ``reuse_pass`` (the calibration process): after the ladders, switch to heap reuse (:func:`heap_reuse`; glibc
    only) and measure every ladder again (rows with ``"malloc": "heap reuse"``); the table then takes numba only
    where it is not slower in either pass, below :data:`GLIBC_MMAP_MAX` (:func:`crossover` with ``reuse``;
    ``"passes": 2`` in the result).

    Stops early, with ``"stopped"`` (why) in the result and no table, as soon as other processes
    use more than ``busy_limit`` (:data:`BUSY`) of the CPU: in the ``idle_probe`` seconds watched before each
    ladder, or between two sizes of a ladder (``others_busy`` is then the fraction that stopped it)."""
    from ..bench import side_by_side
    from . import dispatch

    keys = list(keys or dispatch.CROSSOVER_BYTES)
    out: dict = {"table": {}, "ladder": [], "passes": 1}
    start, before = time.monotonic(), cpu_snapshot()
    timed: dict = {}

    def stop(why: str, busy: float) -> dict:
        out["stopped"], out["others_busy"] = why, round(busy, 3)
        return out

    def ladders(regime: str | None) -> dict | None:
        for mode, lay in keys:
            if idle_probe > 0:
                t0, s0 = time.monotonic(), cpu_snapshot()
                time.sleep(idle_probe)
                busy = others_busy(s0, cpu_snapshot(), time.monotonic() - t0)
                if busy > busy_limit:
                    return stop(f"the machine was busy before the {mode},{lay} ladder", busy)
            nat, nb = [], []
            for nbytes in sizes:
                t0, s0 = time.monotonic(), cpu_snapshot()
                s = side_by_side(calibration_fns(mode, lay, nbytes), repeats, budget=0.004, min_time=point_s)
                busy = others_busy(s0, cpu_snapshot(), time.monotonic() - t0)
                if busy > busy_limit:
                    return stop(f"other processes started during the {mode},{lay} ladder", busy)
                a, b = statistics.median(s["native"]) * 1e3, statistics.median(s["numba"]) * 1e3
                nat.append(a)
                nb.append(b)
                row = {"mode": mode, "layout": lay, "bytes": nbytes, "native_ms": round(a, 4), "numba_ms": round(b, 4)}
                out["ladder"].append({**row, "malloc": regime} if regime else row)
            timed.setdefault((mode, lay), []).append((nat, nb))
        return None

    if ladders(None) is not None:
        return out
    if reuse_pass and heap_reuse():
        out["passes"] = 2
        if ladders("heap reuse") is not None:
            return out
    for k, passes in timed.items():
        cross = crossover(list(sizes), *passes[0], reuse=passes[1] if len(passes) > 1 else None,
                          reuse_below=GLIBC_MMAP_MAX)
        out["table"][k] = NEVER if cross is None else cross
    out["others_busy"] = round(others_busy(before, cpu_snapshot(), time.monotonic() - start), 3)
    return out


def allocator() -> str:
    """The process's ``malloc``, which a stored table is measured with: ``"jemalloc"``, ``"tcmalloc"`` or
    ``"mimalloc"`` when one is mapped into the process (``LD_PRELOAD`` or linked), else ``"glibc"`` with any
    ``MALLOC_*_`` / ``GLIBC_TUNABLES`` settings of the environment.

    Why it is part of :func:`key`: ATen's CPU kernels allocate their outputs per call, and whether a multi-megabyte
    allocation is fresh, zero-filled memory (glibc's default ``mmap`` threshold and trimming) or reused heap memory
    (jemalloc, tcmalloc, a raised threshold) changes native's time by up to 2.5× at 4 MB on the benchmark VM,
    and the crossover with it: numba's large outputs come from :mod:`batchnorm.kernels.buffers` in both cases.
    The calibration process inherits the user's environment, so it measures with the user's allocator.

    Example: ``allocator()`` → ``'glibc'`` (or ``'jemalloc'`` under ``LD_PRELOAD=libjemalloc.so.2``).
    """
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:  # not Linux: the environment is all there is to go by
        maps = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    tunables = sorted(k for k in os.environ if (k.startswith("MALLOC_") and k.endswith("_")) or k == "GLIBC_TUNABLES")
    return "glibc" + (f" ({', '.join(f'{k}={os.environ[k]}' for k in tunables)})" if tunables else "")


def key(threads: tuple[int, int]) -> str:
    """The machine, versions, kernel sources, ``(torch threads, numba threads)`` and :func:`allocator` a stored
    table is valid for."""
    from . import warmup

    e = warmup._expected()
    return (f"{e['machine']} | {e['cpu']} | {os.cpu_count()} cpus | torch {torch.__version__} | numba {e['numba']} | "
            f"kernels {e['source']} | threads {threads[0]}/{threads[1]} | malloc {allocator()}")


def path(directory: str) -> str:
    return os.path.join(directory, FILE)


def _read(directory: str) -> dict:
    try:
        with open(path(directory)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load(directory: str | None, threads: tuple[int, int]) -> dict | None:
    """The stored table for this machine and ``threads`` (``{(mode, layout): bytes}``), or None."""
    if not directory:
        return None
    entry = _read(directory).get(key(threads))
    if not isinstance(entry, dict) or not isinstance(entry.get("table"), dict):
        return None
    try:
        table = {tuple(k.split(",")): int(v) for k, v in entry["table"].items()}
    except (ValueError, TypeError):
        return None
    # a table stored before the cost table's layout classes changed (version 1: no "cl") is measured again
    return table if entry.get("version") == VERSION else None


def store(directory: str, threads: tuple[int, int], result: dict) -> None:
    """Add ``result`` (from :func:`measure`) to the stored tables, atomically (callers hold the cache lock)."""
    data = _read(directory)
    data[key(threads)] = {"version": VERSION, "table": {f"{m},{lay}": v for (m, lay), v in result["table"].items()},
                          "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                          "ladder": result.get("ladder", [])}
    tmp = f"{path(directory)}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path(directory))
