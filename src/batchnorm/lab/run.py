"""``batchnorm lab``: run the experiments and write ``report.html``, ``report.md`` and ``results.json``.

Usage::

    batchnorm lab                       # all experiments, 3 seeds, into ./lab-report
    batchnorm lab --quick               # small budgets, 1 seed, into ./lab-report-quick (the CI smoke run)
    batchnorm lab --resume              # after Ctrl-C: reuse the finished sections, run the rest
    batchnorm lab is-it-gaussian batch-size --seeds 5 --out /tmp/r
    batchnorm lab --list                # names and questions

Each experiment is a module of :mod:`batchnorm.lab` (see :mod:`batchnorm.lab.core` for the protocol),
listed in :data:`EXPERIMENTS` in the issue's order. Modules are imported only when run, so a module
that fails to import (or to run) becomes a section saying so, and the other experiments still run.

The run survives: ``--out`` is checked (created, written) before any experiment starts; the report
is rewritten after every finished section; Ctrl-C prints one line and keeps the partial report;
``--resume`` reuses finished sections whose settings match. The timing experiment runs first and
alone, the others in ``--jobs`` worker processes (default 2).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .core import Context, Section

#: (command-line name, module) in the order of issue #7 (§9, test-data-shift, from issue #20)
EXPERIMENTS: list[tuple[str, str]] = [
    ("input-bn-vs-standardization", "batchnorm.lab.input_standardization"),
    ("why-normalize-before-affine", "batchnorm.lab.normalize_before_affine"),
    ("is-it-gaussian", "batchnorm.lab.gaussian"),
    ("internal-covariate-shift", "batchnorm.lab.ics"),
    ("hidden-layer-statistics", "batchnorm.lab.hidden_stats"),
    ("batch-size", "batchnorm.lab.batch_size"),
    ("test-time-statistics", "batchnorm.lab.test_time"),
    ("overhead", "batchnorm.lab.overhead"),
    ("test-data-shift", "batchnorm.lab.shift"),
]

#: intra-op threads for every experiment: the lab's models are tiny, so one thread is fastest and
#: keeps results and timings comparable between runs (an experiment may change it and restore it)
THREADS = 1


def set_threads(n: int) -> None:
    """``n`` threads for torch's intra-op pool and for numba's parallel kernels.

    numba's default (one thread per core) makes a 2-core machine that is busy with other work
    10-20× slower on the lab's small tensors (threads waiting on each other), so the lab pins it too.
    """
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # numba is optional
        pass


def _names() -> list[str]:
    return [name for name, _ in EXPERIMENTS]


def _failed_section(name: str, module: str, err: BaseException, tb: str) -> Section:
    return Section(
        name=name,
        title=name,
        question="(this experiment did not run)",
        setup=f"module {module}",
        answer=f"The experiment failed: {type(err).__name__}: {err}. No measurements are reported for it.",
        notes=[tb],
        results={"error": f"{type(err).__name__}: {err}"},
    )


def run_experiment(name: str, ctx: Context, module: str | None = None) -> tuple[Section, float]:
    """Import and run one experiment; returns its section and wall time in seconds.

    An ImportError or an exception inside ``run`` is turned into a section that reports it.
    """
    module = module or dict(EXPERIMENTS)[name]
    start = time.perf_counter()
    try:
        mod = importlib.import_module(module)
        set_threads(THREADS)
        ctx.manual_seed(ctx.seed)
        section = mod.run(ctx)
    except Exception as err:  # noqa: BLE001 - one broken experiment must not sink the report
        section = _failed_section(name, module, err, traceback.format_exc())
    return section, time.perf_counter() - start


def _settings(ctx: Context, module: str) -> dict[str, Any]:
    """What a finished section depends on: seeds, first seed, --quick, and a hash of its module's source."""
    try:
        spec = importlib.util.find_spec(module)
        code = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:12] if spec and spec.origin else "?"
    except (ImportError, ValueError, OSError):
        code = "?"
    return {"seeds": ctx.seeds, "seed": ctx.seed, "quick": ctx.quick, "code": code}


def _work(name: str, module: str, ctx: Context) -> dict[str, Any]:
    """Run one experiment and render it (figures to PNG bytes); used in-process and in worker processes."""
    from .report import render

    cpu = time.process_time()
    section, seconds = run_experiment(name, ctx, module)
    rendered = render(section, seconds=seconds, settings=_settings(ctx, module))
    # CPU seconds of this process (all its threads): on a busy machine the wall time is inflated, the CPU time not
    rendered["cpu_seconds"] = time.process_time() - cpu
    return rendered


def _worker_init() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it, workers just get terminated
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_threads(THREADS)
    # a worker whose parent died (killed, not interrupted) must not keep computing for nobody
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    import threading

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def check_out(out: Path, *, quick: bool) -> str | None:
    """``None`` if ``out`` can take this run's report, else a one-line reason and what to do instead.

    The folder is created if needed and a probe file is written and removed. A --quick run refuses a
    folder that holds a full report, so a smoke test never overwrites real results.
    Example: ``check_out(Path("/proc/nope"), quick=False)`` names the folder and the OS error.
    """
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder. Pass a folder to create or reuse, e.g. --out lab-report."
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return (f"cannot write the report to {out} ({err.strerror or err}). Choose a folder you can create and write, "
                "e.g. --out ./lab-report.")
    if quick:
        from .report import load_rendered

        previous, _ = load_rendered(out)
        if previous and not previous.get("settings", {}).get("quick", True):
            return (f"{out} holds a full (non --quick) report and a --quick run never overwrites one. Leave --out "
                    "out (default ./lab-report-quick) or choose another folder.")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="batchnorm lab",
        description=(
            "Run the batch-normalization experiments and write a report (report.html with the plots inside, "
            "report.md and results.json). The report is rewritten after every finished experiment, so stopping "
            "the run (Ctrl-C) keeps what is done; --resume then runs only what is missing."
        ),
        epilog=(
            "Examples: 'batchnorm lab' (everything; docs/benchmarks.md gives measured times); "
            "'batchnorm lab --quick' (smoke test); 'batchnorm lab batch-size --seeds 5 --out /tmp/r'. "
            "Exit status: 0 all experiments ran, 1 one failed (its section says why), 2 bad arguments, 130 interrupted."
        ),
    )
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help="which experiments to run, by name (default: all of them); --list shows the names")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one seed and small budgets, written to ./lab-report-quick; its numbers are not "
                        "evidence and it never overwrites a full report")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the report; created if missing (default: ./lab-report, or ./lab-report-quick "
                        "with --quick)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="how many times to repeat each measurement with a different random seed (default 3; 1 with "
                        "--quick)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="first random seed; the runs use S, S+1, ... (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the experiments already in the report folder whose settings (seeds, --quick, code) "
                        "match this run, and run only the others")
    p.add_argument("--jobs", type=int, default=2, metavar="J",
                   help="experiments to run at the same time in separate processes (default 2; the timing "
                        "experiment always runs alone)")
    p.add_argument("--list", action="store_true", help="print the experiment names and their questions, then exit")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    return p.parse_args(argv)


#: the timing experiment runs alone (before any worker process starts) so the others cannot disturb it
ALONE = ("overhead",)
#: longest first (seconds of a full run on the 2-core reference machine, 2026-12-03: 240, 166, 157, 65, 54, 27,
#: 10, 6), so two workers finish at about the same time
COST_ORDER = ("why-normalize-before-affine", "internal-covariate-shift", "batch-size", "input-bn-vs-standardization",
              "test-data-shift", "test-time-statistics", "is-it-gaussian", "hidden-layer-statistics")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm lab``; returns the process exit code (1 if an experiment failed, 130 on Ctrl-C)."""
    args = parse_args(argv)
    if args.list:
        for name, module in EXPERIMENTS:
            try:
                question = importlib.import_module(module).QUESTION
            except Exception as err:  # noqa: BLE001
                question = f"(not available: {type(err).__name__}: {err})"
            print(f"{name:<30} {question}")
        return 0
    unknown = [n for n in args.experiments if n not in _names()]
    if unknown:
        print(
            f"batchnorm lab: unknown experiment(s) {', '.join(unknown)}; expected names from: {', '.join(_names())} "
            "(run `batchnorm lab --list`).",
            file=sys.stderr,
        )
        return 2
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        print(f"batchnorm lab: --seeds must be >= 1, got {seeds}.", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"batchnorm lab: --jobs must be >= 1, got {args.jobs}.", file=sys.stderr)
        return 2
    out = Path(args.out if args.out is not None else ("lab-report-quick" if args.quick else "lab-report"))
    problem = check_out(out, quick=args.quick)
    if problem:
        print(f"batchnorm lab: {problem}", file=sys.stderr)
        return 2

    from .report import load_rendered, write_report

    ctx = Context(seeds=seeds, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    chosen = [n for n in _names() if n in (args.experiments or _names())]
    modules = dict(EXPERIMENTS)
    done: dict[str, dict[str, Any]] = {}
    if args.resume:
        _, previous = load_rendered(out)
        for name in chosen:
            sec = previous.get(name)
            if sec is not None and not sec.get("failed") and sec.get("settings") == _settings(ctx, modules[name]):
                done[name] = sec
                print(f"{name}: reused from {out} (same settings)", flush=True)
    todo = [n for n in chosen if n not in done]
    start = time.perf_counter()
    counter = [len(done)]

    def finish(sec: dict[str, Any], *, final: bool = False) -> None:
        done[sec["name"]] = sec
        counter[0] += 1
        status = "FAILED: " + str(sec["results"].get("error")) if sec["failed"] else "done"
        print(f"[{counter[0]}/{len(chosen)}] {sec['name']} {status} in {sec['seconds']:.1f} s", flush=True)
        write_report(done, out, ctx=ctx, order=chosen, total_seconds=time.perf_counter() - start)

    pool = None
    try:
        if not done:  # an empty, valid report right away: the folder never holds a stale one mid-run
            write_report(done, out, ctx=ctx, order=chosen)
        for name in [n for n in todo if n in ALONE] + ([] if args.jobs > 1 else [n for n in todo if n not in ALONE]):
            print(f"{name} ...", flush=True)
            finish(_work(name, modules[name], ctx))
        rest = sorted((n for n in todo if n not in ALONE and n not in done),
                      key=lambda n: COST_ORDER.index(n) if n in COST_ORDER else -1)
        if rest:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            pool = ProcessPoolExecutor(max_workers=min(args.jobs, len(rest)), mp_context=mp.get_context("spawn"),
                                       initializer=_worker_init)
            wctx = replace(ctx, progress=False)  # bars from two processes would garble the terminal
            pending = {pool.submit(_work, n, modules[n], wctx): n for n in rest}
            for n in rest:
                print(f"{n} ... (worker process)", flush=True)
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = pending.pop(fut)
                    try:
                        sec = fut.result()
                    except Exception as err:  # noqa: BLE001 - a dead worker becomes a failed section
                        from .report import render

                        sec = render(_failed_section(name, modules[name], err, traceback.format_exc()), seconds=0.0,
                                     settings=_settings(ctx, modules[name]))
                    finish(sec)
            pool.shutdown()
            pool = None
    except KeyboardInterrupt:
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
        write_report(done, out, ctx=ctx, order=chosen, total_seconds=time.perf_counter() - start)
        print(f"\nbatchnorm lab: interrupted; {out}/report.html has the {len(done)} of {len(chosen)} finished "
              "sections (run the same command with --resume to add the rest).", file=sys.stderr, flush=True)
        return 130
    total = time.perf_counter() - start
    paths = write_report(done, out, ctx=ctx, order=chosen, total_seconds=total)
    print(f"wrote {', '.join(str(p) for p in paths[:3])} and {len(paths) - 3} figure(s) ({total:.1f} s in total)")
    return 1 if any(s["failed"] for s in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
