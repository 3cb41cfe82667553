"""The background process that compiles the numba kernels (or measures the crossovers) for :mod:`.warmup`.

Run by :mod:`.warmup` as ``python -c <loader> <this file>``: the file is loaded by its path, so nothing
heavy is imported before the process has (1) tied its life to its parent, (2) dropped to the lowest CPU
priority and (3) taken the cache directory's lock. Only then does it import torch and the kernels.

* **dies with its parent**: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; everywhere a watchdog thread
  that exits as soon as the pipe from the parent reaches end of file (the parent is gone) or the parent
  id changes (re-parented). It is in its parent's process group, so Ctrl-C and a CI job that kills the
  group reach it too. A process killed mid-compile leaves numba's cache with what it finished (numba
  writes each entry atomically); the next compile resumes from there.
* **never competes**: ``SCHED_IDLE`` where the OS has it (runs only on otherwise idle CPU time), else
  ``nice 19``; one thread (the environment :mod:`.warmup` passes sets ``NUMBA_NUM_THREADS``,
  ``OMP_NUM_THREADS`` and friends to 1 for a compile, so no OpenMP team spins against the user's threads).
  The calibration job is the exception: it keeps normal priority and measures only while the machine is
  idle, stopping at the first sign of other work (:mod:`.calibrate`).
* **one compile per cache directory**: ``fcntl.flock`` on ``batchnorm-kernels.lock`` in the directory;
  the lock dies with its holder, so a killed compiler never leaves a stale lock. The process that gets
  the lock first re-checks whether the cache became complete meanwhile (then it has nothing to do).

Jobs (``BATCHNORM_WARMUP_JOB``): ``"compile"`` (heal the cache, compile what is missing, write the
manifest) and ``"calibrate"`` (time native against numba at the parent's thread count, store the
crossovers). The last line on stdout is a JSON report for the parent.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _die_with_parent(parent: int, pipe_fd: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(3)

    def watch() -> None:
        import select

        while True:
            try:
                ready, _, _ = select.select([pipe_fd], [], [], 1.0) if pipe_fd >= 0 else ([], [], [])
                if ready and not os.read(pipe_fd, 1):
                    os._exit(3)  # end of file: the parent closed its end (it exited or was killed)
            except OSError:
                os._exit(3)
            if pipe_fd < 0:
                time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="batchnorm-warm-up-watchdog", daemon=True).start()


def _lowest_priority() -> str:
    how = []
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            how.append("SCHED_IDLE")
        except OSError:
            pass
    try:
        os.nice(19)
        how.append("nice 19")
    except (OSError, AttributeError):
        pass
    return " + ".join(how) or "normal"


def _lock(directory: str):
    path = os.path.join(directory, "batchnorm-kernels.lock")
    try:
        import fcntl
    except ImportError:  # no flock (Windows): each process compiles for itself, as numba alone would
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when this process ends, however it ends
    return fd


def main() -> int:
    parent = int(os.environ.get("BATCHNORM_WARMUP_PARENT", os.getppid()))
    _die_with_parent(parent, int(os.environ.get("BATCHNORM_WARMUP_PIPE", "-1")))
    # BATCHNORM_WARMUP_PRIORITY=normal: a diagnostic knob (benchmarks/warmup_neighbour.py compares both)
    job = os.environ.get("BATCHNORM_WARMUP_JOB", "compile")
    # the calibration keeps normal priority and measures only on an idle machine (batchnorm.kernels.calibrate:
    # a race timed at SCHED_IDLE is not fair to ATen's OpenMP kernels)
    if os.environ.get("BATCHNORM_WARMUP_PRIORITY") == "normal" or job == "calibrate":
        priority = "normal"
    else:
        priority = _lowest_priority()
    directory = os.environ["BATCHNORM_WARMUP_DIR"]
    report: dict = {"job": job, "pid": os.getpid(), "priority": priority}
    t = time.monotonic()
    _lock(directory)
    report["waited_s"] = round(time.monotonic() - t, 3)
    report["start"] = time.time()  # holding the lock from here to the end

    import torch

    torch.set_num_threads(int(os.environ.get("BATCHNORM_WARMUP_THREADS", "1")))
    from batchnorm.kernels import warmup

    if job == "compile":
        done, why = warmup.cache_complete(directory)
        if done:
            report["result"] = "complete already (another process compiled it)"
        else:
            report["healed"] = warmup.heal(directory)
            t = time.monotonic()
            from batchnorm.kernels.numba import warm_up

            warm_up(warmup.kernel_set())
            warmup.write_manifest(directory)
            report["result"] = f"compiled ({why})"
            report["compile_s"] = round(time.monotonic() - t, 1)
    elif job == "calibrate":
        import numba

        from batchnorm.kernels import calibrate

        numba.set_num_threads(min(int(os.environ.get("BATCHNORM_WARMUP_NUMBA_THREADS", "1")),
                                  numba.config.NUMBA_NUM_THREADS))
        threads = (torch.get_num_threads(), numba.get_num_threads())
        if calibrate.load(directory, threads) is not None:
            report["result"] = "measured already"
        else:
            t = time.monotonic()
            smoke = warmup.kernel_set() == "smoke"  # tests: one key, three sizes (the smoke kernels only)
            # the smoke set (tests) measures whatever the load: the idle rule has its own test, and a test run
            # beside other jobs would otherwise never store a table
            limit = 1.0 if smoke else calibrate.BUSY
            # both allocator states (glibc): numba only where it is not slower in either (calibrate.heap_reuse)
            result = (calibrate.measure(3, calibrate.LADDER[:5:2], [("train", "inner")], idle_probe=0, busy_limit=limit,
                                        reuse_pass=True)
                      if smoke else calibrate.measure(reuse_pass=True))
            report["measure_s"] = round(time.monotonic() - t, 1)
            report["others_busy"] = result["others_busy"]
            report["passes"] = result["passes"]
            if "stopped" in result:  # the machine was not idle: nothing stored, a later process measures
                report["result"] = (f"deferred: {result['stopped']} (other processes used "
                                    f"{100 * result['others_busy']:.0f} % of the CPU); the built-in table stays "
                                    "and a later process measures again")
            elif result["others_busy"] > limit:  # the medians measured the neighbours: measure again
                report["result"] = (f"deferred: other processes used {100 * result['others_busy']:.0f} % of the CPU "
                                    "while it measured; the built-in table stays and the next process measures again")
            else:
                calibrate.store(directory, threads, result)
                report["result"] = "measured"
    else:
        raise SystemExit(f"unknown BATCHNORM_WARMUP_JOB {job!r}")
    report["end"] = time.time()
    print(json.dumps(report), flush=True)
    return 0
