"""``batchnorm lab``: run the experiments and write ``report.html``, ``report.md`` and ``results.json``.

Usage::

    batchnorm lab                       # all experiments, 3 seeds, into ./lab-report
    batchnorm lab --quick               # small budgets, 1 seed (the CI smoke run)
    batchnorm lab is-it-gaussian batch-size --seeds 5 --out /tmp/r
    batchnorm lab --list                # names and questions

Each experiment is a module of :mod:`batchnorm.lab` (see :mod:`batchnorm.lab.core` for the protocol),
listed in :data:`EXPERIMENTS` in the issue's order. Modules are imported only when run, so a module
that fails to import (or to run) becomes a section saying so, and the other experiments still run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

from .core import Context, Section

#: (command-line name, module) in the order of issue #7
EXPERIMENTS: list[tuple[str, str]] = [
    ("input-bn-vs-standardization", "batchnorm.lab.input_standardization"),
    ("why-normalize-before-affine", "batchnorm.lab.normalize_before_affine"),
    ("is-it-gaussian", "batchnorm.lab.gaussian"),
    ("internal-covariate-shift", "batchnorm.lab.ics"),
    ("hidden-layer-statistics", "batchnorm.lab.hidden_stats"),
    ("batch-size", "batchnorm.lab.batch_size"),
    ("test-time-statistics", "batchnorm.lab.test_time"),
    ("overhead", "batchnorm.lab.overhead"),
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


def run_experiment(name: str, ctx: Context) -> tuple[Section, float]:
    """Import and run one experiment; returns its section and wall time in seconds.

    An ImportError or an exception inside ``run`` is turned into a section that reports it.
    """
    module = dict(EXPERIMENTS)[name]
    start = time.perf_counter()
    try:
        mod = importlib.import_module(module)
        set_threads(THREADS)
        ctx.manual_seed(ctx.seed)
        section = mod.run(ctx)
    except Exception as err:  # noqa: BLE001 - one broken experiment must not sink the report
        section = _failed_section(name, module, err, traceback.format_exc())
    return section, time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="batchnorm lab",
        description="Run batch-normalization experiments and write an HTML/Markdown report with plots.",
    )
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="names to run (default: all); see --list")
    p.add_argument("--quick", action="store_true", help="small budgets and 1 seed (smoke test, ~2 min)")
    p.add_argument("--out", default="lab-report", help="output directory (default: ./lab-report)")
    p.add_argument("--seeds", type=int, default=None, help="runs to average per number (default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ... (default 0)")
    p.add_argument("--list", action="store_true", help="list the experiments and their questions, then exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm lab``; returns the process exit code (1 if an experiment failed)."""
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
    ctx = Context(seeds=seeds, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    chosen = args.experiments or _names()
    out = Path(args.out)
    sections: list[Section] = []
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for i, name in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {name} ...", flush=True)
        section, seconds = run_experiment(name, ctx)
        sections.append(section)
        timings[name] = seconds
        status = "FAILED: " + section.results["error"] if "error" in section.results else "done"
        print(f"[{i}/{len(chosen)}] {name} {status} in {seconds:.1f} s", flush=True)
    total = time.perf_counter() - start

    from .report import write_report

    paths = write_report(sections, out, ctx=ctx, timings=timings, total_seconds=total)
    print(f"wrote {', '.join(str(p) for p in paths)} ({total:.1f} s in total)")
    return 1 if any("error" in s.results for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
