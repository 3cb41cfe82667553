"""How much the background numba compile slows a user's own training loop (docs/kernels.md, "A good neighbour").

A small CNN with torch's own BatchNorm2d trains at 2 threads (what a user runs next to our first call).
One batchnorm call with an empty numba cache starts the background compile; while it runs, the script
alternates windows with the compiling process paused (SIGSTOP) and running (SIGCONT), so both kinds of
window see the same background load of the machine, and reports median step times of each and their
ratio (target <= 1.2). Then it times the loading phase (the parent's thread reading the cache).

    python benchmarks/warmup_neighbour.py [--window 1.0] [--threads 2] [--out result.json]

Environment as for any user; pass BATCHNORM_WARMUP_PRIORITY=normal to see the compile at normal priority
(diagnostic knob of the compile process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=float, default=1.0, help="seconds per paused / running window")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training loop")
    p.add_argument("--max-s", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    cache = tempfile.mkdtemp(prefix="bn-neighbour-")
    os.environ["NUMBA_CACHE_DIR"] = cache  # empty cache: the full compile (before numba is imported)
    os.environ.setdefault("BATCHNORM_CALIBRATE", "0")

    import torch
    import torch.nn as nn

    import batchnorm
    from batchnorm.kernels import warmup

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    for _ in range(20):
        step()
    alone_before = [step() for _ in range(60)]
    t0 = time.perf_counter()
    batchnorm.BatchNorm(16)(torch.randn(8, 16))  # starts the background warm-up
    paused: list[float] = []
    running: list[float] = []
    loading: list[float] = []
    while warmup.warm_up_status() == "warming" and time.perf_counter() - t0 < args.max_s:
        child = warmup.warm_up_status(detail=True)["child"]
        if not child:
            loading.append(step())
            continue
        for state, sink in ((signal.SIGSTOP, paused), (signal.SIGCONT, running)):
            try:
                os.kill(child, state)
            except ProcessLookupError:
                break
            end = time.perf_counter() + args.window
            while time.perf_counter() < end:
                sink.append(step())
    compile_s = time.perf_counter() - t0
    alone_after = [step() for _ in range(60)]
    med = lambda v: statistics.median(v) * 1e3 if v else float("nan")  # noqa: E731
    result = {"threads": args.threads, "window_s": args.window, "status": warmup.warm_up_status(detail=True),
              "warm_up_s": round(compile_s, 1), "load_average": os.getloadavg(),
              "step_ms": {"alone_before": med(alone_before), "compile_paused": med(paused),
                          "compile_running": med(running), "loading": med(loading), "alone_after": med(alone_after)},
              "steps": {"paused": len(paused), "running": len(running), "loading": len(loading)}}
    result["ratio_running_vs_paused"] = result["step_ms"]["compile_running"] / result["step_ms"]["compile_paused"]
    result["ratio_loading_vs_alone"] = result["step_ms"]["loading"] / result["step_ms"]["alone_after"]
    print(json.dumps({k: v for k, v in result.items() if k != "status"}, indent=1))
    print("warm-up:", result["status"]["state"], "-", result["status"]["reason"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
