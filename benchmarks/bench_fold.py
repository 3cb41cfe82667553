"""Folded vs unfolded eval speed of the ResNet-style CNN of tests/test_tools.py (printed, never asserted).

Run: ``python benchmarks/bench_fold.py [--threads 1] [--repeats 30]``. Timings interleave the two models
and report the median and the minimum of ``repeats`` forward passes each (on a busy machine the
minimum is the better estimate of the cost itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_tools import ResNetish, randomize  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--width", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize(ResNetish(c=args.width)).eval()
    folded, records = batchnorm.fold(model, report=True)
    print(f"ResNetish(c={args.width}): " + ", ".join(f"{r.bn}->{r.action}" for r in records))
    print(f"{'batch':>6} {'unfolded ms (median/min)':>25} {'folded ms (median/min)':>23} {'speedup':>8} {'max rel err':>12}")
    for bs in (1, 8, 64):
        x = torch.randn(bs, 3, 32, 32)
        times: dict[str, list[float]] = {"unfolded": [], "folded": []}
        with torch.no_grad():
            ref, out = model(x), folded(x)
            for _ in range(args.repeats):
                for name, m in (("unfolded", model), ("folded", folded)):
                    t = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t)
        u, f = (statistics.median(times[k]) * 1e3 for k in ("unfolded", "folded"))
        umin, fmin = (min(times[k]) * 1e3 for k in ("unfolded", "folded"))
        err = float((out - ref).abs().max() / ref.abs().max())
        print(f"{bs:>6} {u:>15.3f} / {umin:<7.3f} {f:>13.3f} / {fmin:<7.3f} {umin / fmin:>7.2f}x {err:>12.2e}")


if __name__ == "__main__":
    main()
